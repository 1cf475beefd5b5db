"""The loss presets side by side: a byte-level bigram model trained on real text with each.

    python -m megatron_ext.demo [--steps 80] [--batch 4096]

Text: CPython's standard library sources on this machine (no download). Every preset trains the
same bigram logits table from the same start on the same batches; the table printed at the end
shows what the paper reports at scale: comparable perplexity, lower entropy for precision-oriented
rewards (beta < 0, lambda_tail < 0) and higher entropy for diversity-oriented ones (beta > 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import sysconfig
import time
from pathlib import Path

import torch

from megatron_ext.loss import RewardShapingConfig, vocab_parallel_shaped_cross_entropy

__all__ = ["load_stdlib_bytes", "train_bigram", "main"]

VOCAB = 256  # bytes


def load_stdlib_bytes(max_bytes: int = 2_000_000) -> torch.Tensor:
    """Bytes of the running interpreter's standard library sources, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if total == 0:
        raise RuntimeError(f"no Python sources found under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def train_bigram(
    text: torch.Tensor, config: RewardShapingConfig, steps: int, batch: int, seed: int = 0
) -> dict[str, float]:
    """Train bigram logits [256, 256] with `config`; return held-out statistics."""
    gen = torch.Generator().manual_seed(seed)
    split = int(len(text) * 0.9)
    train, held_out = text[:split], text[split : split + 65_537]
    table = torch.zeros(VOCAB, VOCAB, requires_grad=True)
    opt = torch.optim.Adam([table], lr=0.2)
    for _ in range(steps):
        pos = torch.randint(0, len(train) - 1, (batch,), generator=gen)
        logits = table[train[pos]].unsqueeze(1)  # [batch, 1, V]: s = batch, b = 1
        loss = vocab_parallel_shaped_cross_entropy(
            logits, train[pos + 1].unsqueeze(1), config, None
        )
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    with torch.no_grad():
        logits = table[held_out[:-1]].unsqueeze(1).clone()
        loss, stats = vocab_parallel_shaped_cross_entropy(
            logits, held_out[1:].unsqueeze(1), config, None, return_stats=True
        )
    ce = -stats.target_logprob.mean().item()
    return {
        "loss": loss.mean().item(),
        "ce": ce,
        "ppl": float(torch.tensor(ce).exp()),
        "entropy": stats.entropy.mean().item(),
        "p_target": stats.target_prob.mean().item(),
        "topk_mass": stats.topk_mass.mean().item(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps per preset")
    parser.add_argument("--batch", type=int, default=4096, help="positions per step")
    parser.add_argument(
        "--top-k", type=int, default=20, help="k of the rank-aware presets (of 256)"
    )
    args = parser.parse_args(argv)
    text = load_stdlib_bytes()
    print(
        f"bigram model over bytes, {len(text):,} bytes of CPython stdlib source, "
        f"{args.steps} steps x {args.batch} positions per preset; held-out statistics:"
    )
    header = (
        f"{'preset':<18}{'loss':>8}{'CE':>8}{'ppl':>8}{'entropy':>9}{'p(x)':>8}"
        f"{'top-k mass':>12}{'s':>6}"
    )
    print(header)
    print("-" * len(header))
    for name in RewardShapingConfig.PRESET_NAMES:
        # One k for every preset: the rank-aware rewards and the top-k mass statistic use it.
        cfg = dataclasses.replace(RewardShapingConfig.preset(name), top_k=args.top_k)
        t0 = time.perf_counter()
        r = train_bigram(text, cfg, args.steps, args.batch)
        print(
            f"{name:<18}{r['loss']:>8.3f}{r['ce']:>8.3f}{r['ppl']:>8.2f}{r['entropy']:>9.3f}"
            f"{r['p_target']:>8.3f}{r['topk_mass']:>12.3f}{time.perf_counter() - t0:>6.1f}"
        )
    print(f"(top-k mass with k={args.top_k}; CE and ppl are the cross-entropy of the same model)")


if __name__ == "__main__":
    from megatron_ext.core.shutdown import skip_final_gc

    skip_final_gc()  # a quicker exit (see megatron_ext.core.shutdown)
    main()
