#!/usr/bin/env bash
# Sets up .venv and runs natgrad's main job: `natgrad bench` (arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/natgrad bench "$@"
