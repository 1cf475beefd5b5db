"""Training throughput with the reward-shaped loss presets against plain cross-entropy.

One run of the trainer on one model and one data stream: every training step is timed once per
loss, the losses taking turns step by step (round robin), so that all of them see the same
machine conditions. Prints tokens/s (from the median step time of each loss) and the ratio to
plain cross-entropy, with a 95% bootstrap interval of that ratio. "megatron_ce" is
megatron-core's own vocab_parallel_cross_entropy (the baseline); "ce" is our shaped loss with
the CE preset. Diagnostics (entropy, p(x), top-k mass) are off in the timed steps, as on the
trainer's non-logged steps (--diagnostics turns them on). The project's target is >= 0.97x for
every preset.

    python tools/bench_train.py                                  # tiny model on CPU
    python tools/bench_train.py --vocab-size 32768               # a loss-heavier setting
    torchrun --nproc-per-node 2 tools/bench_train.py --tp 2      # several ranks
    python tools/bench_train.py --num-workers 0 2                # the data loader's workers

With --num-workers, the losses are not compared: the CE preset trains once per worker count,
reading its batches through the trainer's data loader (data.num_workers=N) inside the timed
step, and steps/s (from the median time of reading plus training a step) is printed per count.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
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
    trainer_session,
)
from megatron_ext.training.synthetic import write_synthetic_dataset

BASELINE = "megatron_ce"


def _parse() -> argparse.Namespace:
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
    p.add_argument("--steps", type=int, default=40, help="timed steps per loss (default 40)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--diagnostics", action="store_true", help="time steps with diagnostics on")
    p.add_argument("--data", help="indexed dataset prefix (default: a synthetic one)")
    p.add_argument(
        "--num-workers",
        type=int,
        nargs="+",
        help="time reading plus training with these data.num_workers instead of the losses",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: steadier timings)"
    )
    return p.parse_args()


def main() -> int:
    from megatron.core.utils import unwrap_model  # after megatron_ext (see megatron_ext.core.jit)

    args = _parse()
    torch.set_num_threads(args.threads)
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
    names = [BASELINE, *args.presets]
    rounds = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or os.path.join(tmp, "synthetic")
        if args.data is None and int(os.environ.get("RANK", "0")) == 0:
            write_synthetic_dataset(data, vocab_size=model.vocab_size, num_documents=400)
        if args.num_workers:
            return _bench_workers(args, model, data, tmp)
        config = TrainConfig(
            model=model,
            parallel=ParallelConfig(tensor=args.tp),
            data=DataConfig(paths=(data,), split="100,0,0", cache_dir=os.path.join(tmp, "cache")),
            optimizer=OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0),
            logging=LoggingConfig(console=False),
            train_steps=rounds * len(names),
            global_batch_size=args.global_batch_size,
            micro_batch_size=args.micro_batch_size,
            bf16=args.bf16,
        )
        if args.data is None and "RANK" in os.environ:
            # torchrun: wait for rank 0's data before anyone reads it.
            while not Path(data + ".idx").exists():
                time.sleep(0.2)
        with trainer_session(config) as trainer:
            inner = unwrap_model(trainer.model[-1])  # the chunk with the loss
            times: dict[str, list[float]] = {n: [] for n in names}
            consumed = 0
            for r in range(rounds):
                for name in names:
                    inner.native_cross_entropy = name == BASELINE
                    if name != BASELINE:
                        inner.shaping = RewardShapingConfig.preset(name)
                    batches = trainer.plan.micro_batches(
                        trainer.train_data, consumed, trainer.device
                    )
                    consumed += args.global_batch_size
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    trainer.train_step(batches, diagnostics=args.diagnostics)
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    if r >= args.warmup:
                        times[name].append(time.perf_counter() - t0)
            world = dist.get_world_size()
            rank0 = dist.get_rank() == 0
    tokens = args.global_batch_size * model.seq_length
    rate = {n: tokens / statistics.median(t) for n, t in times.items()}
    if rank0:
        print(
            f"model {model.name} (vocab {model.vocab_size}, seq {model.seq_length}, "
            f"{model.num_layers} layers), TP={args.tp}, {world} rank(s), "
            f"{'cuda' if torch.cuda.is_available() else 'cpu'}, {args.steps} timed steps per "
            f"loss (round robin), diagnostics {'on' if args.diagnostics else 'off'}"
        )
        print(
            f"{'loss':<20}{'tokens/s':>12}{'vs megatron_ce':>16}{'95% interval':>18}{'vs ce':>10}"
        )
        for name in names:
            ratio_native = rate[name] / rate[BASELINE]
            low, high = _ratio_interval(times[BASELINE], times[name])
            ratio_ce = rate[name] / rate["ce"] if "ce" in rate else float("nan")
            flag = "" if ratio_native >= 0.97 else "   < 0.97"
            print(
                f"{name:<20}{rate[name]:>12.0f}{ratio_native:>15.3f}x"
                f"{f'[{low:.3f}, {high:.3f}]':>18}{ratio_ce:>9.3f}x{flag}"
            )
    return 0


def _bench_workers(args: argparse.Namespace, model, data: str, tmp: str) -> int:
    """Steps/s of reading (through the trainer's data loader) plus training one step, for each
    of args.num_workers, one trainer session after the other, the CE preset throughout."""
    from megatron.core.utils import unwrap_model

    if args.data is None and "RANK" in os.environ:
        while not Path(data + ".idx").exists():
            time.sleep(0.2)
    rounds = args.warmup + args.steps
    median: dict[int, float] = {}
    for workers in args.num_workers:
        config = TrainConfig(
            model=model,
            parallel=ParallelConfig(tensor=args.tp),
            data=DataConfig(
                paths=(data,),
                split="100,0,0",
                cache_dir=os.path.join(tmp, "cache"),
                num_workers=workers,
            ),
            optimizer=OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0),
            logging=LoggingConfig(console=False),
            train_steps=rounds,
            global_batch_size=args.global_batch_size,
            micro_batch_size=args.micro_batch_size,
            bf16=args.bf16,
        )
        with trainer_session(config) as trainer:
            inner = unwrap_model(trainer.model[-1])
            inner.shaping = RewardShapingConfig.preset("ce")
            loader = trainer.batch_loader(trainer.train_data, 0, rounds * args.global_batch_size)
            batches = iter(loader)
            times = []
            for r in range(rounds):
                t0 = time.perf_counter()
                trainer.train_step(next(batches), diagnostics=args.diagnostics)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if r >= args.warmup:
                    times.append(time.perf_counter() - t0)
            loader.close()
            median[workers] = statistics.median(times)
            world, rank0 = dist.get_world_size(), dist.get_rank() == 0
    if rank0:
        print(
            f"model {model.name} (vocab {model.vocab_size}, seq {model.seq_length}, "
            f"{model.num_layers} layers), TP={args.tp}, {world} rank(s), "
            f"{'cuda' if torch.cuda.is_available() else 'cpu'}, {args.steps} timed steps each, "
            f"global batch {args.global_batch_size}"
        )
        base = args.num_workers[0]
        print(f"{'num_workers':<14}{'steps/s':>10}{f'vs {base} workers':>16}")
        for workers, t in median.items():
            print(f"{workers:<14}{1 / t:>10.2f}{median[base] / t:>15.3f}x")
    return 0


def _ratio_interval(
    base: list[float], other: list[float], resamples: int = 2000
) -> tuple[float, float]:
    """A 95% bootstrap interval of median(base) / median(other) (the tokens/s ratio), from
    the step times resampled with replacement (seeded: the same times give the same interval)."""
    rng = random.Random(0)
    ratios = sorted(
        statistics.median(rng.choices(base, k=len(base)))
        / statistics.median(rng.choices(other, k=len(other)))
        for _ in range(resamples)
    )
    return ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]


if __name__ == "__main__":
    from megatron_ext.core.shutdown import skip_final_gc

    skip_final_gc()  # a quicker exit (see megatron_ext.core.shutdown)
    sys.exit(main())
