"""The main job: corpus -> tiny pre-training through NeMo-Run (torchrun, TP=2) -> Hugging Face.

    python -m run_configs.main_job --out outputs/main [--preset precision] [--steps 300]

On a machine without a GPU (2 cores are enough, a few minutes): build the embedded default corpus
(CPython's standard library and its reference documentation, a byte-level BPE tokenizer, indexed
datasets; reused when already built), pre-train the tiny Qwen3-style model with the reward-shaped
loss through NeMo-Run's local executor (torchrun, 2 processes, gloo, tensor parallelism 2), export
the final checkpoint to a Hugging Face Qwen3 directory, load it back with transformers, measure its
perplexity on the corpus's held-out documents, and print a summary (also out/summary.json).

Layout of --out: corpus/, train/checkpoints/, train/logs/metrics.jsonl, hf/, nemo_run/ (NeMo-Run's
experiment folders, unless NEMORUN_HOME is set), summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "run_main_job"]


def _held_out_ppl(hf_dir: Path, valid_prefix: str, seq_length: int, max_tokens: int) -> float:
    """Perplexity of the exported model (transformers) on the first max_tokens held-out tokens,
    in windows of seq_length (each window predicts its own next tokens)."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoModelForCausalLM

    data = IndexedDataset(valid_prefix)
    tokens: list[np.ndarray] = []
    total = 0
    for i in range(len(data)):
        doc = np.asarray(data[i], dtype=np.int64)
        tokens.append(doc)
        total += len(doc)
        if total >= max_tokens:
            break
    flat = torch.from_numpy(np.concatenate(tokens)[:max_tokens])
    windows = flat[: (len(flat) // seq_length) * seq_length].view(-1, seq_length)  # [n, s]
    if len(windows) == 0:
        raise ValueError(f"{valid_prefix} holds fewer than {seq_length} tokens")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(windows).logits.float()  # [n, s, v]
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)
        )
    return math.exp(float(ce))


def _sample(hf_dir: Path, prompt: str, new_tokens: int) -> str:
    """Greedy continuation of `prompt` by the exported model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def run_main_job(
    out_dir: str | Path,
    *,
    preset: str = "precision",
    steps: int = 300,
    nproc: int = 2,
    tensor: int = 2,
    vocab_size: int = 8192,
    max_source_bytes: int | None = None,
    corpus_dir: str | Path | None = None,
    eval_interval: int = 50,
    device: str = "cpu",
    check_tokens: int = 8192,
) -> dict[str, Any]:
    """Run the main job (see the module docstring) and return its summary.

    Args:
        out_dir: output folder (created; an earlier run's train/ and hf/ are replaced).
        preset: the loss preset.
        steps: training steps.
        nproc: torchrun processes.
        tensor: tensor-parallel size (data parallel = nproc / tensor).
        vocab_size: tokenizer vocabulary of the corpus.
        max_source_bytes: byte budget of standard-library sources (None: the corpus default).
        corpus_dir: where the corpus is built or reused (default out_dir/corpus).
        eval_interval: validate every this many steps (and at the end).
        device: "cpu" (gloo ranks) or "auto" (GPUs when torch sees them).
        check_tokens: held-out tokens scored with the exported model.

    Raises:
        RuntimeError: the training job did not succeed (the message names its logs).
    """
    from megatron_ext.data import DefaultCorpusConfig, build_default_corpus
    from megatron_ext.export import export_training_checkpoint
    from run_configs.executors import local_executor, use_nemorun_home
    from run_configs.experiments import launch
    from run_configs.recipes import pretrain_task, tiny_pretrain
    from run_configs.report import load_metrics

    started = time.perf_counter()
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    use_nemorun_home(os.environ.get("NEMORUN_HOME") or out / "nemo_run")
    times: dict[str, float] = {}

    # 1. the embedded default corpus (reused when its manifest matches)
    t = time.perf_counter()
    corpus_kwargs: dict[str, Any] = {"vocab_size": vocab_size}
    if max_source_bytes is not None:
        corpus_kwargs["max_source_bytes"] = max_source_bytes
    corpus = build_default_corpus(
        corpus_dir if corpus_dir is not None else out / "corpus",
        DefaultCorpusConfig(**corpus_kwargs),
    )
    times["corpus_s"] = time.perf_counter() - t
    print(
        f"[main_job] corpus {'reused' if corpus.reused else 'built'} in {times['corpus_s']:.1f}s: "
        f"{corpus.num_documents} documents, {corpus.num_tokens} tokens, vocab {corpus.vocab_size}",
        flush=True,
    )

    # 2. pre-training through NeMo-Run's local executor (torchrun)
    train_dir = out / "train"
    shutil.rmtree(train_dir, ignore_errors=True)  # a fresh run, not a resume of the last one
    config = tiny_pretrain(
        data_dir=corpus.out_dir,
        out_dir=train_dir,
        preset=preset,
        vocab_size=corpus.vocab_size,
        eod_id=int(corpus.manifest["eod_id"]),
        tensor=tensor,
        train_steps=steps,
        eval_interval=eval_interval,
    )
    executor = local_executor(nproc, gpu=False if device == "cpu" else None)
    t = time.perf_counter()
    result = launch(pretrain_task(config), executor, name="main_job", tail_logs=True)
    times["train_s"] = time.perf_counter() - t
    if not result.succeeded:
        raise RuntimeError(
            f"the training job ended {result.states}; logs under {result.experiment_dir}"
        )
    records = load_metrics(train_dir / "logs")
    last = records[-1]
    vals = [r for r in records if "val_ppl" in r]

    # 3. Hugging Face export of the final checkpoint
    t = time.perf_counter()
    hf_dir = export_training_checkpoint(
        train_dir / "checkpoints",
        out / "hf",
        tokenizer_dir=corpus.tokenizer_dir,
        overwrite=True,
        progress=False,
    )
    times["export_s"] = time.perf_counter() - t

    # 4. the exported model, through transformers
    t = time.perf_counter()
    seq_length = int(config.model.seq_length)
    hf_ppl = (
        _held_out_ppl(Path(hf_dir), corpus.valid_prefix, seq_length, check_tokens)
        if corpus.valid_prefix
        else float("nan")
    )
    sample = _sample(Path(hf_dir), "def ", 24)
    times["check_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - started

    summary: dict[str, Any] = {
        "preset": preset,
        "layout": {"nproc": nproc, "tensor": tensor, "data": nproc // tensor},
        "steps": int(last["step"]),
        "tokens_per_step": int(config.global_batch_size) * seq_length,
        "final": {k: last[k] for k in ("loss", "ce_loss", "ppl", "entropy") if k in last},
        "final_val": (
            {k: vals[-1][f"val_{k}"] for k in ("loss", "ce_loss", "ppl", "entropy")} if vals else {}
        ),
        "first": {k: records[0][k] for k in ("loss", "ce_loss", "ppl", "entropy")},
        "hf_held_out_ppl": hf_ppl,
        "hf_sample": sample,
        "paths": {
            "corpus": str(corpus.out_dir),
            "checkpoints": str(train_dir / "checkpoints"),
            "metrics": str(train_dir / "logs" / "metrics.jsonl"),
            "hf": str(hf_dir),
            "nemo_run_experiment": result.experiment_dir,
        },
        "times_s": {k: round(v, 1) for k, v in times.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _print_summary(s: dict[str, Any], out: Path) -> None:
    f, v, first = s["final"], s["final_val"], s["first"]
    print("\n=== main job summary ===")
    print(
        f"preset {s['preset']}; {s['layout']['nproc']} ranks, TP={s['layout']['tensor']} "
        f"DP={s['layout']['data']}; {s['steps']} steps of {s['tokens_per_step']} tokens"
    )
    print(
        f"train: loss {first['loss']:.3f} -> {f['loss']:.3f}, ppl {first['ppl']:.1f} -> "
        f"{f['ppl']:.1f}, entropy {first['entropy']:.3f} -> {f['entropy']:.3f} nats"
    )
    if v:
        print(f"validation (step {s['steps']}): ppl {v['ppl']:.1f}, entropy {v['entropy']:.3f}")
    print(f"exported model (transformers), held-out documents: ppl {s['hf_held_out_ppl']:.1f}")
    print(f"greedy sample: {s['hf_sample']!r}")
    for name, path in s["paths"].items():
        print(f"{name}: {path}")
    t = s["times_s"]
    print(
        f"time: corpus {t['corpus_s']}s, training {t['train_s']}s, export {t['export_s']}s, "
        f"check {t['check_s']}s, total {t['total_s']}s"
    )
    print(f"summary: {out / 'summary.json'}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m run_configs.main_job`."""
    from run_configs.names import PRESETS

    p = argparse.ArgumentParser(
        prog="python -m run_configs.main_job",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--out", default="outputs/main", help="output folder (default %(default)s)")
    p.add_argument("--preset", default="precision", choices=PRESETS, help="loss preset")
    p.add_argument("--steps", type=int, default=300, help="training steps (default %(default)s)")
    p.add_argument("--nproc", type=int, default=2, help="torchrun processes (default 2)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (default 2)")
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--vocab-size", type=int, default=8192, help="corpus tokenizer vocabulary")
    p.add_argument(
        "--max-source-bytes",
        type=int,
        help="corpus: byte budget of stdlib sources (smaller: faster)",
    )
    p.add_argument("--device", choices=("cpu", "auto"), default="cpu")
    args = p.parse_args(argv)
    summary = run_main_job(
        args.out,
        preset=args.preset,
        steps=args.steps,
        nproc=args.nproc,
        tensor=args.tp,
        vocab_size=args.vocab_size,
        max_source_bytes=args.max_source_bytes,
        eval_interval=args.eval_interval,
        device=args.device,
    )
    _print_summary(summary, Path(args.out).resolve())
    return 0


if __name__ == "__main__":
    from megatron_ext.core.shutdown import skip_final_gc

    skip_final_gc()  # a quicker exit (see megatron_ext.core.shutdown)
    sys.exit(main())
