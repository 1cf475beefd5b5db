"""`python -m run_configs`: see run_configs.cli."""

import sys

from run_configs.cli import main

if __name__ == "__main__":
    from megatron_ext.core.shutdown import skip_final_gc

    skip_final_gc()  # a quicker exit (see megatron_ext.core.shutdown)
    sys.exit(main())
