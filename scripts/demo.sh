#!/usr/bin/env bash
# Installs Fluxion (and torch if missing) and runs the demo. Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first: the extension builds against the torch already installed (no build isolation). On the CPU
# machines here torch==2.13.0 is the small CPU wheel; a GPU machine keeps the CUDA torch it has.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q numpy ninja setuptools wheel
python -m pip install -q --no-build-isolation -e .
python -m fluxion info
python -m fluxion demo "$@"
