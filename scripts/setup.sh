#!/usr/bin/env bash
# Creates .venv (if missing) and installs natgrad with its extras into it.
# torch comes first: where a local CPU build of torch 2.13.0 is on pip's search path
# (as on the project's build machines) pip takes it instead of a multi-GB CUDA build;
# elsewhere `torch==2.13.0` is an ordinary install from the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
fi
.venv/bin/python -c "import torch" # fail loudly if torch did not install
.venv/bin/python -m pip install -q -e ".[dev,integrations]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import natgrad, sklearn, tqdm, matplotlib, pytest, transformers, lightning"
