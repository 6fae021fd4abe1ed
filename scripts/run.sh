#!/usr/bin/env bash
# Install the app's requirements and start it on the embedded shapes-world model (http://127.0.0.1:7860).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False
exec python app.py "$@"
