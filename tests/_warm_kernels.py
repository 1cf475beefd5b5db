"""Compile the loss's CPU kernels into numba's disk cache: `python -m tests._warm_kernels MODE`,
where MODE is `serial` (the one-thread twins that the gloo pool workers use), `parallel-loss` (the
multi-thread loss kernels of the 2-thread subprocesses) or `parallel-top-k` (their top-k kernel).
tests/conftest.py runs the three at once, before any test: numba compiles one function at a time
per process, and the parallel kernels alone took twice as long as the serial ones (fresh cache,
2 cores: 30.2 s as two processes, serial and parallel; 26.5 s as these three)."""

from __future__ import annotations

import sys

MODES = ("serial", "parallel-loss", "parallel-top-k")


def warm(mode: str) -> None:
    if mode not in MODES:
        raise SystemExit(f"error: unknown mode {mode!r}; use one of {', '.join(MODES)}")
    import torch

    from megatron_ext.loss import RewardShapingConfig, vocab_parallel_shaped_cross_entropy
    from megatron_ext.loss.select import top_k_rows

    # A call of 4 rows takes the serial twin; 1024 rows with two threads the parallel kernel.
    serial = mode == "serial"
    rows = 4 if serial else 1024
    torch.set_num_threads(1 if serial else max(2, torch.get_num_threads()))
    if mode != "parallel-top-k":
        for preset in ("tail_suppression", "precision", "head_preservation"):
            logits = torch.randn(rows, 1, 512, requires_grad=True)
            target = torch.zeros(rows, 1, dtype=torch.long)
            cfg = RewardShapingConfig.preset(preset)
            loss, _ = vocab_parallel_shaped_cross_entropy(
                logits * 1, target, cfg, None, return_stats=True
            )
            loss.sum().backward()
    if mode != "parallel-loss":
        top_k_rows(torch.randn(rows, 600), 101)


if __name__ == "__main__":
    warm(sys.argv[1])
