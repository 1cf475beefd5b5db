"""Compile the loss's CPU kernels into numba's disk cache: `python -m tests._warm_kernels serial`
(the one-thread twins that the gloo pool workers use) or `... parallel` (the multi-thread ones of
the 2-thread subprocesses). tests/conftest.py runs both at once, before any test."""

from __future__ import annotations

import sys


def warm(mode: str) -> None:
    import torch

    from megatron_ext.loss import RewardShapingConfig, vocab_parallel_shaped_cross_entropy
    from megatron_ext.loss.select import top_k_rows

    # A call of 4 rows takes the serial twin; 1024 rows with two threads the parallel kernel.
    rows, threads = {"serial": (4, 1), "parallel": (1024, max(2, torch.get_num_threads()))}[mode]
    torch.set_num_threads(threads)
    for preset in ("tail_suppression", "precision", "head_preservation"):
        logits = torch.randn(rows, 1, 512, requires_grad=True)
        target = torch.zeros(rows, 1, dtype=torch.long)
        cfg = RewardShapingConfig.preset(preset)
        loss, _ = vocab_parallel_shaped_cross_entropy(
            logits * 1, target, cfg, None, return_stats=True
        )
        loss.sum().backward()
    top_k_rows(torch.randn(rows, 600), 101)


if __name__ == "__main__":
    warm(sys.argv[1])
