#!/usr/bin/env bash
# Installs Fluxion with its test dependencies and runs every test: pytest, then the Catch2 core tests
# through ctest. GPU tests skip cleanly where there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q numpy ninja pytest setuptools wheel "transformers==5.17.0"
python -m pip install -q --no-build-isolation -e .
if ! { [ -f /usr/include/catch2/catch.hpp ] || [ -f /usr/include/catch2/catch_test_macros.hpp ] || [ -f /usr/local/include/catch2/catch_test_macros.hpp ]; }; then
  if command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq catch2) >/dev/null
  fi
fi
python -m fluxion info
python -m pytest -q tests
# The HF integration again under the other supported transformers line (4.57), in a venv that sees this
# environment's torch and fluxion.
venv=build/venv-transformers457
[ -x "$venv/bin/python" ] || python -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q "transformers==4.57.6" "tokenizers>=0.22,<0.23" "huggingface-hub>=0.34,<1.0"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_hf.py tests/test_graphs.py
cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/cmake -j "$(nproc)" >/dev/null
ctest --test-dir build/cmake --output-on-failure
