#!/usr/bin/env python
"""Benchmark: the fused output-layer loss against the output layer's matmul followed by a loss.

Forward + backward of the output layer and the loss together (the model's last step), TP = 1,
every method on the same inputs in one run:

    megatron_ce         the output layer's matmul (what megatron's ColumnParallelLinear runs at
                        TP = 1), then megatron-core's vocab_parallel_cross_entropy: the baseline
    unfused:<preset>    the output layer's matmul, then vocab_parallel_shaped_cross_entropy
    fused:<preset>      fused_output_shaped_cross_entropy: the logits a chunk at a time, the
                        gradients computed in the forward (the default, "precompute")
    recompute:<preset>  the same with gradient="recompute" (the logits computed again in the
                        backward), for the first preset

Time: the median of interleaved runs, as a ratio to megatron_ce. Memory: the peak above the
inputs and their gradients (CPU: the peak resident memory of a fresh process per method; CUDA:
torch.cuda.max_memory_allocated), as a ratio to megatron_ce's. The time of one chunked matmul of
the logits (what "recompute" adds) is printed too.
`--train` adds the tiny recipe's training tokens/s, fused against unfused, at vocabulary 32,768
(steps taking turns, as tools/bench_train.py does).

    python tools/bench_output_loss.py                   # CPU: 2,048 positions, h=256, fp32
    python tools/bench_output_loss.py --hidden 1024     # the issue's size (minutes on CPU)
    python tools/bench_output_loss.py --device cuda     # 8,192 positions, h=1,024, bf16
    python tools/bench_output_loss.py --train           # and training tokens/s
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron_ext.loss import (  # noqa: E402
    RewardShapingConfig,
    fused_output_shaped_cross_entropy,
    vocab_parallel_shaped_cross_entropy,
)
from megatron_ext.loss.output import chunk_rows_for  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BASELINE = "megatron_ce"


def _tool(name: str):
    """Another benchmark of tools/ as a module (for its helpers)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs(args):
    """hidden [T, h] and weight [V, h] (leaves, the dtype asked for) and targets [T]."""
    gen = torch.Generator().manual_seed(1234)
    dtype, device = DTYPES[args.dtype], args.device
    hidden = torch.randn(args.tokens, args.hidden, generator=gen).to(device, dtype)
    weight = (torch.randn(args.vocab, args.hidden, generator=gen) * args.hidden**-0.5).to(
        device, dtype
    )
    target = torch.randint(0, args.vocab, (args.tokens,), generator=gen).to(device)
    return hidden.requires_grad_(), weight.requires_grad_(), target


def _method(name: str, group):
    """fn(hidden, weight, target) -> per-position loss [T]."""
    from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

    if name == BASELINE:

        def megatron(h, w, t):
            logits = torch.matmul(h, w.t())  # [T, V]
            return vocab_parallel_cross_entropy(logits.unsqueeze(1), t.unsqueeze(1), tp_group=group)

        return megatron
    kind, preset = name.split(":")
    cfg = RewardShapingConfig.preset(preset)
    if kind == "recompute":
        return lambda h, w, t: fused_output_shaped_cross_entropy(
            h, w, t, cfg, group, gradient="recompute"
        )
    if kind == "unfused":
        return lambda h, w, t: vocab_parallel_shaped_cross_entropy(
            torch.matmul(h, w.t()), t, cfg, group
        )
    return lambda h, w, t: fused_output_shaped_cross_entropy(h, w, t, cfg, group)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _forward_backward(fn, h, w, t):
    return torch.autograd.grad(fn(h, w, t).sum(), (h, w))


def _timed(fn, h, w, t, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    _forward_backward(fn, h, w, t)
    _sync(device)
    return time.perf_counter() - t0


def _recompute_matmul(h, w, device: str) -> float:
    """Time of the fused backward's extra work: one chunked matmul of the logits."""
    rows = chunk_rows_for(h.shape[0], w.shape[0])
    out = torch.empty(rows, w.shape[0], dtype=h.dtype, device=h.device)
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        for r0 in range(0, h.shape[0], rows):
            r1 = min(h.shape[0], r0 + rows)
            torch.matmul(h[r0:r1], w.t(), out=out[: r1 - r0])
        _sync(device)
    return time.perf_counter() - t0


def measure_memory(args, name: str) -> dict:
    """Peak memory of one method above its inputs and their gradients (a fresh process on
    CPU)."""
    bench_loss = _tool("bench_loss")
    group = bench_loss._init_single_rank_group()
    h, w, t = _inputs(args)
    fn = _method(name, group)
    # Load what every method's process loads (the CPU kernels, the matmul library) with a small
    # call first, as a training loop's first step does.
    _forward_backward(fn, h[:8], w, t[:8])
    grad_bytes = h.numel() * h.element_size() + w.numel() * w.element_size()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        grads = _forward_backward(fn, h, w, t)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        before = bench_loss._reset_peak_rss()
        grads = _forward_backward(fn, h, w, t)
        peak = bench_loss._peak_rss()
    del grads
    return {"peak_bytes": peak, "extra_bytes": max(0, peak - before - grad_bytes)}


def bench(args) -> dict:
    group = _tool("bench_loss")._init_single_rank_group()
    methods = [BASELINE, *(f"{k}:{p}" for p in args.presets for k in ("unfused", "fused"))]
    methods.append(f"recompute:{args.presets[0]}")  # the other gradient strategy
    fns = {m: _method(m, group) for m in methods}
    h, w, t = _inputs(args)
    rows = chunk_rows_for(args.tokens, args.vocab)
    print(
        f"T={args.tokens} V={args.vocab} h={args.hidden} dtype={args.dtype} device={args.device} "
        f"threads={torch.get_num_threads()} repeats={args.repeats}; fused chunks of {rows} "
        f"positions ({-(-args.tokens // rows)} chunks)",
        flush=True,
    )
    for m in methods:  # warm-up
        _timed(fns[m], h, w, t, args.device)
    times: dict[str, list[float]] = {m: [] for m in methods}
    recompute: list[float] = []
    for _ in range(args.repeats):  # interleaved, so that drift hits every method alike
        for m in methods:
            times[m].append(_timed(fns[m], h, w, t, args.device))
        recompute.append(_recompute_matmul(h.detach(), w.detach(), args.device))
    memory: dict[str, dict] = {}
    if not args.no_memory:
        for m in methods:
            if args.device == "cuda":
                memory[m] = measure_memory(args, m)
                continue
            cmd = [sys.executable, __file__, "--_memory-of", m, "--device", args.device]
            cmd += ["--tokens", str(args.tokens), "--vocab", str(args.vocab)]
            cmd += ["--hidden", str(args.hidden), "--dtype", args.dtype]
            env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            memory[m] = json.loads(out.strip().splitlines()[-1])
    base_t = statistics.median(times[BASELINE])
    result_rows = []
    for m in methods:
        med = statistics.median(times[m])
        row = {"method": m, "median_s": med, "time_ratio": med / base_t}
        if memory:
            row["extra_bytes"] = memory[m]["extra_bytes"]
            row["extra_ratio"] = memory[m]["extra_bytes"] / max(1, memory[BASELINE]["extra_bytes"])
        result_rows.append(row)
    return {
        "args": {k: v for k, v in vars(args).items() if k != "memory_of"},
        "chunk_rows": rows,
        "recompute_matmul_s": statistics.median(recompute),
        "rows": result_rows,
    }


def table(result: dict) -> list[str]:
    """The benchmark's results as markdown lines."""
    a = result["args"]
    lines = [
        f"Output layer + loss, forward + backward: {a['tokens']} positions, V = {a['vocab']}, "
        f"h = {a['hidden']}, {a['dtype']}, {a['device']}, TP = 1, median of {a['repeats']}; "
        f"fused chunks of {result['chunk_rows']} positions",
        "",
        "| method | median ms | time vs megatron_ce | extra MiB | memory vs megatron_ce |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        extra = r.get("extra_bytes")
        mem = "-" if extra is None else f"{extra / 2**20:.0f}"
        ratio = "-" if extra is None else f"{r['extra_ratio']:.3f}x"
        lines.append(
            f"| {r['method']} | {r['median_s'] * 1e3:.1f} | {r['time_ratio']:.3f}x | {mem} | "
            f"{ratio} |"
        )
    fused = [r["median_s"] for r in result["rows"] if r["method"].startswith("fused:")]
    share = result["recompute_matmul_s"] / statistics.median(fused) if fused else float("nan")
    lines.append(
        f"(extra MiB: the peak above the inputs and their gradients; one chunked matmul of the "
        f"logits, what recompute adds: {result['recompute_matmul_s'] * 1e3:.1f} ms, "
        f"{100 * share:.0f}% of the fused time)"
    )
    return lines


def train_throughput(args) -> list[str]:
    """The tiny recipe's training tokens/s, fused against unfused output loss (round robin)."""
    from megatron.core.utils import unwrap_model

    from megatron_ext.models import model_preset
    from megatron_ext.training import (
        DataConfig,
        LoggingConfig,
        OptimizerConfig,
        TrainConfig,
        trainer_session,
    )
    from megatron_ext.training.synthetic import write_synthetic_dataset

    ratio_interval = _tool("bench_train")._ratio_interval
    model = model_preset("tiny", vocab_size=args.train_vocab)
    variants = [(p, fused) for p in args.presets for fused in (False, True)]
    rounds = args.train_warmup + args.train_steps
    gbs = 8
    with tempfile.TemporaryDirectory() as tmp:
        data = write_synthetic_dataset(
            os.path.join(tmp, "synthetic"), vocab_size=model.vocab_size, num_documents=400
        )
        config = TrainConfig(
            model=model,
            data=DataConfig(paths=(data,), split="100,0,0", cache_dir=os.path.join(tmp, "cache")),
            optimizer=OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0),
            logging=LoggingConfig(console=False),
            train_steps=rounds * len(variants),
            global_batch_size=gbs,
            micro_batch_size=4,
        )
        times: dict[tuple[str, bool], list[float]] = {v: [] for v in variants}
        with trainer_session(config) as trainer:
            inner = unwrap_model(trainer.model[-1])  # the chunk with the loss
            consumed = 0
            for r in range(rounds):
                for preset, fused in variants:
                    inner.shaping = RewardShapingConfig.preset(preset)
                    inner.fused_output_loss = fused
                    batches = trainer.plan.micro_batches(
                        trainer.train_data, consumed, trainer.device
                    )
                    consumed += gbs
                    _sync(trainer.device.type)
                    t0 = time.perf_counter()
                    trainer.train_step(batches, diagnostics=False)
                    _sync(trainer.device.type)
                    if r >= args.train_warmup:
                        times[(preset, fused)].append(time.perf_counter() - t0)
    tokens = gbs * model.seq_length
    lines = [
        f"Training tokens/s, tiny recipe at vocabulary {model.vocab_size} (sequence "
        f"{model.seq_length}, {gbs} sequences per step), {args.train_steps} timed steps each, "
        "round robin",
        "",
        "| loss | unfused tokens/s | fused tokens/s | fused / unfused | 95% interval |",
        "|---|---:|---:|---:|---:|",
    ]
    for preset in args.presets:
        slow, fast = times[(preset, False)], times[(preset, True)]
        unfused, fused = tokens / statistics.median(slow), tokens / statistics.median(fast)
        low, high = ratio_interval(slow, fast)
        lines.append(
            f"| {preset} | {unfused:.0f} | {fused:.0f} | {fused / unfused:.3f}x | "
            f"[{low:.3f}, {high:.3f}] |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--tokens", type=int, help="positions (default 2048 CPU, 8192 CUDA)")
    parser.add_argument("--vocab", type=int, default=151_936, help="vocabulary size V")
    parser.add_argument("--hidden", type=int, help="hidden size (default 256 CPU, 1024 CUDA)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default fp32 CPU, bf16 CUDA")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method")
    parser.add_argument(
        "--presets",
        nargs="+",
        default=["ce", "precision", "tail_suppression"],
        choices=RewardShapingConfig.PRESET_NAMES,
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--train", action="store_true", help="also the training tokens/s")
    parser.add_argument("--train-only", action="store_true", help="only the training tokens/s")
    parser.add_argument("--train-vocab", type=int, default=32_768)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--train-warmup", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--_memory-of", dest="memory_of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    args.device = "cuda" if cuda else "cpu"
    args.tokens = args.tokens or (8192 if cuda else 2048)
    args.hidden = args.hidden or (1024 if cuda else 256)
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")

    if args.memory_of:
        _tool("bench_loss")._print_result_and_exit(measure_memory(args, args.memory_of))
    lines: list[str] = []
    result: dict = {"kind": "output_loss"}
    if not args.train_only:
        result.update(bench(args))
        lines += table(result)
        print("\n".join(lines), flush=True)
    if args.train or args.train_only:
        train_lines = train_throughput(args)
        print("\n" + "\n".join(train_lines))
        lines += ["", *train_lines]
    result["markdown"] = lines
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    from megatron_ext.core.shutdown import skip_final_gc

    skip_final_gc()  # a quicker exit (see megatron_ext.core.shutdown)
    sys.exit(main())
