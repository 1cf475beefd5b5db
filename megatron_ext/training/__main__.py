"""`python -m megatron_ext.training --config run.toml [flags]` (see megatron_ext.training.cli)."""

import sys

from megatron_ext.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
