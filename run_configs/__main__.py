"""`python -m run_configs`: see run_configs.cli."""

import sys

from run_configs.cli import main

if __name__ == "__main__":
    sys.exit(main())
