"""ncp: NCP-DPO preference training for diffusers pipelines (see DESIGN.md's module map).

Importing the package drops third-party notices that do not apply to it (`ncp.notices`), before any of its modules
imports diffusers or transformers.
"""

from ncp import notices

notices.install()
