"""Long-context needle test on a real pretrained model (SmolLM2-135M-Instruct from PyPI) with FULL,
fixed (16, 0.05) and Fluxion attention; `--help` for options. See fluxion/realmodel.py."""

import sys

from fluxion.realmodel import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
