#!/usr/bin/env bash
# Install everything the tests need (pip requirements, Debian's chromium for the browser tests) and run them all.
set -euo pipefail
cd "$(dirname "$0")/.."
# pip as root (a container) warns about it on every install; its version check calls out to the index
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi
fi
python -m pip install -q -r requirements-dev.txt
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
python -m pytest -q -x --timeout=900 "$@"
