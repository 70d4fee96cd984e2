"""``python -m vmix_lib.demo``: the command line lives in vmix_lib/demo/experiment.py (main)."""
import sys

from .experiment import main

if __name__ == "__main__":
    sys.exit(main())
