"""Training throughput with the reward-shaped loss presets against plain cross-entropy.

One process runs the same model on the same data with every loss, interleaved over several
rounds, and prints tokens/s (median over the timed steps of all rounds) and the ratio to plain
cross-entropy. "megatron_ce" is megatron-core's own vocab_parallel_cross_entropy (the baseline);
"ce" is our shaped loss with the CE preset (it also computes the entropy / p(x) / top-k mass
diagnostics the trainer logs). The project's target is >= 0.97x for every preset.

    python tools/bench_train.py                                  # tiny model on CPU
    python tools/bench_train.py --vocab-size 32768 --steps 20    # a loss-heavier setting
    torchrun --nproc-per-node 2 tools/bench_train.py --tp 2      # several ranks
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ext.loss import RewardShapingConfig
from megatron_ext.models import model_preset
from megatron_ext.training import (
    DataConfig,
    LoggingConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainConfig,
    pretrain,
)
from megatron_ext.training.synthetic import write_synthetic_dataset

BASELINE = "megatron_ce"


def _init_process_group() -> None:
    if dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny", help="model preset (default: tiny)")
    p.add_argument("--vocab-size", type=int, help="override the preset's vocabulary size")
    p.add_argument("--seq-length", type=int, help="override the preset's sequence length")
    p.add_argument("--num-layers", type=int, help="override the preset's number of layers")
    p.add_argument(
        "--presets",
        nargs="+",
        default=list(RewardShapingConfig.PRESET_NAMES),
        help="shaping presets to time (default: all)",
    )
    p.add_argument("--steps", type=int, default=30, help="steps per run (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed first steps per run (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--data", help="indexed dataset prefix (default: a synthetic one)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: steadier timings)"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.steps <= args.warmup:
        p.error(f"--steps={args.steps} must exceed --warmup={args.warmup}")

    overrides = {
        k: v
        for k, v in (
            ("vocab_size", args.vocab_size),
            ("seq_length", args.seq_length),
            ("num_layers", args.num_layers),
        )
        if v is not None
    }
    model = model_preset(args.model, **overrides)
    _init_process_group()
    rank0 = dist.get_rank() == 0
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = os.path.join(tmp, "synthetic")
            if rank0:
                write_synthetic_dataset(data, vocab_size=model.vocab_size, num_documents=400)
            dist.barrier()
        base = TrainConfig(
            model=model,
            parallel=ParallelConfig(tensor=args.tp),
            data=DataConfig(paths=(data,), split="100,0,0", cache_dir=os.path.join(tmp, "cache")),
            optimizer=OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0),
            logging=LoggingConfig(console=False),
            train_steps=args.steps,
            global_batch_size=args.global_batch_size,
            micro_batch_size=args.micro_batch_size,
            bf16=args.bf16,
        )
        names = [BASELINE, *args.presets]
        step_times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.rounds):
            for name in names:
                if name == BASELINE:
                    config = dataclasses.replace(base, native_cross_entropy=True)
                else:
                    config = dataclasses.replace(base, shaping=RewardShapingConfig.preset(name))
                records = pretrain(config).records
                step_times[name] += [r["step_time_s"] for r in records[args.warmup :]]
    tokens = args.global_batch_size * model.seq_length
    rate = {n: tokens / statistics.median(t) for n, t in step_times.items()}
    if rank0:
        print(
            f"model {model.name} (vocab {model.vocab_size}, seq {model.seq_length}, "
            f"{model.num_layers} layers), TP={args.tp}, {dist.get_world_size()} rank(s), "
            f"{'cuda' if torch.cuda.is_available() else 'cpu'}, "
            f"{args.rounds} rounds x {args.steps - args.warmup} timed steps per loss"
        )
        print(f"{'loss':<20}{'tokens/s':>12}{'vs megatron_ce':>16}{'vs ce':>10}")
        for name in names:
            ratio_native = rate[name] / rate[BASELINE]
            ratio_ce = rate[name] / rate["ce"] if "ce" in rate else float("nan")
            flag = "" if ratio_native >= 0.97 else "   < 0.97"
            print(f"{name:<20}{rate[name]:>12.0f}{ratio_native:>15.3f}x{ratio_ce:>9.3f}x{flag}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
