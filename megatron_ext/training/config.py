"""Typed configuration of a pre-training run, validated up front.

`TrainConfig.validate(world_size)` checks every divisibility rule megatron-core relies on (heads,
kv groups, layers, experts, FFN sizes, sequence length, batch sizes against the parallel layout)
before any process group, model or dataset is created, and names the offending values.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from pathlib import Path
from typing import Any

from megatron_ext.loss import RewardShapingConfig
from megatron_ext.models import ModelConfig, model_preset

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "read_config_file",
]


PAPER_WARMUP_STEPS = 2000
"""Warmup of the paper's schedule (setup.md), the default of OptimizerConfig.warmup_steps."""

RECOMPUTE_CHOICES = ("none", "selective", "full")
"""Values of TrainConfig.recompute."""

DEVICE_CHOICES = ("auto", "cuda", "cpu")
"""Values of TrainConfig.device."""


class ConfigError(ValueError):
    """A run configuration that cannot work (raised before any distributed work starts)."""


def _check_int(owner: str, name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{owner}.{name} must be an int, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{owner}.{name} must be >= {minimum}, got {value!r}")


def _divisors(n: int) -> str:
    """The divisors of n, smallest first, as text for an error message ("1, 2, 4")."""
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    large = [n // d for d in reversed(small) if d * d != n]
    return ", ".join(str(d) for d in small + large)


def _check_float(owner: str, name: str, value: object, minimum: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise ConfigError(f"{owner}.{name} must be a number >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How the model and data are split over ranks (data parallel = world / (tensor * pipeline))."""

    tensor: int = 1
    """Tensor-parallel size (heads, kv groups, FFN and vocabulary are split)."""
    pipeline: int = 1
    """Pipeline-parallel size (layers are split into this many stages)."""
    virtual_pipeline: int = 1
    """Model chunks per pipeline stage (megatron's virtual pipeline, the interleaved 1F1B
    schedule): each stage holds this many non-adjacent slices of num_layers / (pipeline *
    virtual_pipeline) layers, which shrinks the pipeline bubble by this factor for as many more
    point-to-point transfers; 1: one chunk per stage. Needs pipeline >= 2."""
    expert: int = 1
    """Expert-parallel size (MoE experts are split; carved out of the data-parallel ranks)."""
    sequence_parallel: bool | None = None
    """Sequence parallelism; None turns it on when tensor > 1 (required for MoE with TP > 1)."""
    context: int = 1
    """Context-parallel size (each sequence is split into 2 * context chunks over this many
    ranks; carved out of the data-parallel ranks). megatron-core implements it in Transformer
    Engine's attention only, so context > 1 needs Transformer Engine."""
    distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (megatron's DistributedOptimizer)."""
    overlap_grad_reduce: bool = False
    """Start each gradient bucket's all-reduce (reduce-scatter with the distributed optimizer)
    during the backward pass, as soon as the bucket's gradients are complete (megatron DDP)."""
    overlap_param_gather: bool = False
    """All-gather the updated parameters bucket by bucket during the next forward pass instead of
    right after the optimizer step; needs distributed_optimizer."""
    ddp_bucket_size: int | None = None
    """Parameters per gradient bucket when overlapping (None: megatron's default, max(40M, 1M *
    data-parallel size)); without overlap_grad_reduce there is one bucket per dtype."""

    def __post_init__(self) -> None:
        for name in ("tensor", "pipeline", "virtual_pipeline", "expert", "context"):
            _check_int("ParallelConfig", name, getattr(self, name), 1)
        if self.virtual_pipeline > 1 and self.pipeline < 2:
            raise ConfigError(
                f"ParallelConfig.virtual_pipeline={self.virtual_pipeline} needs pipeline "
                f"parallelism (pipeline >= 2), got pipeline={self.pipeline}: the model chunks of "
                "a virtual pipeline interleave between pipeline stages; set parallel.pipeline to "
                "2 or more, or virtual_pipeline=1"
            )
        if self.ddp_bucket_size is not None:
            _check_int("ParallelConfig", "ddp_bucket_size", self.ddp_bucket_size, 1)
        if self.overlap_param_gather and not self.distributed_optimizer:
            raise ConfigError(
                "ParallelConfig.overlap_param_gather=True needs the distributed optimizer (the "
                "parameters it all-gathers are the optimizer's shards): set "
                "parallel.distributed_optimizer=True, or overlap_param_gather=False"
            )

    @property
    def use_sequence_parallel(self) -> bool:
        """Whether sequence parallelism is on."""
        if self.sequence_parallel is None:
            return self.tensor > 1
        return self.sequence_parallel


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW with a warmup-stable-decay learning rate (setup.md)."""

    lr: float = 3e-4
    """Peak learning rate, reached after warmup and held during the stable phase."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay phase."""
    warmup_steps: int | None = None
    """Linear warmup from 0 to lr, in optimizer steps; None: the paper's 2,000, but at most a
    tenth of the schedule (so that a short run warms up too)."""
    decay_steps: int | None = None
    """Length of the whole schedule in steps; None means train_steps."""
    wsd_decay_steps: int = 0
    """Final steps of the schedule spent decaying lr to min_lr; 0 keeps lr stable throughout."""
    wsd_decay_style: str = "linear"
    """Shape of the decay: linear, cosine, exponential or minus_sqrt."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms)."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    override_scheduler: bool = False
    """On resume, take the schedule from this config instead of the checkpoint (mid-training)."""

    def warmup_for(self, schedule_steps: int) -> int:
        """The warmup steps of a schedule of `schedule_steps` steps (see warmup_steps)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(PAPER_WARMUP_STEPS, schedule_steps // 10)

    def __post_init__(self) -> None:
        owner = "OptimizerConfig"
        for name in ("lr", "min_lr", "weight_decay", "clip_grad", "adam_eps"):
            _check_float(owner, name, getattr(self, name))
        if self.min_lr > self.lr:
            raise ConfigError(f"{owner}.min_lr={self.min_lr} exceeds lr={self.lr}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            _check_float(owner, name, value)
            if value >= 1:
                raise ConfigError(f"{owner}.{name} must be < 1, got {value!r}")
        if self.warmup_steps is not None:
            _check_int(owner, "warmup_steps", self.warmup_steps, 0)
        _check_int(owner, "wsd_decay_steps", self.wsd_decay_steps, 0)
        if self.decay_steps is not None:
            _check_int(owner, "decay_steps", self.decay_steps, 1)
        styles = ("linear", "cosine", "exponential", "minus_sqrt")
        if self.wsd_decay_style not in styles:
            raise ConfigError(
                f"{owner}.wsd_decay_style={self.wsd_decay_style!r}; choose one of {styles}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Indexed (.bin/.idx) token data read through megatron-core's GPTDataset."""

    paths: tuple[str, ...] = ()
    """Path prefixes of indexed datasets (without .bin/.idx)."""
    weights: tuple[float, ...] | None = None
    """Blend weights of `paths` (None: proportional to size)."""
    split: str = "98,2,0"
    """Train/validation/test split of every dataset, in parts (megatron syntax)."""
    eod_id: int = 0
    """End-of-document token id (used for eod_mask_loss and megatron's document index)."""
    eod_mask_loss: bool = False
    """Exclude end-of-document tokens from the loss."""
    seed: int = 1234
    """Seed of megatron's sample shuffling."""
    cache_dir: str | None = None
    """Where megatron caches its dataset indices (None: next to the data)."""
    scan_token_ids: bool = True
    """Before training, read every token once to check it is < model.vocab_size (the file
    headers and sizes are always checked); turn off for huge corpora already checked."""
    num_workers: int | None = None
    """DataLoader worker processes reading the samples of each rank (megatron's
    --num-workers); 0 reads them in the training process. None: 2 on CUDA, 0 on CPU (on CPU the
    workers compete with the training ranks for the same cores)."""
    pin_memory: bool | None = None
    """Read into pinned host memory, so that the copies to the GPU overlap the step (None: on
    CUDA; no effect on CPU)."""
    prefetch_factor: int = 2
    """Micro-batches each worker reads ahead (with num_workers > 0)."""
    persistent_workers: bool = True
    """Keep the validation loader's workers between validations (the training loader is read in
    one pass per run, so its workers live for the run either way)."""

    def __post_init__(self) -> None:
        if isinstance(self.paths, str):
            raise ConfigError(
                f"DataConfig.paths must be a sequence of prefixes, got {self.paths!r}"
            )
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
        if self.weights is not None:
            try:
                object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            except (TypeError, ValueError):
                raise ConfigError(
                    f"DataConfig.weights must be numbers, got {self.weights!r}"
                ) from None
            if len(self.weights) != len(self.paths):
                raise ConfigError(
                    f"DataConfig.weights has {len(self.weights)} entries for "
                    f"{len(self.paths)} paths"
                )
        _check_int("DataConfig", "eod_id", self.eod_id, 0)
        if self.num_workers is not None:
            _check_int("DataConfig", "num_workers", self.num_workers, 0)
        _check_int("DataConfig", "prefetch_factor", self.prefetch_factor, 1)
        for name in ("pin_memory", "persistent_workers"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "pin_memory" and value is None):
                raise ConfigError(f"DataConfig.{name} must be true or false, got {value!r}")
        parts = self.split.replace("/", ",").split(",")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"DataConfig.split={self.split!r} is not like '98,2,0'") from None
        if len(values) > 3 or sum(values) <= 0 or min(values) < 0:
            raise ConfigError(f"DataConfig.split={self.split!r} is not like '98,2,0'")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """megatron dist_checkpointing of model, optimizer, scheduler, RNG and data position."""

    save_dir: str | None = None
    """Where checkpoints are written (iter_XXXXXXX/ folders and a `latest` file). A run whose
    save_dir already holds checkpoints resumes from the latest of them: relaunching the same
    command continues the run (see `overwrite` to start anew)."""
    save_interval: int = 0
    """Save every this many steps (0: only at the end, when save_dir is set)."""
    load_dir: str | None = None
    """The checkpoint root to start from while save_dir holds no checkpoint yet (e.g. the
    pre-training run a mid-training run continues); it must exist (an existing, empty folder
    means a first launch). None: start from scratch."""
    init_from: str | None = None
    """A checkpoint root whose latest checkpoint's weights initialise the model while save_dir
    holds no checkpoint yet: optimizer, scheduler, step and data position start fresh (e.g. a
    Hugging Face model imported with tools/import_hf.py, or another run's checkpoints). Unlike
    load_dir it never resumes a run; it must be a checkpoint, checked before the run starts."""
    load_step: int | None = None
    """Load this step (of load_dir, else of save_dir) instead of the latest checkpoint."""
    load_optimizer: bool = True
    """When loading load_dir, also restore its optimizer, scheduler, RNG and data position;
    False takes the weights only and starts at step 0. A resume from save_dir always restores
    everything."""
    overwrite: bool = False
    """Start anew although save_dir holds checkpoints of an earlier run (or log_dir its
    metrics): the checkpoints after the starting step and the metrics of those steps are removed
    first. Without it such a start is refused, so that `latest` never moves back and two runs'
    metrics never mix."""
    keep_last: int = 0
    """Keep only the newest this many checkpoints in save_dir (0: keep all)."""
    save_on_sigterm: bool = True
    """On SIGTERM (Slurm preemption, torchrun shutdown) finish the current step, save a
    checkpoint and return; needs save_dir."""
    optimizer_format: str = "fully_reshardable"
    """How the distributed optimizer's state is saved (megatron's distrib_optim_sharding_type):
    "fully_reshardable" resumes at any TP/PP/DP/EP layout, but a save or load holds one TP/PP
    shard's optimizer state (12 bytes a parameter) in host memory on every rank for a moment;
    "dp_reshardable" (megatron-training's default) holds only the rank's own part and resumes
    at another DP size only."""
    async_save: bool = False
    """Write checkpoints asynchronously (megatron-core's AsyncCallsQueue): a forked process
    writes while training goes on, and the checkpoint is published (renamed into place, `latest`
    moved) at the first step after every rank's writer finished; a save waits for the one before
    it, and the run for the last one. A kill while it writes leaves `latest` at the previous
    checkpoint. Needs ranks that may fork (torchrun's; not daemonic processes)."""

    def __post_init__(self) -> None:
        if self.optimizer_format not in OPTIMIZER_FORMATS:
            raise ConfigError(
                f"checkpoint.optimizer_format={self.optimizer_format!r}; choose one of "
                f"{', '.join(OPTIMIZER_FORMATS)}"
            )
        _check_int("CheckpointConfig", "save_interval", self.save_interval, 0)
        _check_int("CheckpointConfig", "keep_last", self.keep_last, 0)
        if self.load_step is not None:
            _check_int("CheckpointConfig", "load_step", self.load_step, 0)
        if self.init_from is not None:
            object.__setattr__(self, "init_from", str(self.init_from))  # a Path as text
        if self.init_from is not None and self.load_dir is not None:
            raise ConfigError(
                f"checkpoint.init_from={self.init_from} and checkpoint.load_dir={self.load_dir} "
                "both name where the run starts: init_from takes a checkpoint's weights only, "
                "load_dir continues a run (or takes its weights with load_optimizer=false); set "
                "one of them"
            )


OPTIMIZER_FORMATS = ("fully_reshardable", "dp_reshardable")
"""CheckpointConfig.optimizer_format's choices."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """Per-step metrics: console, a JSONL file and TensorBoard (written by global rank 0)."""

    log_dir: str | None = None
    """Folder of metrics.jsonl and the TensorBoard events (None: console only)."""
    log_interval: int = 1
    """Log every this many steps (entropy, p(x) and top-k mass are computed on these steps only:
    they cost a top-k search per position when the shaping needs none)."""
    console: bool = True
    """Print a line per logged step."""
    tensorboard: bool = True
    """Write TensorBoard scalars under log_dir."""
    log_samples: bool = False
    """Also write samples.jsonl under log_dir: per step, the dataset indices of the global batch
    and a CRC32 of each data-parallel rank's tokens (to audit the data order across resumes)."""

    def __post_init__(self) -> None:
        _check_int("LoggingConfig", "log_interval", self.log_interval, 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One pre-training run."""

    model: ModelConfig
    """Model shape (see megatron_ext.models.model_preset)."""
    shaping: RewardShapingConfig = dataclasses.field(default_factory=RewardShapingConfig)
    """The reward shaping of the loss (RewardShapingConfig.preset('precision') etc.)."""
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    """Parallel layout."""
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    """Optimizer and learning-rate schedule."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """Training and validation data."""
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    """Metrics output."""
    train_steps: int = 1
    """Optimizer steps to run (in total, counting steps done before a resume)."""
    global_batch_size: int = 8
    """Sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 1
    """Sequences per forward pass on one rank (the rest is gradient accumulation)."""
    eval_interval: int = 0
    """Validate every this many steps and at the end (0: never)."""
    eval_iters: int = 1
    """Global batches of validation data per validation (always the same held-out samples)."""
    seed: int = 1234
    """Seed of weight initialisation (offset by 100 per pipeline stage, as megatron does)."""
    bf16: bool = False
    """bf16 parameters and activations with fp32 main weights (megatron mixed precision)."""
    use_transformer_engine: bool | None = False
    """Use the Transformer Engine layer spec: True (an error when TE is not installed), False
    (the local torch spec), or None: TE when it can be imported (see uses_transformer_engine).
    The two specs name the layer norms differently in checkpoints: resume with the same one."""
    recompute: str = "none"
    """Activation recomputation in the backward pass: 'none', 'selective' (megatron's selective
    granularity: the core attention of every layer) or 'full' (every layer's whole forward).
    Config files may still say recompute_activations = true, which means 'full'."""
    device: str = "auto"
    """Where the ranks compute: 'cuda' (an error without a GPU), 'cpu' (gloo, even with a GPU)
    or 'auto': CUDA when torch sees a GPU, the CPU when the machine has none, and an error when
    CUDA_VISIBLE_DEVICES names GPUs that torch cannot see (a broken driver)."""
    fused_output_loss: bool = True
    """Compute the output layer and the loss together, a chunk of positions at a time, without
    ever materialising the [s, b, V/tp] logits (megatron-core's output_processor seam; the same
    results as the unfused path). False: the output layer's logits, then the loss."""
    native_cross_entropy: bool = False
    """Train with megatron-core's own cross-entropy instead of the shaped loss (a baseline: the
    shaping config is ignored and entropy / p(x) / top-k mass are not logged)."""
    backend: str | None = None
    """torch.distributed backend; None: nccl with a GPU, gloo without."""
    seq_length: int | None = None
    """Tokens per training sample; None: model.seq_length, which it may not exceed."""
    on_nonfinite: str = "skip"
    """A step whose loss or gradients are NaN or infinite on any rank is never applied: 'skip'
    drops it (its data included) and goes on, 'stop' raises NonFiniteError naming the step and
    the ranks."""
    max_consecutive_skips: int = 3
    """With on_nonfinite='skip', stop as 'stop' does after this many skipped steps in a row."""

    def __post_init__(self) -> None:
        owner = "TrainConfig"
        for name in ("train_steps", "global_batch_size", "micro_batch_size", "eval_iters"):
            _check_int(owner, name, getattr(self, name), 1)
        _check_int(owner, "eval_interval", self.eval_interval, 0)
        _check_int(owner, "max_consecutive_skips", self.max_consecutive_skips, 1)
        if self.seq_length is not None:
            _check_int(owner, "seq_length", self.seq_length, 1)
        if self.on_nonfinite not in ("skip", "stop"):
            raise ConfigError(
                f"{owner}.on_nonfinite={self.on_nonfinite!r}; choose 'skip' or 'stop'"
            )
        if self.backend not in (None, "nccl", "gloo"):
            raise ConfigError(f"{owner}.backend={self.backend!r}; choose nccl, gloo or None")
        if self.recompute not in RECOMPUTE_CHOICES:
            raise ConfigError(
                f"{owner}.recompute={self.recompute!r}; choose one of {RECOMPUTE_CHOICES}"
            )
        if self.device not in DEVICE_CHOICES:
            raise ConfigError(f"{owner}.device={self.device!r}; choose one of {DEVICE_CHOICES}")
        if self.device == "cpu" and self.backend == "nccl":
            raise ConfigError(
                f"{owner}.backend='nccl' cannot run with device='cpu' (NCCL needs GPUs); use "
                "backend='gloo' or None"
            )
        if self.use_transformer_engine not in (None, True, False):
            raise ConfigError(
                f"{owner}.use_transformer_engine={self.use_transformer_engine!r}; choose true, "
                "false or None (TE when installed)"
            )
        if self.shaping.uses_top_k and self.shaping.top_k > self.model.vocab_size:
            raise ConfigError(
                f"shaping.top_k={self.shaping.top_k} exceeds model.vocab_size="
                f"{self.model.vocab_size}; use a top_k of at most {self.model.vocab_size}"
            )

    @property
    def sequence_length(self) -> int:
        """Tokens per training sample (seq_length, or model.seq_length when unset)."""
        return self.seq_length or self.model.seq_length

    @property
    def uses_transformer_engine(self) -> bool:
        """Whether the run uses the Transformer Engine spec (use_transformer_engine resolved:
        None means TE when it can be imported here)."""
        if self.use_transformer_engine is None:
            from megatron_ext.models import have_transformer_engine

            return have_transformer_engine()
        return self.use_transformer_engine

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel ranks for this world size (context-parallel ranks excluded)."""
        p = self.parallel
        return world_size // (p.tensor * p.pipeline * p.context)

    def validate(self, world_size: int, *, check_environment: bool = True) -> None:
        """Check the run against the parallel layout; raise ConfigError naming the values.

        Args:
            world_size: number of ranks the run will use.
            check_environment: also check this machine (Transformer Engine installed where the
                run needs it); False for a run whose ranks start elsewhere (a cluster image),
                where use_transformer_engine=None is taken to find TE.
        """
        _check_int("world_size", "world_size", world_size, 1)
        p, m = self.parallel, self.model
        tp, pp, ep, cp = p.tensor, p.pipeline, p.expert, p.context
        errors: list[str] = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                errors.append(message)

        if cp == 1:
            need(
                world_size % (tp * pp) == 0,
                f"world_size={world_size} is not divisible by parallel.tensor * parallel.pipeline"
                f" = {tp} * {pp} = {tp * pp}; launch a multiple of {tp * pp} ranks, or change "
                "them",
            )
        else:
            need(
                world_size % (tp * pp * cp) == 0,
                f"world_size={world_size} is not divisible by parallel.tensor * parallel.pipeline"
                f" * parallel.context = {tp} * {pp} * {cp} = {tp * pp * cp}; launch a multiple "
                f"of {tp * pp * cp} ranks, or change them",
            )
        need(
            m.num_attention_heads % tp == 0,
            f"parallel.tensor={tp} does not divide model.num_attention_heads="
            f"{m.num_attention_heads} (sizes that do: {_divisors(m.num_attention_heads)})",
        )
        need(
            m.num_query_groups % tp == 0,
            f"parallel.tensor={tp} does not divide model.num_query_groups={m.num_query_groups}"
            f" (sizes that do: {_divisors(m.num_query_groups)})",
        )
        need(
            m.ffn_hidden_size % tp == 0,
            f"parallel.tensor={tp} does not divide model.ffn_hidden_size={m.ffn_hidden_size}"
            f" (sizes that do: {_divisors(m.ffn_hidden_size)})",
        )
        padded_vocab = m.padded_vocab_size(tp)
        need(
            padded_vocab % tp == 0,
            f"parallel.tensor={tp} does not divide the padded vocabulary {padded_vocab} "
            f"(model.vocab_size={m.vocab_size})",
        )
        need(
            m.num_layers % pp == 0,
            f"parallel.pipeline={pp} does not divide model.num_layers={m.num_layers}"
            f" (sizes that do: {_divisors(m.num_layers)})",
        )
        vp = p.virtual_pipeline
        if vp > 1 and m.num_layers % pp == 0:
            need(
                m.num_layers % (pp * vp) == 0,
                f"parallel.pipeline * parallel.virtual_pipeline = {pp} * {vp} = {pp * vp} does "
                f"not divide model.num_layers={m.num_layers} (every model chunk holds the same "
                f"number of layers); choose a virtual_pipeline that divides "
                f"{m.num_layers // pp} (the layers of one stage): "
                f"{_divisors(m.num_layers // pp)}",
            )
        need(
            self.sequence_length <= m.seq_length,
            f"seq_length={self.sequence_length} exceeds the model's maximum sequence length "
            f"model.seq_length={m.seq_length}; lower seq_length or raise model.seq_length",
        )
        if cp > 1:
            need(
                self.sequence_length % (2 * cp) == 0,
                f"parallel.context={cp} needs a sequence length divisible by 2 * context = "
                f"{2 * cp} (each sequence is split into that many chunks), got "
                f"{self.sequence_length}; use a multiple of {2 * cp}",
            )
        local_length = self.sequence_length // cp  # the tokens of one context-parallel shard
        splits = cp == 1 or self.sequence_length % (2 * cp) == 0  # else reported above
        if p.use_sequence_parallel and splits:
            where = f" / parallel.context={cp} = {local_length}" if cp > 1 else ""
            need(
                local_length % tp == 0,
                f"parallel.tensor={tp} does not divide the sequence length "
                f"{self.sequence_length}{where} (sequence parallelism splits the sequence); use "
                f"a seq_length that is a multiple of {tp * (2 * cp if cp > 1 else 1)}",
            )
        if m.is_moe:
            need(
                m.num_experts % ep == 0,
                f"parallel.expert={ep} does not divide model.num_experts={m.num_experts}"
                f" (sizes that do: {_divisors(m.num_experts)})",
            )
            need(
                m.moe_ffn_hidden_size % tp == 0,
                f"parallel.tensor={tp} does not divide model.moe_ffn_hidden_size="
                f"{m.moe_ffn_hidden_size} (sizes that do: {_divisors(m.moe_ffn_hidden_size)})",
            )
            if tp > 1:
                need(
                    p.use_sequence_parallel,
                    f"MoE with parallel.tensor={tp} needs sequence parallelism "
                    "(parallel.sequence_parallel=False was set)",
                )
        else:
            need(ep == 1, f"parallel.expert={ep} needs an MoE model (model.num_experts=0)")
        if world_size % (tp * pp * cp) == 0:
            dp = self.data_parallel_size(world_size)
            context = f" * context={cp}" if cp > 1 else ""
            need(
                dp % ep == 0,
                f"parallel.expert={ep} does not divide the data-parallel size {dp} "
                f"(world_size={world_size} / (tensor={tp} * pipeline={pp}{context})); sizes "
                f"that do: {_divisors(dp)}",
            )
            step = self.micro_batch_size * dp
            below = self.global_batch_size // step * step
            need(
                self.global_batch_size % step == 0,
                f"global_batch_size={self.global_batch_size} is not divisible by "
                f"micro_batch_size * data-parallel size = {self.micro_batch_size} * {dp} = "
                f"{step}; use a multiple of {step}, e.g. "
                + (f"{below} or {below + step}" if below else f"{step}"),
            )
            if vp > 1 and self.global_batch_size % step == 0:
                # megatron's interleaved schedule runs the micro-batches in groups of `pipeline`
                # (microbatch_group_size_per_vp_stage), every group complete.
                micro = self.global_batch_size // step
                group = step * pp
                need(
                    micro % pp == 0,
                    f"parallel.virtual_pipeline={vp} runs megatron's interleaved schedule, which "
                    f"needs a number of micro-batches per data-parallel rank divisible by "
                    f"parallel.pipeline={pp}, got {micro} (global_batch_size="
                    f"{self.global_batch_size} / (micro_batch_size={self.micro_batch_size} * "
                    f"data-parallel size {dp})); use a global_batch_size that is a multiple of "
                    f"{group}, e.g. "
                    + (
                        f"{self.global_batch_size // group * group} or "
                        if self.global_batch_size > group
                        else ""
                    )
                    + f"{(self.global_batch_size // group + 1) * group}, or virtual_pipeline=1",
                )
        decay = self.optimizer.decay_steps or self.train_steps
        need(
            self.optimizer.warmup_for(decay) < decay,
            f"optimizer.warmup_steps={self.optimizer.warmup_steps} must be smaller than the "
            f"schedule length {decay} (optimizer.decay_steps or train_steps)",
        )
        need(
            self.optimizer.wsd_decay_steps <= decay,
            f"optimizer.wsd_decay_steps={self.optimizer.wsd_decay_steps} exceeds the schedule "
            f"length {decay}",
        )
        need(bool(self.data.paths), "data.paths is empty: give at least one indexed dataset prefix")
        if self.use_transformer_engine and check_environment:
            from megatron_ext.models import have_transformer_engine

            need(
                have_transformer_engine(),
                "use_transformer_engine=True, but Transformer Engine is not installed "
                "(install megatron_ext[te] on a CUDA machine, or use the local spec)",
            )
        if cp > 1:
            # megatron-core's context parallelism lives in TE's attention (TEDotProductAttention);
            # its local attention refuses it.
            need(
                self.use_transformer_engine is not False,
                f"parallel.context={cp} needs the Transformer Engine layer spec (megatron-core "
                "implements context parallelism in TE's attention only), but "
                "use_transformer_engine=False; set use_transformer_engine to true or None, or "
                "parallel.context=1 (e.g. with a larger parallel.tensor)",
            )
            if self.use_transformer_engine is None and check_environment:
                need(
                    self.uses_transformer_engine,
                    f"parallel.context={cp} needs Transformer Engine (megatron-core implements "
                    "context parallelism in TE's attention only), which is not installed here "
                    "(use_transformer_engine=None found none); install megatron_ext[te] on a "
                    "CUDA machine, or use parallel.context=1 (e.g. with a larger "
                    "parallel.tensor)",
                )
        if self.checkpoint.async_save and self.checkpoint.save_dir and check_environment:
            import multiprocessing

            # megatron's AsyncCallsQueue forks the writer; multiprocessing forbids a daemonic
            # process children (a rank of a multiprocessing pool, e.g.)
            need(
                not multiprocessing.current_process().daemon,
                "checkpoint.async_save=True forks a writer process, which a daemonic process "
                "(this rank's) may not start; launch the ranks with torchrun (or as non-daemonic "
                "processes), or set checkpoint.async_save=False",
            )
        if self.checkpoint.keep_last and not self.checkpoint.save_dir:
            errors.append(
                f"checkpoint.keep_last={self.checkpoint.keep_last} needs checkpoint.save_dir"
            )
        if self.checkpoint.save_interval and not self.checkpoint.save_dir:
            errors.append(
                f"checkpoint.save_interval={self.checkpoint.save_interval} needs checkpoint.save_dir"
            )
        if errors:
            raise ConfigError("invalid training configuration:\n  - " + "\n  - ".join(errors))


_SECTIONS: dict[str, type] = {
    "shaping": RewardShapingConfig,
    "parallel": ParallelConfig,
    "optimizer": OptimizerConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}


def _check_fields(cls: type, values: dict[str, Any], where: str) -> None:
    """Refuse fields `cls` does not have, and non-booleans for its boolean fields (a string such
    as "false" would otherwise be taken as true)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown field(s) {unknown} in {where}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if hints.get(key) in (bool, bool | None) and not isinstance(value, bool | None):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    _check_fields(cls, values, where)
    hints = typing.get_type_hints(cls)
    converted = {}
    for key, value in values.items():
        if isinstance(value, list) and "tuple" in str(hints.get(key, "")):
            value = tuple(value)
        converted[key] = value
    try:
        return cls(**converted)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from nested plain values (as in a JSON or TOML file).

    `model` is a preset name, or a table with an optional `preset` plus field overrides;
    `shaping` is a preset name or a table of RewardShapingConfig fields.
    """
    values = dict(values)
    if "model" not in values:
        raise ConfigError("the configuration has no 'model' (a preset name or a table)")
    model = values.pop("model")
    if isinstance(model, str):
        model = {"preset": model}
    if isinstance(model, dict):
        model = dict(model)
        preset = model.pop("preset", None)
        _check_fields(ModelConfig, model, "model")
        try:
            model_cfg = model_preset(preset, **model) if preset else ModelConfig(**model)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model: {exc}") from exc
    elif isinstance(model, ModelConfig):
        model_cfg = model
    else:
        raise ConfigError(f"model must be a preset name or a table, got {model!r}")
    _migrate_recompute_activations(values)
    kwargs: dict[str, Any] = {"model": model_cfg}
    for key, value in values.items():
        cls = _SECTIONS.get(key)
        if cls is None or isinstance(value, cls):
            kwargs[key] = value
        elif key == "shaping" and isinstance(value, str):
            try:
                kwargs[key] = RewardShapingConfig.preset(value)
            except ValueError as exc:
                raise ConfigError(f"shaping: {exc}") from None
        elif isinstance(value, dict):
            kwargs[key] = _build(cls, value, key)
        else:
            raise ConfigError(f"{key} must be a table, got {value!r}")
    return _build(TrainConfig, kwargs, "the configuration")


def _migrate_recompute_activations(values: dict[str, Any]) -> None:
    """The former boolean `recompute_activations` (config files and the config.json of older
    checkpoints) as `recompute`: true is 'full', false is 'none' (in place)."""
    if "recompute_activations" not in values:
        return
    legacy = values.pop("recompute_activations")
    if not isinstance(legacy, bool):
        raise ConfigError(
            f"the configuration: recompute_activations must be true or false, got {legacy!r} "
            "(it is the former spelling of recompute = 'full' / 'none')"
        )
    meant = "full" if legacy else "none"
    given = values.get("recompute", meant)
    if given != meant:
        raise ConfigError(
            f"the configuration sets recompute_activations={legacy} and recompute={given!r}; "
            f"keep recompute only (recompute_activations={legacy} means recompute={meant!r})"
        )
    values["recompute"] = meant


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain nested values of a TrainConfig (JSON-serialisable; round-trips config_from_dict)."""
    out = dataclasses.asdict(config)
    for name in ("PRESET_NAMES",):
        out["shaping"].pop(name, None)
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The plain values of a .json or .toml config file; ConfigError naming the file (and the
    line of a syntax error) when it cannot be read."""
    path = Path(path)
    if path.suffix not in (".json", ".toml"):
        raise ConfigError(f"config file {path} must be .json or .toml")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"cannot read config file {path}: {reason}") from None
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except ValueError as exc:  # TOMLDecodeError and JSONDecodeError give the line and column
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:]}: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a table of fields, got {values!r}")
    return values


def load_config(path: str | Path) -> TrainConfig:
    """A TrainConfig from a .json or .toml file."""
    return config_from_dict(read_config_file(path))
