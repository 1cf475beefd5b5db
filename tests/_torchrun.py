"""`python -m tests._torchrun ...`: torchrun (torch.distributed.run's command line) with the
quicker exit of megatron_ext's own entry points (megatron_ext.core.shutdown), for the tests that
launch whole jobs: the agent's final garbage collection took about 0.7 s of each exit."""

from torch.distributed.run import main

from megatron_ext.core.shutdown import skip_final_gc

if __name__ == "__main__":
    skip_final_gc()
    main()
