#!/usr/bin/env bash
# The main job: installs qwenstack (once), then serves a model with the OpenAI-compatible API and the chat
# page. No argument: the bundled demo model, no download. Extra arguments go to `qwenstack serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
exec qwenstack serve "$@"
