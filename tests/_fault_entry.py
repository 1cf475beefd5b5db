"""The trainer's command line with faults injected, for the reliability tests.

A job of tests/_torchrun.py (start_job; its ranks forked from torchrun's agent) or
`torchrun ... tests/_fault_entry.py [trainer flags]` (script ranks) runs
`python -m megatron_ext.training [trainer flags]` on every rank, after arming the fault named by
the environment:
- FAULT_KILL_IN_WRITE=STEP: rank 1 kills itself (SIGKILL) as it starts writing its shards of the
  checkpoint of STEP, while rank 0 writes its own;
- FAULT_KILL_IN_ASYNC_WRITE=STEP (with checkpoint.async_save): rank 1 kills itself (not its writer)
  as soon as its forked writer process started writing the checkpoint of STEP;
- FAULT_KILL_BEFORE_PUBLISH=STEP: rank 0 kills itself once every rank has written the checkpoint
  of STEP, before it is renamed into place and recorded in `latest`.
With EXIT_CODE_DIR set, each rank writes the exit code of the command line to EXIT_CODE_DIR/RANK
(torchrun reports only failures, and its own code when it is signalled).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import types


def _kill_self() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _arm() -> None:
    from megatron_ext.training import checkpoint

    dist_checkpointing = checkpoint.dist_checkpointing  # megatron.core's, as the trainer uses it

    rank = int(os.environ.get("RANK", "0"))
    in_write = os.environ.get("FAULT_KILL_IN_WRITE")
    if in_write is not None and rank == 1:
        original_save = dist_checkpointing.save

        def save(state, path, *args, **kwargs):
            if state["train_state"]["step"] == int(in_write):
                _kill_self()
            return original_save(state, path, *args, **kwargs)

        proxy = types.SimpleNamespace(
            **{n: getattr(dist_checkpointing, n) for n in dir(dist_checkpointing)}
        )
        proxy.save = save
        checkpoint.dist_checkpointing = proxy
    in_async_write = os.environ.get("FAULT_KILL_IN_ASYNC_WRITE")
    if in_async_write is not None and rank == 1:
        original_schedule = checkpoint.AsyncCheckpointSaver.schedule

        def schedule(self, request, step):
            original_schedule(self, request, step)
            if step == int(in_async_write):
                writers = [call.async_caller.process for call in self._queue.async_calls]
                if all(w is not None and w.is_alive() for w in writers):
                    print("FAULT: rank 1 killed with its writer process writing", flush=True)
                _kill_self()

        checkpoint.AsyncCheckpointSaver.schedule = schedule
    before_publish = os.environ.get("FAULT_KILL_BEFORE_PUBLISH")
    if before_publish is not None and rank == 0:
        original_publish = checkpoint._publish

        def publish(root, staging, path, step):
            if step == int(before_publish):
                _kill_self()
            return original_publish(root, staging, path, step)

        checkpoint._publish = publish


RANK_MODULES = (
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.models.gpt",
    "torch._dynamo",  # the optimizer's first step imports it
    "megatron_ext.loss._cpu_kernels",  # numba (each kernel loads from its cache when first called)
    "megatron_ext.training.checkpoint",
    "megatron_ext.training.cli",
    "megatron_ext.training.trainer",
    "tests._fault_entry",
)
"""What every rank imports: the trainer, the model, megatron's checkpointing, the loss's CPU
kernels (tests/_torchrun.py's fork server imports them once for all the jobs)."""


def prepare() -> None:
    for name in RANK_MODULES:
        importlib.import_module(name)


def rank_main(argv: list[str]) -> int:
    """One rank: arm the fault, run the trainer's command line, return its exit code."""
    _arm()
    from megatron_ext.training.cli import main

    code = main(argv)
    if "EXIT_CODE_DIR" in os.environ:
        with open(os.path.join(os.environ["EXIT_CODE_DIR"], os.environ["RANK"]), "w") as f:
            f.write(str(code))
    return code


if __name__ == "__main__":
    from megatron_ext.core.shutdown import skip_final_gc

    skip_final_gc()  # as the trainer's own entry point does
    sys.exit(rank_main(sys.argv[1:]))
