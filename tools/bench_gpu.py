#!/usr/bin/env python
"""The GPU check's benchmarks (tools/gpu_check.sh runs them): the loss, training, one report.

    python tools/bench_gpu.py loss  --json loss.json       # V=151,936, 8,192 positions, bf16
    python tools/bench_gpu.py train --json train.json      # ~100M dense model, seq 2,048, bf16
    python tools/bench_gpu.py report loss.json train.json tests.txt --out table.md
    python tools/bench_gpu.py loss --device cpu --small    # the same code on CPU, tiny sizes

loss: forward and backward time of every preset on the same logits, against megatron-core's
vocab_parallel_cross_entropy and torch's cross_entropy (CUDA events, medians of interleaved
runs), peak extra memory, and achieved bandwidth: the bytes every loss must move at least (read
the logits once, write their gradient once, 2 x V x positions x the dtype's size) over the time,
and as a share of the device's peak (H100 SXM 3.35 TB/s, H200 4.8 TB/s, from the device name).

train: tools/bench_train.py (the trainer's own step, every preset against megatron-core's CE in
round robin) on a ~100M-parameter Qwen3-style dense model registered here as `dense_100m`
(Qwen3's 151,936-token vocabulary, tied embeddings: 103M parameters), sequence 2,048.

On CPU with TRITON_INTERPRET=1 in the environment the presets go through the Triton kernels
under the interpreter (the code a GPU compiles); the figures then mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

PEAK_BANDWIDTH = (  # (substring of the device name, bytes/s), the first match wins
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM
    ("GH200", 4.0e12),
    ("A100", 2.0e12),
)
BASELINES = ("megatron_ce", "torch_ce")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peak_bandwidth(name: str) -> float | None:
    """Peak memory bandwidth (bytes/s) of a device by its name, or None when unknown."""
    for key, value in PEAK_BANDWIDTH:
        if key in name:
            return value
    return None


# ---------------------------------------------------------------------------------------------
# loss


def _tool(name: str):
    """Another benchmark of tools/ as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _init_group(device: str) -> dist.ProcessGroup:
    backend = "nccl" if device == "cuda" else "gloo"
    return _tool("bench_loss")._init_single_rank_group(backend)


def _loss_fn(name: str, group: dist.ProcessGroup):
    from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

    from megatron_ext.loss import RewardShapingConfig, vocab_parallel_shaped_cross_entropy

    if name == "megatron_ce":
        return lambda x, t: vocab_parallel_cross_entropy(x, t, tp_group=group)
    if name == "torch_ce":
        return lambda x, t: torch.nn.functional.cross_entropy(
            x.view(-1, x.shape[-1]), t.view(-1), reduction="none"
        )
    cfg = RewardShapingConfig.preset(name)
    return lambda x, t: vocab_parallel_shaped_cross_entropy(x, t, cfg, group)


def _inputs(tokens: int, vocab: int, dtype: torch.dtype, device: str):
    """Logits shaped like a language model's (a few strong candidates over a broad tail, as in
    tools/bench_loss.py), [tokens, 1, vocab], and targets."""
    gen = torch.Generator(device=device).manual_seed(1234)
    logits = torch.empty(tokens, 1, vocab, dtype=dtype, device=device)
    for r0 in range(0, tokens, 512):
        rows = torch.randn(min(512, tokens - r0), 1, vocab, generator=gen, device=device) * 2.0
        rows[..., : vocab // 64] += 4.0
        logits[r0 : r0 + 512] = rows
    target = torch.randint(0, vocab, (tokens, 1), generator=gen, device=device)
    return logits, target


class _Clock:
    """Wall time between marks: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.marks = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def spans(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def _run(fn, base: torch.Tensor, target: torch.Tensor, device: str) -> tuple[float, float]:
    """(forward s, backward s) of one call on a fresh copy of the logits."""
    x = base.clone().requires_grad_()  # fp32 logits are overwritten in place: a fresh copy
    if device == "cuda":
        torch.cuda.synchronize()
    clock = _Clock(device)
    clock.mark()
    loss = fn(x, target)
    clock.mark()
    (grad,) = torch.autograd.grad(loss.sum(), x)
    clock.mark()
    fwd, bwd = clock.spans()
    del grad, loss, x
    return fwd, bwd


def _peak_extra(fn, base, target, device: str) -> int | None:
    if device != "cuda":
        return None
    x = base.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    (grad,) = torch.autograd.grad(fn(x, target).sum(), x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del grad, x
    return peak


def bench_loss(args) -> dict:
    from megatron_ext.loss import RewardShapingConfig, functional

    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        functional.TRITON_ON_CPU = True  # the Triton kernels under the interpreter
    group = _init_group(args.device)
    methods = [*BASELINES, *RewardShapingConfig.PRESET_NAMES]
    fns = {m: _loss_fn(m, group) for m in methods}
    dtype = DTYPES[args.dtype]
    base, target = _inputs(args.tokens, args.vocab, dtype, args.device)
    for m in methods:  # warm-up: compile every kernel first
        for _ in range(args.warmup):
            _run(fns[m], base, target, args.device)
    times = {m: [] for m in methods}
    for _ in range(args.repeats):  # interleaved, so that drift hits every method alike
        for m in methods:
            times[m].append(_run(fns[m], base, target, args.device))
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak_bw = peak_bandwidth(name) if args.device == "cuda" else None
    compulsory = 2 * args.tokens * args.vocab * base.element_size()
    rows = []
    for m in methods:
        fwd = statistics.median(t[0] for t in times[m])
        bwd = statistics.median(t[1] for t in times[m])
        total = statistics.median(t[0] + t[1] for t in times[m])
        bandwidth = compulsory / total
        rows.append(
            {
                "method": m,
                "forward_ms": fwd * 1e3,
                "backward_ms": bwd * 1e3,
                "total_ms": total * 1e3,
                "peak_extra_mib": (
                    None
                    if (p := _peak_extra(fns[m], base, target, args.device)) is None
                    else p / 2**20
                ),  # fmt: skip
                "bandwidth_gbs": bandwidth / 1e9,
                "peak_fraction": bandwidth / peak_bw if peak_bw else None,
            }
        )
    base_ms = next(r["total_ms"] for r in rows if r["method"] == "megatron_ce")
    for r in rows:
        r["vs_megatron_ce"] = base_ms / r["total_ms"]  # > 1: faster than megatron-core
    result = {
        "device": name,
        "peak_bandwidth_tbs": peak_bw / 1e12 if peak_bw else None,
        "tokens": args.tokens,
        "vocab": args.vocab,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "rows": rows,
    }
    if args.sweep and args.device == "cuda":
        result["sweep"] = _sweep(base, target, group, args)
    return result


def _sweep(base, target, group, args) -> list[dict]:
    """Forward + backward time of two presets under other launch settings of the kernels."""
    from megatron_ext.loss import _triton_kernels as tk

    saved = tk.CUDA_PROGRAMS_PER_SM, tk.CUDA_NUM_WARPS
    out = []
    try:
        for warps in (8, 16):
            for per_sm in (1, 2, 4):
                tk.CUDA_PROGRAMS_PER_SM, tk.CUDA_NUM_WARPS = per_sm, warps
                row = {"programs_per_sm": per_sm, "num_warps": warps}
                for name in ("ce", "tail_suppression"):
                    fn = _loss_fn(name, group)
                    _run(fn, base, target, args.device)  # compile
                    row[name] = (
                        statistics.median(
                            sum(_run(fn, base, target, args.device)) for _ in range(args.repeats)
                        )
                        * 1e3
                    )
                out.append(row)
    finally:
        tk.CUDA_PROGRAMS_PER_SM, tk.CUDA_NUM_WARPS = saved
    return out


# ---------------------------------------------------------------------------------------------
# train


def dense_100m():
    """A ~100M-parameter Qwen3-style dense model: Qwen3's vocabulary (tied embeddings, 77.8M
    parameters) and 8 layers of width 512 (25.2M): 103M in all."""
    from megatron_ext.models.config import QWEN3_VOCAB_SIZE, ModelConfig

    return ModelConfig(
        name="dense_100m",
        vocab_size=QWEN3_VOCAB_SIZE,
        hidden_size=512,
        num_layers=8,
        num_attention_heads=8,
        num_query_groups=4,
        head_dim=64,
        ffn_hidden_size=1536,
        seq_length=2048,
        tie_embeddings=True,
    )


_TRAIN_ROW = re.compile(r"^(\w+)\s+(\d+)\s+([\d.]+)x\s+\[([\d.]+), ([\d.]+)\]\s+([\d.]+|nan)x")


def bench_train(args) -> dict:
    from megatron_ext.models.config import MODEL_PRESETS

    MODEL_PRESETS.setdefault("dense_100m", dense_100m)
    bench = _tool("bench_train")
    if args.small:
        argv = ["--model", "tiny", "--steps", "1", "--warmup", "0"]
    else:
        argv = ["--model", "dense_100m", "--steps", str(args.steps), "--warmup", "2"]
        argv += ["--global-batch-size", "8", "--micro-batch-size", "4"]
        argv += ["--bf16"] if args.device == "cuda" else []
    saved_argv = sys.argv
    sys.argv = ["bench_train.py", *argv]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = bench.main()
    finally:
        sys.argv = saved_argv
    text = out.getvalue()
    print(text, end="")
    if rc:
        raise SystemExit(f"bench_train failed with {rc}")
    rows = []
    for line in text.splitlines():
        if m := _TRAIN_ROW.match(line):
            name, rate, ratio, low, high, vs_ce = m.groups()
            rows.append(
                {
                    "loss": name,
                    "tokens_per_s": float(rate),
                    "vs_megatron_ce": float(ratio),
                    "interval": [float(low), float(high)],
                    "vs_ce": float(vs_ce),
                }
            )
    if not rows:
        raise SystemExit("bench_train printed no table")
    model = MODEL_PRESETS["dense_100m" if not args.small else "tiny"]()
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "model": model.name,
        "parameters": model.num_parameters(),
        "seq_length": model.seq_length,
        "header": text.splitlines()[0] if text else "",
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------
# report


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def loss_table(data: dict) -> list[str]:
    """The loss benchmark's markdown table and notes."""
    peak = data["peak_bandwidth_tbs"]
    lines = [
        f"Loss forward + backward on {data['device']}: {data['tokens']} positions, "
        f"V = {data['vocab']}, {data['dtype']}, TP = 1, median of {data['repeats']}",
        "",
        "| method | forward ms | backward ms | total ms | speed vs megatron_ce | "
        "peak extra MiB | GB/s (read logits + write grad) | % of peak "
        f"({_fmt(peak, '.2f')} TB/s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        share = None if r["peak_fraction"] is None else 100 * r["peak_fraction"]
        lines.append(
            f"| {r['method']} | {r['forward_ms']:.3f} | {r['backward_ms']:.3f} | "
            f"{r['total_ms']:.3f} | {r['vs_megatron_ce']:.2f}x | "
            f"{_fmt(r['peak_extra_mib'], '.0f')} | {r['bandwidth_gbs']:.0f} | "
            f"{_fmt(share, '.1f')} |"
        )
    lines.append(
        "(bandwidth counts the bytes every loss must move, one read of the logits and one write "
        "of their gradient; the shaped loss also writes and re-reads a fp32 buffer, as "
        "megatron-core keeps one: 12 bytes per bf16 logit in all)"
    )
    for s in data.get("sweep", []):
        lines.append(
            f"  launch sweep: programs/SM {s['programs_per_sm']}, warps {s['num_warps']}: "
            f"ce {s['ce']:.3f} ms, tail_suppression {s['tail_suppression']:.3f} ms"
        )
    return lines


def train_table(data: dict) -> list[str]:
    """The training benchmark's markdown table."""
    lines = [
        f"Training on {data['device']}: {data['model']} ({data['parameters'] / 1e6:.1f}M "
        f"parameters), sequence {data['seq_length']}",
        f"({data['header']})",
        "",
        "| loss | tokens/s | vs megatron_ce | 95% interval | vs ce |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        low, high = r["interval"]
        lines.append(
            f"| {r['loss']} | {r['tokens_per_s']:.0f} | {r['vs_megatron_ce']:.3f}x | "
            f"[{low:.3f}, {high:.3f}] | {r['vs_ce']:.3f}x |"
        )
    return lines


def report(paths: list[str]) -> str:
    """One report from the JSON of `loss` and `train` and the tests' output (its last line), in
    the order given; a missing file is named as a failed step."""
    lines = []
    for path in paths:
        text = Path(path).read_text() if Path(path).exists() else ""
        lines.append("")
        if not text:
            lines.append(f"{path}: missing (that step failed or timed out)")
        elif not path.endswith(".json"):
            summary = [
                ln.strip("= ")
                for ln in text.splitlines()
                if re.search(r"\d+ (passed|failed|skipped|deselected|errors?)\b|no tests ran", ln)
            ]
            lines.append(f"GPU tests: {summary[-1] if summary else 'no pytest summary'}")
        else:
            data = json.loads(text)
            if data.get("kind") == "output_loss":  # tools/bench_output_loss.py's own table
                lines += data["markdown"]
            else:
                lines += loss_table(data) if "vocab" in data else train_table(data)
    return "\n".join(lines).lstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("loss", "train"):
        p = sub.add_parser(name)
        p.add_argument("--device", choices=["cuda", "cpu"], default=None)
        p.add_argument("--small", action="store_true", help="tiny sizes (a smoke run on CPU)")
        p.add_argument("--json", help="write the results to this file")
    loss = sub.choices["loss"]
    loss.add_argument("--tokens", type=int, default=8192)
    loss.add_argument("--vocab", type=int, default=151_936)
    loss.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    loss.add_argument("--repeats", type=int, default=10)
    loss.add_argument("--warmup", type=int, default=2)
    loss.add_argument("--sweep", action="store_true", help="also try other launch settings")
    sub.choices["train"].add_argument("--steps", type=int, default=20)
    rep = sub.add_parser("report")
    rep.add_argument("inputs", nargs="+", help="loss/train JSON files and the tests' output")
    rep.add_argument("--out", help="also write the table here")
    args = parser.parse_args()

    if args.command == "report":
        text = report(args.inputs)
        print(text, end="")
        if args.out:
            Path(args.out).write_text(text)
        return 0
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.command == "loss":
        if args.small:
            args.tokens, args.vocab, args.repeats, args.warmup = 16, 1024, 1, 1
        result = bench_loss(args)
        print("\n".join(loss_table(result)))
    else:
        result = bench_train(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    from megatron_ext.core.shutdown import skip_final_gc

    skip_final_gc()  # a quicker exit (see megatron_ext.core.shutdown)
    sys.exit(main())
