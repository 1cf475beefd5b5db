#!/usr/bin/env python
"""Benchmark: the reward-shaped loss against megatron-core's vocab_parallel_cross_entropy.

Forward + backward time and peak memory of every preset on the same inputs, in one run, printed
as ratios to megatron-core's cross-entropy. On CPU the peak is the process's peak resident memory
(VmHWM, reset before the loss), measured in a fresh subprocess per method that first loads the
loss's CPU kernels (reported apart) and makes one call on 8 positions; on CUDA it is
torch.cuda.max_memory_allocated.

    python tools/bench_loss.py                      # T=4096, V=32768, fp32, on CUDA if present
    python tools/bench_loss.py --tokens 8192 --vocab 151936 --dtype bf16 --device cuda
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NoReturn

import torch
import torch.distributed as dist

from megatron_ext.loss import RewardShapingConfig, vocab_parallel_shaped_cross_entropy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BASELINE = "megatron_ce"


def _init_single_rank_group(backend: str = "gloo") -> dist.ProcessGroup:
    """A one-rank group on a free local port (unless one is initialized), destroyed at exit on
    every path, failures too, as PyTorch asks."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        dist.init_process_group(backend, rank=0, world_size=1)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return dist.group.WORLD


def _print_result_and_exit(result: dict) -> NoReturn:
    """Print a memory run's result and end its process at once, without the interpreter's
    finalization. A gloo worker thread that drops the tensors of the last collective needs the
    GIL, and a thread that asks for it while the interpreter finalizes is ended in a way that
    aborts the process ("terminate called without an active exception", exit -6; core dump:
    ProcessGroupGloo::AsyncWork::~AsyncWork -> decref_pyobject -> take_gil -> pthread_exit).
    It hit 4 of 939 memory runs made three at a time on 2 cores, each after its result was
    printed (with the group destroyed first as well: 3 of 759)."""
    print(json.dumps(result), flush=True)
    sys.stderr.flush()
    os._exit(0)


def _make_inputs(args) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    logits = torch.empty(args.tokens, 1, args.vocab, dtype=DTYPES[args.dtype], device=args.device)
    for r0 in range(0, args.tokens, 256):  # in slices, so that making inputs sets no memory peak
        # Logits shaped like a language model's: a few strong candidates over a broad tail.
        rows = torch.randn(min(256, args.tokens - r0), 1, args.vocab, generator=gen) * 2.0
        rows[..., : args.vocab // 64] += 4.0
        logits[r0 : r0 + 256] = rows
    target = torch.randint(0, args.vocab, (args.tokens, 1), generator=gen)
    return logits, target.to(args.device)


def _method(name: str, group: dist.ProcessGroup):
    from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

    if name == BASELINE:
        return lambda x, t: vocab_parallel_cross_entropy(x, t, tp_group=group)
    cfg = RewardShapingConfig.preset(name)
    return lambda x, t: vocab_parallel_shaped_cross_entropy(x, t, cfg, group)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _forward_backward(fn, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # autograd.grad hands back the loss's own gradient buffer: no accumulation into x.grad, which
    # could copy it and would measure autograd rather than the loss.
    (grad,) = torch.autograd.grad(fn(x, target).sum(), x)
    return grad


def _run_once(fn, base: torch.Tensor, target: torch.Tensor, device: str) -> float:
    # Both losses overwrite fp32 logits in place: every run gets a fresh copy, outside the timing.
    x = base.clone().requires_grad_()
    _sync(device)
    t0 = time.perf_counter()
    _forward_backward(fn, x, target)
    _sync(device)
    return time.perf_counter() - t0


def measure_memory(args, name: str) -> dict:
    """Peak memory of one method (run in a fresh process on CPU)."""
    group = _init_single_rank_group()
    fn = _method(name, group)
    base, target = _make_inputs(args)
    # Every process loads the same runtime first: the loss's compiled CPU kernels (numba and
    # LLVM, loaded once per process; its cost is reported apart as runtime_bytes). Then one
    # small call, as every call after a training loop's first.
    runtime_before = _peak_rss() if args.device != "cuda" else 0
    warm = torch.randn(2, 1, 512, requires_grad=True)
    _forward_backward(_method("tail_suppression", group), warm, torch.zeros(2, 1, dtype=torch.long))
    runtime_bytes = (_peak_rss() - runtime_before) if args.device != "cuda" else 0
    _forward_backward(fn, base[:8].clone().requires_grad_(), target[:8])
    x = base.requires_grad_()
    del base
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        _forward_backward(fn, x, target)
        torch.cuda.synchronize()
        peak, before = torch.cuda.max_memory_allocated(), start
    else:
        before = _reset_peak_rss()
        _forward_backward(fn, x, target)
        peak = _peak_rss()
    return {"peak_bytes": peak, "before_bytes": before, "runtime_bytes": runtime_bytes}


def _peak_rss() -> int:
    """This process's peak resident memory (VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory needs Linux")


def _reset_peak_rss() -> int:
    """Reset the peak to the current resident memory (Linux clear_refs); return it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _peak_rss()


def _read_and_close(f) -> str:
    f.seek(0)
    with f:
        return f.read()


def _memory_in_subprocesses(args, methods: list[str]) -> dict[str, dict]:
    """measure_memory of each method in a fresh process of its own (a process's peak resident
    memory cannot be reset below what it already holds), as many at once as there are CPUs: each
    process's peak is its own, whatever runs beside it."""
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    pending, running, memory = list(methods), {}, {}
    while pending or running:
        while pending and len(running) < max(1, os.cpu_count() or 1):
            m = pending.pop(0)
            cmd = [sys.executable, __file__, "--_memory-of", m, "--tokens", str(args.tokens)]
            cmd += ["--vocab", str(args.vocab), "--dtype", args.dtype, "--device", args.device]
            # Files, not pipes: no process blocks on a full pipe while another one is awaited.
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            running[m] = (subprocess.Popen(cmd, stdout=out, stderr=err, env=env), out, err)
        m = next(iter(running))
        proc, out, err = running.pop(m)
        proc.wait()
        text, errors = _read_and_close(out), _read_and_close(err)
        if proc.returncode:
            raise RuntimeError(
                f"the memory run of {m} failed ({proc.returncode}):\n{errors[-3000:]}"
            )
        memory[m] = json.loads(text.strip().splitlines()[-1])
    return memory


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4096, help="positions T (s * b)")
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary size V")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method")
    parser.add_argument(
        "--presets", nargs="+", default=list(RewardShapingConfig.PRESET_NAMES), help="loss presets"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--_memory-of", dest="memory_of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.memory_of:
        _print_result_and_exit(measure_memory(args, args.memory_of))

    methods = [BASELINE, *args.presets]
    group = _init_single_rank_group()
    fns = {m: _method(m, group) for m in methods}
    base, target = _make_inputs(args)
    print(
        f"T={args.tokens} V={args.vocab} dtype={args.dtype} device={args.device} "
        f"threads={torch.get_num_threads()} repeats={args.repeats}",
        flush=True,
    )
    for m in methods:  # warm-up
        _run_once(fns[m], base, target, args.device)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeats):  # interleaved, so drift hits every method alike
        for m in methods:
            times[m].append(_run_once(fns[m], base, target, args.device))

    memory: dict[str, dict] = {}
    if not args.no_memory and args.device == "cuda":
        memory = {m: measure_memory(args, m) for m in methods}
    elif not args.no_memory:
        memory = _memory_in_subprocesses(args, methods)

    base_t = statistics.median(times[BASELINE])
    rows = []
    header = f"{'method':<20}{'median ms':>11}{'time ratio':>12}"
    if memory:
        header += f"{'peak MiB':>11}{'extra MiB':>11}{'peak ratio':>12}"
    print(header)
    for m in methods:
        t = statistics.median(times[m])
        row = {"method": m, "median_s": t, "time_ratio": t / base_t}
        line = f"{m:<20}{t * 1e3:>11.1f}{t / base_t:>11.3f}x"
        if memory:
            peak = memory[m]["peak_bytes"]
            extra = peak - memory[m]["before_bytes"]
            ratio = peak / memory[BASELINE]["peak_bytes"]
            row.update(peak_bytes=peak, extra_bytes=extra, peak_ratio=ratio)
            line += f"{peak / 2**20:>11.0f}{extra / 2**20:>11.0f}{ratio:>11.3f}x"
        rows.append(row)
        print(line)
    if memory and args.device != "cuda":
        runtime = memory[BASELINE]["runtime_bytes"] / 2**20
        print(
            f"(every process first loads the loss's CPU kernels, numba + LLVM: "
            f"+{runtime:.0f} MiB resident, once per process, counted in every peak above)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    from megatron_ext.core.shutdown import skip_final_gc

    skip_final_gc()  # a quicker exit (see megatron_ext.core.shutdown)
    main()
