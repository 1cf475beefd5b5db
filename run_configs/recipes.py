"""Training recipes as NeMo-Run configs: `run.Config[TrainConfig]` and `run.Partial(pretrain, ...)`.

Every recipe returns a `run.Config` tree of megatron_ext.training's own dataclasses (TrainConfig,
ModelConfig, RewardShapingConfig, ParallelConfig, ...), with every field spelled out so that any
of them can be changed before launch: in Python (`cfg.optimizer.lr = 1e-4`) or from the shell
(`python -m run_configs pretrain ... optimizer.lr=1e-4`). Nothing runs until an executor builds
the tree (`fdl.build`) and calls `megatron_ext.training.pretrain` on every rank (through
`megatron_ext.training.task`).

Recipes:
- `tiny_pretrain` / `tiny_midtrain`: the tiny Qwen3-style model on the embedded default corpus
  (megatron_ext.data.build_default_corpus), minutes on a CPU.
- `paper_pretrain` / `paper_midtrain`: the paper's models (setup.md): dense 1B and 4B, MoE
  5B-A0.3B, 10B-A0.5B and 20B-A1B, AdamW (wd 0.1, clip 1.0), 16M-token global batches
  (4096 x 4096 in pre-training, 1024 x 16384 in mid-training), warmup-stable-decay: 2000 warmup
  steps to 3e-4, stable through pre-training, decayed to 3e-5 in mid-training, where the RoPE
  base goes from 1e4 to 1e6. They use Transformer Engine's layer spec where TE is installed
  (use_transformer_engine=None), the distributed optimizer with the gradient reduce-scatter and
  the parameter all-gather overlapped with the backward and forward passes, and in mid-training
  context parallelism (2 ranks per sequence, which needs TE) where pre-training's layout would
  otherwise raise the tensor parallelism, with full activation recomputation.

Mid-training starts either from a pre-training run (`load_dir`: its weights, not its optimizer
state or data position) or from a model imported from Hugging Face with tools/import_hf.py
(`init_from`: CheckpointConfig.init_from, weights only, step 0). With `init_from` the tiny recipe
takes the model from the import's config.json, and a paper recipe checks the import against its
model (dense_4b is Qwen3-4B's shape), naming every field that differs.

The loss is chosen by preset name: ce, precision, diversity, tail_suppression, head_preservation
(megatron_ext.loss.RewardShapingConfig.preset).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import fiddle as fdl
import nemo_run as run

from megatron_ext.loss import RewardShapingConfig
from megatron_ext.models import ModelConfig, model_preset
from megatron_ext.training import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainConfig,
)
from megatron_ext.training.config import PAPER_WARMUP_STEPS
from megatron_ext.training.start import check_init_from, recorded_run_config
from megatron_ext.training.task import pretrain_on_this_rank
from run_configs.names import PAPER_MODELS, PRESETS, RECIPE_NAMES, STAGES

__all__ = [
    "GLOBAL_BATCH_TOKENS",
    "MIDTRAIN_SEQ_LENGTH",
    "MIDTRAIN_TOKENS",
    "PAPER_LAYOUTS",
    "PAPER_MODELS",
    "PRESETS",
    "PRETRAIN_SEQ_LENGTH",
    "PRETRAIN_TOKENS",
    "RECIPE_NAMES",
    "STAGES",
    "PaperLayout",
    "build_config",
    "get_recipe",
    "model_config",
    "paper_midtrain",
    "paper_pretrain",
    "pretrain_task",
    "shaping_config",
    "tiny_midtrain",
    "tiny_pretrain",
]


# -- the paper's schedule (setup.md) --------------------------------------------------------------

PRETRAIN_SEQ_LENGTH = 4096
"""Sequence length of pre-training."""
MIDTRAIN_SEQ_LENGTH = 16_384
"""Sequence length of mid-training."""
GLOBAL_BATCH_TOKENS = 4096 * 4096
"""Tokens per optimizer step (16M = 4096 sequences of 4096 tokens)."""
PRETRAIN_TOKENS = 500e9
"""Tokens of pre-training."""
MIDTRAIN_TOKENS = 100e9
"""Tokens of mid-training."""
PEAK_LR = 3e-4
"""Learning rate after warmup, held through pre-training."""
FINAL_LR = 3e-5
"""Learning rate at the end of mid-training."""
WARMUP_STEPS = PAPER_WARMUP_STEPS
"""Linear warmup steps at the start of pre-training."""
PRETRAIN_ROPE_BASE = 1e4
"""RoPE base of pre-training."""
MIDTRAIN_ROPE_BASE = 1e6
"""RoPE base of mid-training."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PaperLayout:
    """Default cluster shape and model-parallel layout of one paper model in one stage."""

    nodes: int
    """Slurm nodes."""
    gpus_per_node: int = 8
    """GPUs per node (one rank each)."""
    tensor: int = 1
    """Tensor-parallel size."""
    pipeline: int = 1
    """Pipeline-parallel size."""
    expert: int = 1
    """Expert-parallel size (MoE)."""
    context: int = 1
    """Context-parallel size (needs Transformer Engine)."""
    micro_batch_size: int = 1
    """Sequences per forward pass on one rank."""

    @property
    def world_size(self) -> int:
        """Ranks of the job."""
        return self.nodes * self.gpus_per_node


PAPER_LAYOUTS: dict[tuple[str, str], PaperLayout] = {
    # Pre-training, 4096 tokens: small models are data parallel, 4B adds TP=2, MoEs split experts.
    ("dense_1b", "pretrain"): PaperLayout(nodes=8, micro_batch_size=4),
    ("dense_4b", "pretrain"): PaperLayout(nodes=16, tensor=2, micro_batch_size=2),
    ("moe_5b_a0.3b", "pretrain"): PaperLayout(nodes=8, expert=8, micro_batch_size=4),
    ("moe_10b_a0.5b", "pretrain"): PaperLayout(nodes=16, expert=16, micro_batch_size=4),
    ("moe_20b_a1b", "pretrain"): PaperLayout(nodes=32, pipeline=2, expert=16, micro_batch_size=2),
    # Mid-training, 16384 tokens: one sequence per rank, split over 2 context-parallel ranks
    # where the activations need more than pre-training's layout, instead of twice the TP
    # (an image without TE: override with tp=<2 x tensor> cp=1).
    ("dense_1b", "midtrain"): PaperLayout(nodes=8, context=2),
    ("dense_4b", "midtrain"): PaperLayout(nodes=16, tensor=2, context=2),
    ("moe_5b_a0.3b", "midtrain"): PaperLayout(nodes=8, expert=8),
    ("moe_10b_a0.5b", "midtrain"): PaperLayout(nodes=16, expert=16),
    ("moe_20b_a1b", "midtrain"): PaperLayout(nodes=32, pipeline=2, expert=16, context=2),
}
"""Defaults of the paper recipes (any of them can be overridden); every one is validated by
tests/test_run_configs.py against the model's heads, layers, experts and vocabulary."""


# -- building blocks ------------------------------------------------------------------------------


def model_config(name: str, **overrides: object) -> run.Config[ModelConfig]:
    """A model preset as a run.Config with every ModelConfig field explicit (overridable).

    Args:
        name: a megatron_ext.models preset (tiny, tiny_moe, dense_1b, ..., moe_20b_a1b).
        **overrides: field values replacing the preset's (e.g. seq_length=16384).
    """
    return run.Config(ModelConfig, **dataclasses.asdict(model_preset(name, **overrides)))


def shaping_config(preset: str) -> run.Config[RewardShapingConfig]:
    """The loss preset `preset` (ce, precision, diversity, tail_suppression, head_preservation)
    as a run.Config with every field explicit."""
    values = dataclasses.asdict(RewardShapingConfig.preset(preset))
    return run.Config(RewardShapingConfig, **values)


def pretrain_task(config: run.Config[TrainConfig]) -> run.Partial:
    """The job every rank runs: `megatron_ext.training.pretrain(config)` (through
    megatron_ext.training.task, so that the launcher itself never imports the trainer)."""
    return run.Partial(pretrain_on_this_rank, config=config)


def build_config(config: run.Config[TrainConfig]) -> TrainConfig:
    """Build the TrainConfig a run.Config describes (constructors validate every field)."""
    return fdl.build(config)


def _abs(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")


# ModelConfig fields that an initialisation from a checkpoint may change: the stage sets the
# sequence length and the RoPE base; the initialisation's spread is unused (the weights are read).
_STAGE_FIELDS = ("name", "seq_length", "rope_base", "init_std")


def _start_of_midtrain(
    recipe: str, load_dir: str | Path | None, init_from: str | Path | None, *, required: bool
) -> None:
    """Mid-training starts from exactly one of load_dir and init_from (or, where not required,
    from the recipe's default load_dir)."""
    if load_dir is not None and init_from is not None:
        raise ValueError(
            f"{recipe}: load_dir={str(load_dir)!r} and init_from={str(init_from)!r} both name "
            "where mid-training starts: load_dir takes a pre-training run's weights, init_from a "
            "checkpoint root made by tools/import_hf.py (or any run's, weights only); pass one"
        )
    if required and load_dir is None and init_from is None:
        raise ValueError(
            f"{recipe} needs load_dir (the pre-training checkpoints) or init_from (a model "
            "imported with tools/import_hf.py)"
        )


def _imported_model(recipe: str, init_from: str) -> ModelConfig | None:
    """The model recorded in init_from's config.json (None when that file is absent), after
    checking that init_from is a checkpoint root."""
    check_init_from(init_from)  # a missing path, a Hugging Face directory: that error first
    fields = (recorded_run_config(init_from) or {}).get("model")
    if not isinstance(fields, dict):
        return None
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{recipe}: the model table of {init_from}/config.json is not a ModelConfig ({exc})"
        ) from None


def _check_imported_model(recipe: str, init_from: str, model: ModelConfig) -> None:
    """Refuse an init_from checkpoint whose model differs from `model` in any field the stage
    does not set, naming every such field (skipped where init_from is not readable here: a path
    as the job's nodes see it; the trainer checks it again when it loads)."""
    if not Path(init_from).exists():
        return
    imported = _imported_model(recipe, init_from)
    if imported is None:
        return
    ours, theirs = dataclasses.asdict(model), dataclasses.asdict(imported)
    diffs = [
        f"model.{name}: {init_from} {theirs[name]!r}, {model.name} {ours[name]!r}"
        for name in ours
        if name not in _STAGE_FIELDS and ours[name] != theirs[name]
    ]
    if diffs:
        raise ValueError(
            f"{recipe}: init_from={init_from} holds another model than {model.name}; differing "
            "fields:\n  - " + "\n  - ".join(diffs) + f"\nimport a model of {model.name}'s shape, "
            "or mid-train this one with the recipe of its own shape"
        )


def _tiny_optimizer(
    lr: float, min_lr: float, warmup_steps: int, decay_steps: int
) -> run.Config[OptimizerConfig]:
    """AdamW (weight decay 0.1, clipping 1.0), warmup then linear decay to min_lr."""
    return run.Config(
        OptimizerConfig,
        lr=lr,
        min_lr=min_lr,
        warmup_steps=warmup_steps,
        wsd_decay_steps=decay_steps,
        wsd_decay_style="linear",
        weight_decay=0.1,
        clip_grad=1.0,
    )


def _tiny_data(data_dir: str | Path, eod_id: int) -> run.Config[DataConfig]:
    """The default corpus's training documents, split 95/5 into training and validation."""
    return run.Config(
        DataConfig,
        paths=[str(Path(_abs(data_dir)) / "train_text_document")],
        split="95,5,0",
        eod_id=eod_id,
    )


# -- tiny recipes (CPU) ---------------------------------------------------------------------------


def tiny_pretrain(
    *,
    data_dir: str | Path = "outputs/main/corpus",
    out_dir: str | Path | None = None,
    preset: str = "ce",
    vocab_size: int = 8192,
    eod_id: int = 0,
    tensor: int = 1,
    pipeline: int = 1,
    train_steps: int = 200,
    seq_length: int = 128,
    global_batch_size: int = 16,
    micro_batch_size: int = 8,
    lr: float = 3e-3,
    min_lr: float = 3e-4,
    warmup_steps: int = 20,
    decay_fraction: float = 0.2,
    eval_interval: int = 25,
    eval_iters: int = 4,
    seed: int = 1234,
) -> run.Config[TrainConfig]:
    """The tiny Qwen3-style model (2 layers, width 64) pre-trained on the embedded default corpus.

    The same warmup-stable-decay shape as the paper, scaled down: linear warmup to `lr`, stable,
    then the last `decay_fraction` of the steps decay linearly to `min_lr`. Minutes on 2 CPU cores.

    Args:
        data_dir: a default-corpus directory (megatron_ext.data.build_default_corpus); its
            train_text_document prefix is split 95/5 into training and validation data.
        out_dir: where checkpoints/ and logs/metrics.jsonl go (default outputs/tiny-<preset>).
        preset: the loss preset.
        vocab_size: the corpus tokenizer's vocabulary size (the corpus manifest's vocab_size).
        eod_id: the corpus tokenizer's end-of-document id.
        tensor: tensor-parallel size (heads 4, kv groups 2: 1 or 2).
        pipeline: pipeline-parallel size (2 layers: 1 or 2).
        train_steps: optimizer steps.
        seq_length: tokens per sequence.
        global_batch_size: sequences per step.
        micro_batch_size: sequences per forward pass.
        lr: peak learning rate.
        min_lr: learning rate at the end of the decay.
        warmup_steps: linear warmup steps (capped below train_steps).
        decay_fraction: fraction of the steps spent decaying to min_lr.
        eval_interval: validate every this many steps and at the end.
        eval_iters: validation batches each time.
        seed: initialisation seed.
    """
    _check_preset(preset)
    out = _abs(out_dir if out_dir is not None else f"outputs/tiny-{preset}")
    return run.Config(
        TrainConfig,
        model=model_config("tiny", vocab_size=vocab_size, seq_length=seq_length),
        shaping=shaping_config(preset),
        parallel=run.Config(ParallelConfig, tensor=tensor, pipeline=pipeline),
        optimizer=_tiny_optimizer(
            lr,
            min_lr,
            warmup_steps=min(warmup_steps, train_steps - 1),
            decay_steps=math.floor(decay_fraction * train_steps),
        ),
        data=_tiny_data(data_dir, eod_id),
        checkpoint=run.Config(CheckpointConfig, save_dir=f"{out}/checkpoints"),
        logging=run.Config(LoggingConfig, log_dir=f"{out}/logs", tensorboard=False),
        train_steps=train_steps,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        eval_interval=eval_interval,
        eval_iters=eval_iters,
        seed=seed,
    )


def tiny_midtrain(
    *,
    load_dir: str | Path | None = None,
    init_from: str | Path | None = None,
    data_dir: str | Path = "outputs/main/corpus",
    out_dir: str | Path | None = None,
    preset: str = "ce",
    vocab_size: int | None = None,
    eod_id: int | None = None,
    tensor: int = 1,
    pipeline: int = 1,
    train_steps: int = 50,
    seq_length: int = 512,
    global_batch_size: int = 4,
    micro_batch_size: int = 2,
    lr: float = 3e-3,
    min_lr: float = 3e-4,
    eval_interval: int = 25,
    eval_iters: int = 4,
    seed: int = 1234,
) -> run.Config[TrainConfig]:
    """Mid-training of a tiny pre-trained model, the paper's recipe scaled down: 4x longer
    sequences at the same tokens per step, RoPE base 1e6, the learning rate decayed from lr to
    min_lr, starting from the weights of `load_dir` (not its optimizer state or data position)
    or of `init_from`.

    Args:
        load_dir: the pre-training run's checkpoint root (tiny_pretrain's checkpoints/).
        init_from: instead, a checkpoint root made by tools/import_hf.py (or any run's): its
            weights at step 0 (CheckpointConfig.init_from), and its model (the `model` table of
            its config.json) with this stage's seq_length and RoPE base.
        vocab_size: the corpus tokenizer's vocabulary size (default 8192; with init_from the
            import's, which a given value must equal).
        eod_id: the corpus tokenizer's end-of-document id (default 0; with init_from the
            import's).
        data_dir, out_dir, preset, tensor, pipeline, train_steps, seq_length, global_batch_size,
            micro_batch_size, lr, min_lr, eval_interval, eval_iters, seed: as in tiny_pretrain
            (out_dir defaults to outputs/tiny-<preset>-midtrain).

    Raises:
        ValueError: both or neither of load_dir and init_from; init_from without a model table
            in its config.json, or with a vocabulary other than vocab_size.
        ConfigError: init_from is no checkpoint root (naming what to pass instead).
    """
    _check_preset(preset)
    _start_of_midtrain("tiny_midtrain", load_dir, init_from, required=True)
    out = _abs(out_dir if out_dir is not None else f"outputs/tiny-{preset}-midtrain")
    stage = {"seq_length": seq_length, "rope_base": MIDTRAIN_ROPE_BASE}
    if init_from is None:
        model = model_config("tiny", vocab_size=vocab_size or 8192, **stage)
        start = {"load_dir": _abs(load_dir), "load_optimizer": False}
    else:
        init_from = _abs(init_from)
        imported = _imported_model("tiny_midtrain", init_from)
        if imported is None:
            raise ValueError(
                f"tiny_midtrain: init_from={init_from} has no config.json with a model table to "
                "take the model from; import the model with tools/import_hf.py, or mid-train "
                "with load_dir"
            )
        if vocab_size is not None and vocab_size != imported.vocab_size:
            raise ValueError(
                f"tiny_midtrain: the data's vocabulary (vocab_size={vocab_size}) differs from "
                f"the model of init_from={init_from} (model.vocab_size={imported.vocab_size}): "
                f"tokenize the data with the import's tokenizer ({init_from}/tokenizer, "
                "tools/preprocess_data.py --tokenizer)"
            )
        model = run.Config(ModelConfig, **(dataclasses.asdict(imported) | stage))
        start = {"init_from": init_from}
        if eod_id is None:
            eod_id = (recorded_run_config(init_from) or {}).get("data", {}).get("eod_id")
    return run.Config(
        TrainConfig,
        model=model,
        shaping=shaping_config(preset),
        parallel=run.Config(ParallelConfig, tensor=tensor, pipeline=pipeline),
        optimizer=_tiny_optimizer(lr, min_lr, warmup_steps=0, decay_steps=train_steps),
        data=_tiny_data(data_dir, eod_id if eod_id is not None else 0),
        checkpoint=run.Config(CheckpointConfig, save_dir=f"{out}/checkpoints", **start),
        logging=run.Config(LoggingConfig, log_dir=f"{out}/logs", tensorboard=False),
        train_steps=train_steps,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        eval_interval=eval_interval,
        eval_iters=eval_iters,
        seed=seed,
    )


# -- the paper's recipes (GPU clusters) -----------------------------------------------------------


def _check_paper_model(model: str, stage: str) -> PaperLayout:
    if model not in PAPER_MODELS:
        raise ValueError(f"unknown paper model {model!r}; choose one of {', '.join(PAPER_MODELS)}")
    return PAPER_LAYOUTS[(model, stage)]


def _steps(tokens: float) -> int:
    return round(tokens / GLOBAL_BATCH_TOKENS)


def _paper_optimizer(**schedule: object) -> run.Config[OptimizerConfig]:
    """The paper's AdamW (weight decay 0.1, clipping 1.0) at peak 3e-4 / final 3e-5."""
    return run.Config(
        OptimizerConfig,
        lr=PEAK_LR,
        min_lr=FINAL_LR,
        weight_decay=0.1,
        clip_grad=1.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_eps=1e-8,
        **schedule,
    )


def _paper_parallel(
    layout: PaperLayout,
    tensor: int | None,
    pipeline: int | None,
    expert: int | None,
    context: int | None = None,
) -> run.Config[ParallelConfig]:
    """The layout's TP, PP, EP and CP unless given, with the distributed optimizer and its
    communication overlapped with computation (megatron DDP's default bucket size)."""
    return run.Config(
        ParallelConfig,
        tensor=tensor or layout.tensor,
        pipeline=pipeline or layout.pipeline,
        expert=expert or layout.expert,
        context=context or layout.context,
        distributed_optimizer=True,
        overlap_grad_reduce=True,
        overlap_param_gather=True,
        ddp_bucket_size=None,
    )


def _paper_data(data_paths, data_weights, eod_id: int) -> run.Config[DataConfig]:
    return run.Config(
        DataConfig,
        paths=list(data_paths),
        weights=list(data_weights) if data_weights is not None else None,
        split="99,1,0",
        eod_id=eod_id,
    )


def paper_pretrain(
    model: str,
    *,
    preset: str = "ce",
    data_paths: Sequence[str] = ("/data/pretrain_text_document",),
    data_weights: Sequence[float] | None = None,
    eod_id: int = 151_643,
    out_dir: str | None = None,
    tensor: int | None = None,
    pipeline: int | None = None,
    expert: int | None = None,
    micro_batch_size: int | None = None,
    context: int | None = None,
    train_tokens: float = PRETRAIN_TOKENS,
    train_steps: int | None = None,
    save_interval: int = 1000,
    eval_interval: int = 1000,
    eval_iters: int = 4,
    use_transformer_engine: bool | None = None,
    recompute: str = "none",
    seed: int = 1234,
) -> run.Config[TrainConfig]:
    """Pre-training of a paper model (setup.md): 500B tokens, 4096 x 4096-token batches, AdamW
    (wd 0.1, clip 1.0), 2000 warmup steps to 3e-4 then stable, RoPE base 1e4, bf16.

    Args:
        model: one of PAPER_MODELS.
        preset: the loss preset.
        data_paths: indexed-dataset prefixes as the job sees them (tools/preprocess_data.py,
            tokenized with the Qwen3 tokenizer).
        data_weights: blend weights of data_paths (None: by size).
        eod_id: end-of-document id (Qwen3's <|endoftext|> is 151643).
        out_dir: checkpoints/ and logs/ (default /results/<model>-<preset>).
        tensor, pipeline, expert, micro_batch_size, context: override PAPER_LAYOUTS (context
            > 1 needs Transformer Engine).
        train_tokens: tokens to train on (the step count is train_tokens / 16M).
        train_steps: the step count instead (e.g. a short test run).
        save_interval: steps between checkpoints.
        eval_interval: steps between validations.
        eval_iters: validation batches each time.
        use_transformer_engine: the TE layer spec: None uses it where the ranks can import TE,
            True requires it, False never (the two name their norms differently in
            checkpoints: mid-training must use the spec pre-training used).
        recompute: activation recomputation (none, selective, full).
        seed: initialisation seed.
    """
    layout = _check_paper_model(model, "pretrain")
    _check_preset(preset)
    out = out_dir or f"/results/{model}-{preset}"
    return run.Config(
        TrainConfig,
        model=model_config(model, seq_length=PRETRAIN_SEQ_LENGTH, rope_base=PRETRAIN_ROPE_BASE),
        shaping=shaping_config(preset),
        parallel=_paper_parallel(layout, tensor, pipeline, expert, context),
        # Stable to the end of pre-training; mid-training decays.
        optimizer=_paper_optimizer(warmup_steps=WARMUP_STEPS, wsd_decay_steps=0),
        data=_paper_data(data_paths, data_weights, eod_id),
        checkpoint=run.Config(
            CheckpointConfig,
            save_dir=f"{out}/checkpoints",
            save_interval=save_interval,  # a requeued or resubmitted job resumes from here
            async_save=True,  # written by a forked process while training goes on
        ),
        logging=run.Config(LoggingConfig, log_dir=f"{out}/logs", log_interval=1),
        train_steps=train_steps or _steps(train_tokens),
        global_batch_size=GLOBAL_BATCH_TOKENS // PRETRAIN_SEQ_LENGTH,
        micro_batch_size=micro_batch_size or layout.micro_batch_size,
        eval_interval=eval_interval,
        eval_iters=eval_iters,
        seed=seed,
        bf16=True,
        use_transformer_engine=use_transformer_engine,
        recompute=recompute,
    )


def paper_midtrain(
    model: str,
    *,
    preset: str = "ce",
    load_dir: str | None = None,
    init_from: str | None = None,
    data_paths: Sequence[str] = ("/data/midtrain_text_document",),
    data_weights: Sequence[float] | None = None,
    eod_id: int = 151_643,
    out_dir: str | None = None,
    tensor: int | None = None,
    pipeline: int | None = None,
    expert: int | None = None,
    micro_batch_size: int | None = None,
    context: int | None = None,
    train_tokens: float = MIDTRAIN_TOKENS,
    train_steps: int | None = None,
    save_interval: int = 500,
    eval_interval: int = 500,
    eval_iters: int = 4,
    use_transformer_engine: bool | None = None,
    recompute: str = "full",
    seed: int = 1234,
) -> run.Config[TrainConfig]:
    """Mid-training of a paper model (setup.md): 100B tokens at sequence length 16384 (1024 x
    16384-token batches, still 16M tokens), RoPE base 1e6, the learning rate decayed linearly from
    3e-4 to 3e-5 over the whole stage, starting from the pre-trained weights.

    The pre-training checkpoint is loaded as weights only (CheckpointConfig.load_optimizer=False):
    the trainer restores the data position together with the optimizer state, and mid-training
    reads a different dataset from its start. An interrupted or requeued mid-training job resumes
    from its own checkpoints (<out_dir>/checkpoints) as soon as it has one, whole.

    `init_from` starts it from a Hugging Face base instead: a checkpoint root made by
    tools/import_hf.py (e.g. Qwen3-4B-Base for dense_4b), weights only from step 0
    (CheckpointConfig.init_from). Where that root is readable here, its model (config.json) is
    checked against `model`; as the nodes see it only, the trainer checks it when it loads.

    Args:
        model: one of PAPER_MODELS.
        preset: the loss preset.
        load_dir: the pre-training checkpoint root (default, unless init_from is given:
            /results/<model>-<preset>/checkpoints).
        init_from: instead of load_dir, an imported checkpoint root as the job sees it.
        data_paths, data_weights, eod_id: the mid-training data, as in paper_pretrain.
        out_dir: checkpoints/ and logs/ (default /results/<model>-<preset>-midtrain).
        tensor, pipeline, expert, micro_batch_size, context: override PAPER_LAYOUTS (its
            context-parallel layouts need Transformer Engine; without it use tp=<2 x tensor>
            cp=1).
        train_tokens: tokens to train on (the step count is train_tokens / 16M).
        train_steps: the step count instead (the decay spans it).
        recompute: activation recomputation (full by default: 16K-token sequences).
        save_interval, eval_interval, eval_iters, use_transformer_engine, seed: as in
            paper_pretrain.

    Raises:
        ValueError: both load_dir and init_from, or an init_from readable here that holds
            another model (every differing field named).
    """
    layout = _check_paper_model(model, "midtrain")
    _check_preset(preset)
    _start_of_midtrain("paper_midtrain", load_dir, init_from, required=False)
    out = out_dir or f"/results/{model}-{preset}-midtrain"
    steps = train_steps or _steps(train_tokens)
    stage = {"seq_length": MIDTRAIN_SEQ_LENGTH, "rope_base": MIDTRAIN_ROPE_BASE}
    if init_from is not None:
        _check_imported_model("paper_midtrain", init_from, model_preset(model, **stage))
        start: dict[str, object] = {"init_from": init_from}
    else:
        start = {
            "load_dir": load_dir or f"/results/{model}-{preset}/checkpoints",
            "load_optimizer": False,
        }
    return run.Config(
        TrainConfig,
        model=model_config(model, **stage),
        shaping=shaping_config(preset),
        parallel=_paper_parallel(layout, tensor, pipeline, expert, context),
        # The whole stage decays 3e-4 -> 3e-5.
        optimizer=_paper_optimizer(warmup_steps=0, wsd_decay_steps=steps, wsd_decay_style="linear"),
        data=_paper_data(data_paths, data_weights, eod_id),
        checkpoint=run.Config(
            CheckpointConfig,
            save_dir=f"{out}/checkpoints",
            save_interval=save_interval,
            async_save=True,
            **start,
        ),
        logging=run.Config(LoggingConfig, log_dir=f"{out}/logs", log_interval=1),
        train_steps=steps,
        global_batch_size=GLOBAL_BATCH_TOKENS // MIDTRAIN_SEQ_LENGTH,
        micro_batch_size=micro_batch_size or layout.micro_batch_size,
        eval_interval=eval_interval,
        eval_iters=eval_iters,
        seed=seed,
        bf16=True,
        recompute=recompute,
        use_transformer_engine=use_transformer_engine,
    )


def get_recipe(name: str, stage: str = "pretrain") -> Callable[..., run.Config[TrainConfig]]:
    """The recipe function for a recipe name (tiny or a paper model) and a stage.

    The paper recipes come back with the model bound: `get_recipe("dense_4b")(preset=...)`.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    if name == "tiny":
        return tiny_pretrain if stage == "pretrain" else tiny_midtrain
    if name not in PAPER_MODELS:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPE_NAMES)}")
    return functools.partial(paper_pretrain if stage == "pretrain" else paper_midtrain, name)
