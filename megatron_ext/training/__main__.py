"""`python -m megatron_ext.training --config run.toml [flags]` (see megatron_ext.training.cli)."""

import sys

from megatron_ext.training.cli import main

if __name__ == "__main__":
    from megatron_ext.core.shutdown import skip_final_gc

    skip_final_gc()  # a quicker exit (see megatron_ext.core.shutdown)
    sys.exit(main())
