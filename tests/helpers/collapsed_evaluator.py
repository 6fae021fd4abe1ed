"""The real evaluator, then a fault: the candidate's probe judge is set far below the base's, as when a round's
candidate collapsed (the shapes default base's first round once drew empty canvases).

    python -m tests.helpers.collapsed_evaluator <ncp.evaluate arguments>
"""

import json
import sys
from pathlib import Path

from ncp.evaluate import main as evaluate_main


def main() -> None:
    args = sys.argv[1:]
    evaluate_main(args)
    out = Path(args[args.index("--out") + 1])
    ev = json.loads(out.read_text())
    ev["base_judge"] = 0.6
    for name, version in ev["versions"].items():  # the served version (when not the base) scores as the base
        version["judge"] = 0.3 if name == "candidate" else 0.6  # the injected collapse: 0.3 below
    out.write_text(json.dumps(ev))


if __name__ == "__main__":
    main()
