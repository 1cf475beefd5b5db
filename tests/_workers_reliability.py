"""Per-rank functions of the reliability tests: train with NaN faults injected at given steps."""

from __future__ import annotations

import os
from typing import Any


def _checksum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def train_with_faults(config, faults: list[dict[str, Any]]) -> dict[str, Any]:
    """Run `config` from scratch on this rank with faults injected; report what happened.

    faults: {"kind", "step", "rank"} with kind
      - "nan_logits": the embedding output of that step's forward is NaN (so are the loss and
        the gradients);
      - "nan_grad": one weight's gradient is NaN that step (the loss stays finite);
      - "nan_weight": one weight is set to NaN after that step's update.
    """
    import torch
    import torch.distributed as dist
    from megatron.core.utils import unwrap_model

    from megatron_ext.training import trainer_session

    out: dict[str, Any] = {"checksums": {}, "error": None}
    with trainer_session(config) as trainer:
        inner = unwrap_model(trainer.model[0])  # the one model chunk (no virtual pipeline here)
        rank = dist.get_rank()
        mine = [f for f in faults if f["rank"] == rank]
        original = trainer.train_step
        calls = {"n": 0}

        def train_step(batches, diagnostics=True):
            calls["n"] += 1
            step = calls["n"]
            handles = []
            for fault in mine:
                if fault["step"] != step:
                    continue
                if fault["kind"] == "nan_logits":
                    handles.append(
                        inner.embedding.register_forward_hook(lambda m, i, o: o * float("nan"))
                    )
                elif fault["kind"] == "nan_grad":
                    weight = inner.decoder.layers[0].mlp.linear_fc1.weight
                    handles.append(weight.register_hook(lambda g: g * float("nan")))
            try:
                result = original(batches, diagnostics)
            finally:
                for handle in handles:
                    handle.remove()
            for fault in mine:
                if fault["step"] == step and fault["kind"] == "nan_weight":
                    with torch.no_grad():
                        inner.decoder.final_layernorm.weight[0] = float("nan")
            out["checksums"][step] = _checksum(inner)
            return result

        trainer.train_step = train_step
        try:
            result = trainer.run()
            out.update(
                records=result.records,
                skipped_steps=result.skipped_steps,
                final_step=result.final_step,
            )
        except Exception as exc:  # noqa: BLE001 - the test checks its type and message
            out["error"] = (type(exc).__name__, str(exc))
    save_dir = config.checkpoint.save_dir
    if save_dir and os.path.isdir(save_dir):
        out["save_dir"] = sorted(os.listdir(save_dir))
    return out
