"""Runs the Fluxion demo (same as `python -m fluxion demo`); pass --help for options."""

import sys

from fluxion.demo import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
