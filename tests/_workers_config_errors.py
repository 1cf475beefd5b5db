"""Per-rank functions of tests/test_config_errors.py (run on the gloo pools)."""

from __future__ import annotations

import time
from typing import Any
from unittest import mock


def pretrain_outcome(config) -> dict[str, Any]:
    """pretrain(config) on this rank, counting the set-up work done before it returned or raised.

    Returns the exception raised (type name and message, None when the run finished), the seconds
    until then, the start and final steps of a finished run, and how many times the run created
    its process group, initialised megatron's parallel state, built the model and ran a step.
    """
    from megatron.core import parallel_state

    from megatron_ext.training import builders, session, trainer

    counted = {
        "init_distributed": mock.patch.object(
            session, "init_distributed", wraps=session.init_distributed
        ),
        "initialize_model_parallel": mock.patch.object(
            parallel_state,
            "initialize_model_parallel",
            wraps=parallel_state.initialize_model_parallel,
        ),
        "build_model": mock.patch.object(builders, "build_model", wraps=builders.build_model),
        "train_step": mock.patch.object(
            trainer.Trainer, "train_step", autospec=True, side_effect=trainer.Trainer.train_step
        ),
    }
    mocks = {name: patch.start() for name, patch in counted.items()}
    out: dict[str, Any] = {"error": None, "message": None}
    start = time.perf_counter()
    try:
        result = trainer.pretrain(config)
        out.update(start_step=result.start_step, final_step=result.final_step)
    except Exception as exc:  # noqa: BLE001 - the test checks what was raised
        out.update(error=type(exc).__name__, message=str(exc))
    finally:
        out["seconds"] = time.perf_counter() - start
        for patch in counted.values():
            patch.stop()
    out["calls"] = {name: m.call_count for name, m in mocks.items()}
    return out


def pretrain_with_a_bad_label(config, rank: int = 1) -> dict[str, Any]:
    """pretrain_outcome, with one label of `rank`'s first micro-batch set far outside the
    vocabulary (the inputs stay valid: what a label-building bug would do)."""
    import torch.distributed as dist

    from megatron_ext.training import trainer

    original = trainer.forward_step
    corrupted = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        if dist.get_rank() == rank and not corrupted:
            batch.labels[0, 3] = 1_000_000
            corrupted.append(True)
        return original(iter([batch]), model)

    with mock.patch.object(trainer, "forward_step", forward_step):
        return pretrain_outcome(config)
