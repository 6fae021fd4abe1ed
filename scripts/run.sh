#!/usr/bin/env bash
# Install the app's requirements and start it on the embedded shapes-world model (http://127.0.0.1:7860).
set -euo pipefail
cd "$(dirname "$0")/.."
# pip as root (a container) warns about it on every install; its version check calls out to the index
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q -r requirements.txt
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False
exec python app.py "$@"
