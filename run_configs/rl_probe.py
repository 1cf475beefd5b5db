"""The RL probe: each preset's exported checkpoint through a short GRPO run, before and after.

    python -m run_configs rl-probe --compare-dir outputs/compare --data-dir outputs/main/corpus

The paper's claim is that a pre-training prior shapes what reinforcement learning can do with
the model afterwards. This experiment takes the runs of a `compare` (every preset, every seed),
exports each final checkpoint to a Hugging Face Qwen3 directory (<run>/hf, beside its
checkpoints/), and gives each one the same short GRPO run with TRL's `GRPOTrainer` (CPU, no
vLLM, no reference model), on the same prompts, with the same settings.

The task: next-word completion on the corpus. A prompt is a stretch of a document of the
pre-training corpus (at most `context_chars` characters, from a line start) that ends just
before a space and a word; the answer is that word. The reward of a completion is 1 when it
starts with a space and exactly that word (the word followed by a non-word character or the end
of the completion), else 0. The places kept are those where the training documents determine
the next word: the prompt's last chunk (its text after the last whitespace) precedes a word at
least `min_count` times there, and the answer is its most frequent next word, at least
`min_share` of the time (corpus_successors); the answer is also one token of the tokenizer with
its leading space, so that a completion of a few tokens always has room for it.

Why this task: its format is the pre-training data itself, so it needs no synthetic corpus and
no second pre-training; it is exactly verifiable; on the places the corpus determines, the tiny
models of the comparison (2 layers, perplexity in the hundreds) solve some prompts but far from
all (on unrestricted words their reward is about 0.01, and GRPO groups would all be 0: no
signal); and it is where the presets differ by construction, since how much probability the
prior leaves on its top candidates against the tail is what decides pass@1 against pass@8.
GRPO's prompts come from the training documents, the evaluation's from the held-out documents,
so the figures after RL are on prompts RL never saw.

Reported per preset, as the mean over seeds with its 95% Student t interval
(run_configs.seed_stats), on the held-out prompts before and after RL: the mean reward of
sampled completions (temperature 1, the sampling GRPO uses), pass@1 and pass@8 (the unbiased
estimator of Chen et al. 2021 over `eval_samples` samples per prompt; with a 0/1 reward pass@1
equals the mean reward), the greedy reward, the policy's next-token entropy at the end of the
prompts, and during
RL the trajectory of the policy entropy of the sampled completions and of the reward (TRL's
logged `entropy` and `reward`, one value per step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from run_configs.seed_stats import Interval, mean_interval

__all__ = [
    "NextWordTask",
    "PolicyEval",
    "ProbeRun",
    "RLProbeConfig",
    "RLProbeReport",
    "corpus_successors",
    "corpus_tasks",
    "evaluate_policy",
    "export_run",
    "grpo_probe",
    "next_word_reward",
    "next_word_tasks",
    "pass_at_k",
    "probe_runs",
    "run_rl_probe",
    "write_rl_report",
]

_WORD = re.compile(r"(?<=\S) ([A-Za-z_][A-Za-z0-9_]+)")
"""A space after a non-space character, then a word of two characters or more: the prompt ends
before the space, the word is the answer."""

_COMPLETION_WORD = re.compile(r" (\w+)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLProbeConfig:
    """Settings of the RL probe (the defaults take 1-2 minutes per run on 2 idle CPU cores)."""

    train_prompts: int = 64
    """Prompts GRPO trains on (from the corpus's training documents)."""
    eval_prompts: int = 64
    """Prompts of the evaluation before and after RL (from the held-out documents)."""
    context_chars: int = 160
    """The longest prompt, in characters (cut back to the start of a line)."""
    min_count: int = 20
    """A prompt's last chunk (its text after the last whitespace) must precede a word at least
    this many times in the training documents ..."""
    min_share: float = 0.35
    """... and the answer must be its most frequent next word there, at least this share of the
    time (the corpus determines the answer; see corpus_successors)."""
    steps: int = 40
    """GRPO optimizer steps (10 move the tiny models' held-out reward within the seeds' noise;
    40 clearly)."""
    prompts_per_step: int = 4
    """Prompts per GRPO step (each with num_generations completions)."""
    num_generations: int = 8
    """Completions per prompt in a GRPO group."""
    learning_rate: float = 1e-3
    """AdamW learning rate of the GRPO run (constant; the tiny models need a large one to move
    in a few steps)."""
    max_completion_tokens: int = 3
    """Tokens sampled per completion (the answer is one token; a few give room to spell it)."""
    eval_samples: int = 16
    """Completions sampled per held-out prompt to estimate the reward and pass@k."""
    ks: tuple[int, ...] = (1, 8)
    """The k of pass@k."""
    temperature: float = 1.0
    """Sampling temperature of GRPO and of the evaluation."""
    seed: int = 0
    """Seed of the prompt choice and of sampling; a run's GRPO seed adds its index."""

    def __post_init__(self) -> None:
        positive = (
            "train_prompts",
            "eval_prompts",
            "context_chars",
            "steps",
            "prompts_per_step",
            "num_generations",
            "max_completion_tokens",
            "eval_samples",
            "min_count",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RLProbeConfig.{name}={value!r}: must be an int >= 1")
        if self.num_generations < 2:
            raise ValueError(
                f"RLProbeConfig.num_generations={self.num_generations}: GRPO compares the "
                "completions of a group with each other; use 2 or more (8 is usual)"
            )
        if not self.ks or any(k < 1 or k > self.eval_samples for k in self.ks):
            raise ValueError(
                f"RLProbeConfig.ks={self.ks!r}: every k must lie in 1..eval_samples "
                f"({self.eval_samples}); raise eval_samples to estimate a larger k"
            )
        if not 0 < self.min_share <= 1:
            raise ValueError(f"RLProbeConfig.min_share={self.min_share!r}: must lie in (0, 1]")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"RLProbeConfig.learning_rate={self.learning_rate!r}: must be > 0")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"RLProbeConfig.temperature={self.temperature!r}: must be > 0")


# -- the task -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class NextWordTask:
    """One prompt of the next-word task."""

    prompt: str
    """Text of a corpus document that ends just before a space and the answer."""
    answer: str
    """The word that follows in the document."""


def _places(text: str) -> Iterator[tuple[int, str, str]]:
    """(start, chunk, word) for every space and word after a non-space character: the chunk is
    the text from the last whitespace before the space (e.g. `self,` or `(the`)."""
    for match in _WORD.finditer(text):
        start = match.start()
        chunk_start = max(text.rfind(c, 0, start) for c in " \t\n") + 1
        yield start, text[chunk_start:start], match.group(1)


def corpus_successors(
    texts: Iterable[str], *, min_count: int = 20, min_share: float = 0.35
) -> dict[str, str]:
    """chunk -> the word that follows it most often in `texts` (a chunk being the text between
    the last whitespace and a space that a word follows), for the chunks followed by a word at
    least min_count times, that word at least min_share of the time (ties: the first in
    alphabetical order)."""
    pairs: Counter[tuple[str, str]] = Counter()
    totals: Counter[str] = Counter()
    for text in texts:
        for _, chunk, word in _places(text):
            pairs[(chunk, word)] += 1
            totals[chunk] += 1
    best: dict[str, tuple[int, str]] = {}
    for (chunk, word), n in pairs.items():
        if chunk not in best or (-n, word) < (-best[chunk][0], best[chunk][1]):
            best[chunk] = (n, word)
    return {
        chunk: word
        for chunk, (n, word) in best.items()
        if totals[chunk] >= min_count and n >= min_share * totals[chunk]
    }


def next_word_tasks(
    texts: Sequence[str],
    tokenizer: Any,
    count: int,
    *,
    successors: Mapping[str, str] | None = None,
    context_chars: int = 160,
    seed: int = 0,
) -> list[NextWordTask]:
    """`count` next-word prompts from `texts`, chosen at random (seeded) among every place where
    a space and a word follow a non-space character, the word with its space is one token of
    `tokenizer` and, given `successors` (corpus_successors), the word is the successor of the
    chunk before it; no prompt twice.

    Raises:
        ValueError: the texts hold fewer than `count` such places.
    """
    single: dict[str, bool] = {}

    def one_token(word: str) -> bool:
        if word not in single:
            single[word] = len(tokenizer(" " + word, add_special_tokens=False).input_ids) == 1
        return single[word]

    candidates: dict[str, str] = {}
    for text in texts:
        for start, chunk, word in _places(text):
            if successors is not None and successors.get(chunk) != word:
                continue
            window = text[max(0, start - context_chars) : start]
            if start > context_chars or "\n" in window:  # begin at a line start
                if "\n" not in window:
                    continue
                window = window[window.index("\n") + 1 :].lstrip("\n")
            if len(window.strip()) < 8 or not one_token(word):
                continue
            candidates.setdefault(window, word)
    if len(candidates) < count:
        raise ValueError(
            f"the texts give {len(candidates)} next-word prompts, fewer than the {count} asked "
            "for: pass more documents or ask for fewer prompts"
        )
    chosen = random.Random(seed).sample(sorted(candidates), count)
    return [NextWordTask(prompt=p, answer=candidates[p]) for p in chosen]


def next_word_reward(completions: Sequence[str], answer: Sequence[str], **_: Any) -> list[float]:
    """The reward of each completion: 1.0 when it starts with a space and exactly its answer
    (followed by a non-word character or the end), else 0.0. The signature is that of a TRL
    reward function (the dataset's `answer` column comes as a keyword)."""
    rewards = []
    for completion, word in zip(completions, answer, strict=True):
        match = _COMPLETION_WORD.match(completion)
        rewards.append(1.0 if match is not None and match.group(1) == word else 0.0)
    return rewards


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c passed (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k), the chance that k of the n samples drawn without replacement hold
    at least one that passed.

    Raises:
        ValueError: not 0 <= c <= n, or not 1 <= k <= n.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c={c} passed of n={n} samples; need 0 <= c <= n")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k={k} needs 1 <= k <= n={n} samples")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _documents(prefix: str, tokenizer: Any, limit: int | None = None) -> list[str]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = IndexedDataset(prefix)
    count = len(data) if limit is None else min(limit, len(data))
    return [tokenizer.decode(list(map(int, data[i]))) for i in range(count)]


def corpus_tasks(
    data_dir: str | os.PathLike[str], config: RLProbeConfig
) -> tuple[list[NextWordTask], list[NextWordTask]]:
    """The GRPO prompts (from the corpus's training documents) and the evaluation prompts (from
    its held-out documents) of a built default corpus (megatron_ext.data.default_corpus).

    Raises:
        FileNotFoundError: data_dir holds no built corpus.
        ValueError: the corpus has no held-out documents, or too few prompts.
    """
    from transformers import AutoTokenizer

    manifest_path = Path(data_dir) / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"--data-dir {data_dir}: no manifest.json, not a built corpus; pass the corpus the "
            "comparison was trained on (make demo builds outputs/main/corpus)"
        )
    manifest = json.loads(manifest_path.read_text())
    paths = manifest["paths"]
    if paths.get("valid_prefix") is None:
        raise ValueError(
            f"the corpus in {data_dir} has no held-out documents to evaluate on; build it with "
            "held-out documents (DefaultCorpusConfig.valid_every > 0)"
        )
    tokenizer = AutoTokenizer.from_pretrained(Path(data_dir) / paths["tokenizer"])
    train_texts = _documents(str(Path(data_dir) / paths["train_prefix"]), tokenizer)
    valid_texts = _documents(str(Path(data_dir) / paths["valid_prefix"]), tokenizer)
    successors = corpus_successors(
        train_texts, min_count=config.min_count, min_share=config.min_share
    )
    kw = {"successors": successors, "context_chars": config.context_chars, "seed": config.seed}
    return (
        next_word_tasks(train_texts, tokenizer, config.train_prompts, **kw),
        next_word_tasks(valid_texts, tokenizer, config.eval_prompts, **kw),
    )


# -- one policy, before and after ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicyEval:
    """A policy on the evaluation prompts."""

    reward: float
    """Mean reward of the sampled completions."""
    pass_at: dict[int, float]
    """k -> pass@k, the mean over prompts of the unbiased estimate."""
    entropy: float
    """Mean next-token entropy at the end of the prompts (nats)."""
    greedy: float
    """Mean reward of the greedy completions."""


def evaluate_policy(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[NextWordTask],
    *,
    samples: int,
    ks: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
) -> PolicyEval:
    """Sample `samples` completions per task (temperature, no top-k or top-p), score them with
    next_word_reward and estimate pass@k; the same seed gives the same draws to every model."""
    import torch

    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer([t.prompt for t in tasks], return_tensors="pt", padding=True)
        width = batch.input_ids.shape[1]
        answers = [t.answer for t in tasks]
        with torch.no_grad():
            logits = model(**batch).logits[:, -1].float()  # [n, v]
            logp = torch.log_softmax(logits, dim=-1)
            entropy = float(-(logp.exp() * logp).sum(-1).mean())
            greedy = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, top_k=None, top_p=None
            )
            torch.manual_seed(seed)
            sampled = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                num_return_sequences=samples,
            )  # [n * samples, width + new]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    greedy_text = tokenizer.batch_decode(greedy[:, width:], skip_special_tokens=True)
    texts = tokenizer.batch_decode(sampled[:, width:], skip_special_tokens=True)
    rewards = next_word_reward(texts, [a for a in answers for _ in range(samples)])
    passed = [int(sum(rewards[i * samples : (i + 1) * samples])) for i in range(len(tasks))]
    return PolicyEval(
        reward=sum(rewards) / len(rewards),
        pass_at={k: sum(pass_at_k(samples, c, k) for c in passed) / len(tasks) for k in ks},
        entropy=entropy,
        greedy=sum(next_word_reward(greedy_text, answers)) / len(tasks),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeRun:
    """One checkpoint through the probe."""

    hf_dir: str
    """The Hugging Face directory GRPO started from."""
    seed: int
    """The GRPO seed."""
    before: PolicyEval
    """The exported model on the held-out prompts."""
    after: PolicyEval
    """The policy after GRPO, on the same prompts with the same sampling seed."""
    entropy: list[float]
    """Per GRPO step: the mean policy entropy over the sampled completions' tokens (TRL)."""
    reward: list[float]
    """Per GRPO step: the mean reward of the sampled completions (training prompts)."""
    seconds: float
    """Wall time of the GRPO run."""


def grpo_probe(
    hf_dir: str | os.PathLike[str],
    train_tasks: Sequence[NextWordTask],
    eval_tasks: Sequence[NextWordTask],
    config: RLProbeConfig,
    out_dir: str | os.PathLike[str],
    *,
    seed: int | None = None,
) -> ProbeRun:
    """Evaluate the model in hf_dir, run GRPO on train_tasks with TRL's GRPOTrainer (given the
    directory's path: TRL loads the model and the tokenizer from it as they are), evaluate again.

    out_dir receives TRL's output (no checkpoints are saved) and probe.json, this run's figures.
    """
    import time

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    seed = config.seed if seed is None else seed
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_dir = str(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    evaluate = {
        "samples": config.eval_samples,
        "ks": config.ks,
        "max_new_tokens": config.max_completion_tokens,
        "temperature": config.temperature,
        "seed": config.seed,
    }
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    before = evaluate_policy(model, tokenizer, eval_tasks, **evaluate)
    del model
    args = GRPOConfig(
        output_dir=str(out / "grpo"),
        max_steps=config.steps,
        per_device_train_batch_size=config.prompts_per_step * config.num_generations,
        gradient_accumulation_steps=1,
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_tokens,
        temperature=config.temperature,
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        beta=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        model_init_kwargs={"dtype": torch.float32},
    )
    dataset = Dataset.from_list([{"prompt": t.prompt, "answer": t.answer} for t in train_tasks])
    trainer = GRPOTrainer(
        model=hf_dir, reward_funcs=next_word_reward, args=args, train_dataset=dataset
    )
    trainer.remove_callback(PrinterCallback)  # the figures are in trainer.state.log_history
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    logged = [r for r in trainer.state.log_history if "entropy" in r and "reward" in r]
    after = evaluate_policy(trainer.model, tokenizer, eval_tasks, **evaluate)
    run = ProbeRun(
        hf_dir=hf_dir,
        seed=seed,
        before=before,
        after=after,
        entropy=[float(r["entropy"]) for r in logged],
        reward=[float(r["reward"]) for r in logged],
        seconds=seconds,
    )
    (out / "probe.json").write_text(json.dumps(dataclasses.asdict(run), indent=2) + "\n")
    return run


# -- the comparison's runs ------------------------------------------------------------------------


def probe_runs(
    compare_dir: str | os.PathLike[str], presets: Sequence[str]
) -> dict[str, list[Path]]:
    """The run folders of a comparison: preset -> [compare_dir/<preset>] with one seed, or its
    seed<S>/ folders with several (run_configs.experiments.comparison_runs), each holding
    checkpoints/ or an exported hf/.

    Raises:
        FileNotFoundError: a preset has no run in compare_dir (all missing ones are named).
    """
    root = Path(compare_dir)
    runs: dict[str, list[Path]] = {}
    missing = []
    for preset in presets:
        folder = root / preset
        seeds = sorted(
            (p for p in folder.glob("seed*") if p.is_dir() and p.name[4:].isdigit()),
            key=lambda p: int(p.name[4:]),
        )
        found = [folder] if _has_model(folder) else [s for s in seeds if _has_model(s)]
        if found:
            runs[preset] = found
        else:
            missing.append(preset)
    if missing:
        raise FileNotFoundError(
            f"no run of {', '.join(missing)} in {root} (looked for <preset>/checkpoints/ and "
            "<preset>/seed<S>/checkpoints/): run `python -m run_configs compare --out "
            f"{root} --presets {' '.join(missing)}` first, or pass the presets it has"
        )
    return runs


def _has_model(run: Path) -> bool:
    return (run / "checkpoints").is_dir() or (run / "hf" / "config.json").is_file()


def export_run(run: str | os.PathLike[str], tokenizer_dir: str | os.PathLike[str] | None) -> Path:
    """The Hugging Face directory of a comparison run: run/hf, exported afresh from the latest
    step of run/checkpoints (with the corpus's tokenizer) when the run has checkpoints, else the
    run/hf that is there."""
    run = Path(run)
    if (run / "checkpoints").is_dir():
        from megatron_ext.export import export_training_checkpoint

        return Path(
            export_training_checkpoint(
                run / "checkpoints",
                run / "hf",
                tokenizer_dir=tokenizer_dir,
                overwrite=True,
                progress=False,
            )
        )
    return run / "hf"


# -- the report -----------------------------------------------------------------------------------


def _rows(ks: Sequence[int]) -> list[tuple[str, str]]:
    """The figures of the table (key, column title)."""
    return [
        ("reward", "reward"),
        *((f"pass@{k}", f"pass@{k}") for k in ks),
        ("greedy", "greedy reward"),
        ("entropy", "next-token entropy"),
    ]


def _figures(e: PolicyEval) -> dict[str, float]:
    out = {"reward": e.reward, "greedy": e.greedy, "entropy": e.entropy}
    out.update({f"pass@{k}": v for k, v in e.pass_at.items()})
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLProbeReport:
    """What run_rl_probe / write_rl_report wrote and found."""

    markdown: Path
    """The tables (rl_probe.md)."""
    plot: Path
    """The plot (rl_probe.png)."""
    summary: Path
    """Every run's figures and the intervals as JSON (rl_probe.json)."""
    stats: dict[str, dict[str, dict[str, Interval]]]
    """preset -> "before" / "after" / "gain" -> figure -> mean over seeds and 95% interval."""


def _over_seeds(runs: Sequence[ProbeRun]) -> dict[str, dict[str, Interval]]:
    before = [_figures(r.before) for r in runs]
    after = [_figures(r.after) for r in runs]
    keys = [k for k in before[0] if all(k in f for f in before + after)]
    out: dict[str, dict[str, Interval]] = {"before": {}, "after": {}, "gain": {}}
    for key in keys:
        out["before"][key] = mean_interval([f[key] for f in before])
        out["after"][key] = mean_interval([f[key] for f in after])
        out["gain"][key] = mean_interval([a[key] - b[key] for a, b in zip(after, before)])
    firsts = [r.entropy[0] for r in runs if r.entropy]
    lasts = [r.entropy[-1] for r in runs if r.entropy]
    if firsts and len(firsts) == len(runs):
        out["rl"] = {
            "entropy first step": mean_interval(firsts),
            "entropy last step": mean_interval(lasts),
            "reward first step": mean_interval([r.reward[0] for r in runs]),
            "reward last step": mean_interval([r.reward[-1] for r in runs]),
        }
    return out


def write_rl_report(
    results: Mapping[str, Sequence[ProbeRun]],
    out_dir: str | os.PathLike[str],
    config: RLProbeConfig,
) -> RLProbeReport:
    """Write out_dir/rl_probe.md, rl_probe.png and rl_probe.json from every preset's runs (one
    per pre-training seed)."""
    from run_configs.report import _fmt_interval, _row

    if not results or any(not runs for runs in results.values()):
        raise ValueError("no probe runs to report (every preset needs at least one)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = {preset: _over_seeds(runs) for preset, runs in results.items()}
    rows_ = _rows(config.ks)
    figures = [k for k, _ in rows_ if all(k in s["before"] for s in stats.values())]
    titles = dict(rows_)
    header = ["preset", "seeds"]
    for key in figures:
        header += [f"{titles[key]} before", f"{titles[key]} after", f"{titles[key]} gain"]
    rows = [_row(header), "|" + "---|" * len(header)]
    for preset, s in stats.items():
        cells = [f"`{preset}`", str(len(results[preset]))]
        for key in figures:
            cells += [_fmt_interval(s[phase][key], ".3f") for phase in ("before", "after", "gain")]
        rows.append(_row(cells))
    table = "\n".join(rows) + "\n"
    traj_rows = [
        _row(["preset", "RL entropy first step", "RL entropy last step", "RL reward first step",
              "RL reward last step"]),
        "|---|---|---|---|---|",
    ]  # fmt: skip
    for preset, s in stats.items():
        rl = s.get("rl", {})
        traj_rows.append(
            _row(
                [f"`{preset}`"]
                + [
                    _fmt_interval(rl.get(k), ".3f")
                    for k in (
                        "entropy first step",
                        "entropy last step",
                        "reward first step",
                        "reward last step",
                    )
                ]
            )
        )
    trajectories = "\n".join(traj_rows) + "\n"
    plot = _plot(results, out / "rl_probe.png")
    seeds = sorted({len(r) for r in results.values()})
    c = config
    md = out / "rl_probe.md"
    md.write_text(
        "# RL probe: GRPO from each preset's checkpoint\n\n"
        f"Task: next-word completion on the corpus ({c.train_prompts} GRPO prompts from training "
        f"documents, {c.eval_prompts} held-out prompts for the evaluation; reward 1 for the exact "
        f"next word). GRPO (TRL): {c.steps} steps x {c.prompts_per_step} prompts x "
        f"{c.num_generations} completions of at most {c.max_completion_tokens} tokens, learning "
        f"rate {c.learning_rate:g}, temperature {c.temperature:g}, no KL term. Evaluation: "
        f"{c.eval_samples} samples per prompt at temperature {c.temperature:g}; pass@k is the "
        "unbiased estimate; with a 0/1 reward pass@1 equals the mean reward. Gain is after minus "
        "before, seed by seed.\n\n"
        f"{' or '.join(map(str, seeds))} seed(s) per preset (one GRPO run per pre-training "
        "seed). Each cell is the mean over seeds and, in brackets, its 95% Student t interval "
        "(run_configs/seed_stats.py); a cell without brackets has one seed.\n\n"
        f"{table}\n## During RL\n\nTRL's logged policy entropy of the sampled completions "
        "(nats per token) and reward on the GRPO prompts, at the first and last step.\n\n"
        f"{trajectories}\n![policy entropy and reward during GRPO; pass@k before and after]"
        "(rl_probe.png)\n"
    )
    summary = out / "rl_probe.json"
    summary.write_text(
        json.dumps(
            {
                "config": dataclasses.asdict(c),
                "runs": {p: [dataclasses.asdict(r) for r in runs] for p, runs in results.items()},
                "over_seeds": {
                    p: {phase: {k: dataclasses.asdict(v) for k, v in d.items()}
                        for phase, d in s.items()}
                    for p, s in stats.items()
                },
            },
            indent=2,
        )
        + "\n"
    )  # fmt: skip
    return RLProbeReport(markdown=md, plot=plot, summary=summary, stats=stats)


def _plot(results: Mapping[str, Sequence[ProbeRun]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from run_configs.report import _band

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ticks: list[tuple[float, str]] = []
    for i, (preset, runs) in enumerate(results.items()):
        color = colors[i % len(colors)]
        for ax, field in zip(axes[:2], ("entropy", "reward"), strict=True):
            curves = [dict(enumerate(getattr(r, field), 1)) for r in runs]
            steps, mean, low, high = _band(curves)
            ax.plot(steps, mean, color=color, lw=1.2, label=f"{preset} ({len(runs)} seeds)")
            if len(runs) > 1:
                ax.fill_between(steps, low, high, color=color, alpha=0.2, lw=0)
        ks = sorted(runs[0].before.pass_at)
        for j, k in enumerate(ks):
            x = i + (j - (len(ks) - 1) / 2) * 0.3
            for phase, marker in (("before", "o"), ("after", "s")):
                values = [getattr(r, phase).pass_at[k] for r in runs]
                m = sum(values) / len(values)
                axes[2].errorbar(
                    x + (0.07 if phase == "after" else -0.07),
                    m,
                    yerr=[[m - min(values)], [max(values) - m]],
                    color=color,
                    marker=marker,
                    mfc="white" if phase == "before" else color,
                    capsize=2,
                    ls="none",
                )
            ticks.append((x, f"@{k}"))
        # the preset's name once, under its pass@k ticks (five presets' names fit side by side)
        axes[2].text(
            i, -0.1, preset, transform=axes[2].get_xaxis_transform(), ha="center", va="top",
            fontsize=7, color=color,
        )  # fmt: skip
    axes[0].set_title("policy entropy during GRPO (nats/token)")
    axes[1].set_title("reward during GRPO (training prompts)")
    axes[2].set_title("held-out pass@k: before (open) and after (filled) GRPO")
    for ax in axes[:2]:
        ax.set_xlabel("GRPO step")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].set_xticks([x for x, _ in ticks], [label for _, label in ticks], fontsize=7)
    axes[2].set_ylim(bottom=0)
    axes[2].grid(True, axis="y", alpha=0.3)
    if any(len(r) > 1 for r in results.values()):
        fig.suptitle("lines and points: mean over seeds; bands and bars: minimum to maximum")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- the experiment -------------------------------------------------------------------------------


def run_rl_probe(
    compare_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    *,
    presets: Sequence[str],
    config: RLProbeConfig | None = None,
    out_dir: str | os.PathLike[str] | None = None,
) -> RLProbeReport:
    """The probe over a comparison's runs (see the module docstring): export every run of
    `presets` in compare_dir to <run>/hf, run grpo_probe on each (out_dir/<preset>/<seed>/) and
    write the report to out_dir (default compare_dir/rl_probe)."""
    config = config or RLProbeConfig()
    out = Path(out_dir) if out_dir is not None else Path(compare_dir) / "rl_probe"
    runs = probe_runs(compare_dir, presets)
    train_tasks, eval_tasks = corpus_tasks(data_dir, config)
    tokenizer_dir = Path(data_dir) / "tokenizer"
    results: dict[str, list[ProbeRun]] = {}
    for preset, folders in runs.items():
        for index, folder in enumerate(folders):
            several = folder.name != preset  # out/<preset>/seed<S>/, else out/<preset>/
            name = f"{preset} {folder.name}" if several else preset
            hf_dir = export_run(folder, tokenizer_dir)
            run = grpo_probe(
                hf_dir,
                train_tasks,
                eval_tasks,
                config,
                out / preset / folder.name if several else out / preset,
                seed=config.seed + index,
            )
            b, a = run.before, run.after
            print(
                f"[rl-probe] {name}: reward {b.reward:.3f} -> {a.reward:.3f}, "
                + ", ".join(f"pass@{k} {b.pass_at[k]:.3f} -> {a.pass_at[k]:.3f}" for k in config.ks)
                + f", entropy {b.entropy:.3f} -> {a.entropy:.3f} ({run.seconds:.0f}s GRPO)",
                flush=True,
            )
            results.setdefault(preset, []).append(run)
    return write_rl_report(results, out, config)
