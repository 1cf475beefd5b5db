"""Pre-training with the reward-shaped loss, built from megatron-core parts.

parallel_state (TP, PP, virtual PP, CP, EP, DP) -> ShapedLossGPTModel chunks (local or TE spec;
one per pipeline stage, or parallel.virtual_pipeline of them with megatron's virtual pipeline),
each in megatron DDP (gradient reduce and parameter all-gather optionally overlapped with the
backward and forward passes, bucket by bucket) -> get_megatron_optimizer over the chunks (AdamW,
distributed optimizer optional) -> OptimizerParamScheduler (warmup-stable-decay) ->
get_forward_backward_func (1F1B, or the interleaved 1F1B with model chunks) over micro-batches of
GPTDataset samples -> finalize_model_grads (grads divided by the global loss-token count, summed
over the data- and context-parallel ranks) -> dist_checkpointing (one sharded state dict per
chunk).

The same code runs with NCCL on GPUs and with gloo on CPU (megatron_ext.core.cpu_compat bridges
megatron-core's CUDA-only calls when no GPU is used; TrainConfig.device chooses). Entry point:
`pretrain(config)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from functools import partial
from typing import Any, Self

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import unwrap_model

from megatron_ext.core import install_cpu_compat
from megatron_ext.core.parallel import destroy_new_process_groups, process_groups
from megatron_ext.core.quiet import transformer_engine_notice
from megatron_ext.data.errors import DataError
from megatron_ext.loss import ShapedLossStats
from megatron_ext.loss.vocab_parallel import INPUT_FLAGS
from megatron_ext.models import IGNORE_INDEX, build_model, to_transformer_config
from megatron_ext.training.checkpoint import (
    AsyncCheckpointSaver,
    CheckpointError,
    NonFiniteWeightsError,
    checkpoint_dir,
    load_checkpoint,
    remove_incomplete_checkpoints,
    save_checkpoint,
)
from megatron_ext.training.config import ConfigError, TrainConfig, config_to_dict
from megatron_ext.training.data import BatchPlan, MicroBatch, build_datasets
from megatron_ext.training.device import resolve_device
from megatron_ext.training.metrics import LOSS_SUM_FIELDS, MetricsWriter, sums_to_metrics
from megatron_ext.training.start import StartPlan, apply_start_plan, plan_start

__all__ = ["NonFiniteError", "StepResult", "TrainResult", "context_parallel_shard", "pretrain"]


class NonFiniteError(RuntimeError):
    """A step's loss or gradients were NaN or infinite and the run stops (on_nonfinite='stop',
    or more than max_consecutive_skips such steps in a row); raised on every rank alike."""


@dataclasses.dataclass
class TrainResult:
    """What a run returns on every rank."""

    records: list[dict[str, Any]]
    """One metrics record per step run here (global values, identical on every rank)."""
    sample_indices: dict[int, list[int]]
    """Per step, the dataset indices this data-parallel rank trained on."""
    start_step: int
    """Step the run started from (0, or the step of the checkpoint it resumed)."""
    final_step: int
    """Step the run ended at."""
    skipped_steps: list[int] = dataclasses.field(default_factory=list)
    """Steps dropped because their loss or gradients were not finite."""
    stopped_by_signal: bool = False
    """SIGTERM arrived: the run saved a checkpoint (when save_dir is set) and returned early."""


@dataclasses.dataclass
class StepResult:
    """What one training step reports on every rank."""

    sums: torch.Tensor
    """Global token sums, LOSS_SUM_FIELDS order."""
    grad_norm: float
    """Gradient norm before clipping (NaN when the step was skipped)."""
    nonfinite: str | None = None
    """Which ranks saw a NaN or infinite loss or gradients; None when all were finite."""
    sigterm: bool = False
    """Some rank received SIGTERM (the run saves and stops after this step)."""

    @property
    def skipped(self) -> bool:
        """Whether the optimizer step was withheld (non-finite loss or gradients)."""
        return self.nonfinite is not None


class _SigtermFlag:
    """Notes SIGTERM instead of dying of it, while active (main thread only; elsewhere inert)."""

    def __init__(self, enabled: bool) -> None:
        self.received = False
        self._previous = None
        self._enabled = enabled and threading.current_thread() is threading.main_thread()

    def _handle(self, signum, frame) -> None:
        if not self.received:
            print(
                f"rank {dist.get_rank()}: SIGTERM received; saving a checkpoint after this step",
                flush=True,
            )
        self.received = True

    def __enter__(self) -> Self:
        if self._enabled:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._enabled:
            signal.signal(signal.SIGTERM, self._previous)


def _world_size() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _init_distributed(config: TrainConfig, device: str) -> bool:
    """Create the default process group unless the caller did; returns whether we created it.

    device: 'cuda' or 'cpu' (resolve_device of config.device); on the CPU megatron's CUDA-only
    calls are bridged (and GPUs hidden from this process when some are visible)."""
    if device == "cpu":
        install_cpu_compat(force=True)
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return False
    backend = config.backend or ("nccl" if device == "cuda" else "gloo")
    if "MASTER_ADDR" not in os.environ and _world_size() == 1:
        # A single process started without torchrun: rendezvous with itself on a free port.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group(backend)
    return True


def _check_data(config: TrainConfig) -> None:
    """Check the data files (headers, sizes and, with data.scan_token_ids, every token id against
    model.vocab_size) before any model is built. Rank 0 reads them and every rank raises the
    same DataError, so no rank is left waiting in a collective."""
    from megatron_ext.data.errors import DataError
    from megatron_ext.data.validate import check_indexed_datasets

    message = [None]
    if dist.get_rank() == 0:
        try:
            check_indexed_datasets(
                list(config.data.paths),
                vocab_size=config.model.vocab_size,
                scan_tokens=config.data.scan_token_ids,
                progress=True,
            )
        except DataError as exc:
            message[0] = str(exc)
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise DataError(message[0])


def _plan_start(config: TrainConfig) -> StartPlan:
    """Where the run starts (training.start): decided on rank 0, after it removed what saves
    killed mid-way left in save_dir, and the same plan, or the same ConfigError, on every rank."""
    out: list[Any] = [None]
    if dist.get_rank() == 0:
        save_dir = config.checkpoint.save_dir
        if save_dir and os.path.isdir(save_dir):
            for path in remove_incomplete_checkpoints(save_dir):
                print(f"removed the incomplete checkpoint {path}", flush=True)
        try:
            out[0] = plan_start(config)
        except (ConfigError, CheckpointError) as exc:
            out[0] = exc
        notice = transformer_engine_notice()
        if notice and not config.uses_transformer_engine:
            print(notice, flush=True)
    dist.broadcast_object_list(out, src=0)
    if isinstance(out[0], Exception):
        raise type(out[0])(str(out[0]))
    return out[0]


def _loss_func(
    loss_mask: torch.Tensor,
    stats: ShapedLossStats | None,
    loss_is_ce: bool,
    output_tensor: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Token-sum loss of one micro-batch (megatron divides the gradients by the global token
    count in finalize_model_grads, since calculate_per_token_loss is on), plus metric sums
    (NaN where unknown: diagnostics not computed this step)."""
    mask = loss_mask.float()  # [b, s]
    keep = mask > 0
    # where, not a product: a masked position contributes 0 even if its value is not finite.
    loss_sum = torch.where(keep, output_tensor.float() * mask, 0.0).sum()
    tokens = mask.sum()
    with torch.no_grad():
        zero = torch.zeros((), device=mask.device)
        nan = torch.full((), float("nan"), device=mask.device)

        def masked_sum(x: torch.Tensor) -> torch.Tensor:
            return torch.where(keep, x.float(), zero).sum()

        if stats is None:
            ce = loss_sum.detach() if loss_is_ce else nan
            sums = torch.stack([loss_sum.detach(), ce, nan, nan, nan, tokens])
        else:
            sums = torch.stack(
                [
                    loss_sum.detach(),
                    -masked_sum(stats.target_logprob),
                    masked_sum(stats.entropy),
                    masked_sum(stats.target_prob),
                    masked_sum(stats.topk_mass),
                    tokens,
                ]
            )
    return loss_sum, tokens.to(torch.int), {"sums": sums.double()}


def context_parallel_shard(x: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """This context-parallel rank's positions of a [b, s] tensor: the sequence cut into
    2 * cp_size equal chunks, rank r keeping chunks r and 2 * cp_size - 1 - r (the load-balanced
    order of causal attention that megatron-core's CP attention and RoPE expect).

    Returns:
        [b, s / cp_size]; x itself when cp_size is 1.
    """
    if cp_size == 1:
        return x
    b, s = x.shape
    chunks = x.view(b, 2 * cp_size, s // (2 * cp_size))  # [b, 2cp, s/2cp]
    mine = torch.tensor([cp_rank, 2 * cp_size - 1 - cp_rank], device=x.device)
    return chunks.index_select(1, mine).reshape(b, s // cp_size)  # [b, s/cp]


def _forward_step(data_iterator, model: torch.nn.Module):
    batch: MicroBatch = next(data_iterator)
    tokens, positions, loss_mask = batch.tokens, batch.position_ids, batch.loss_mask  # [b, s]
    labels = batch.labels.masked_fill(loss_mask == 0, IGNORE_INDEX)  # [b, s]
    cp_size = parallel_state.get_context_parallel_world_size()
    if cp_size > 1:
        # Each CP rank computes its shard of every sequence; megatron sums the loss-token
        # counts over the data- and context-parallel ranks (finalize_model_grads), so a shard
        # with fewer, or no, loss tokens weighs what its tokens weigh.
        cp_rank = parallel_state.get_context_parallel_rank()
        tokens, positions, labels, loss_mask = (
            context_parallel_shard(t, cp_size, cp_rank)
            for t in (tokens, positions, labels, loss_mask)
        )  # [b, s/cp]
    output = model(tokens, positions, None, labels=labels)
    inner = unwrap_model(model)
    loss_is_ce = inner.native_cross_entropy or inner.shaping.is_cross_entropy
    return output, partial(_loss_func, loss_mask, inner.last_loss_stats, loss_is_ce)


class Trainer:
    """The pieces of a run on this rank: parallel state, model, optimizer, scheduler, data.

    `model` is the list of this rank's model chunks (each in megatron DDP): one per pipeline
    stage, or parallel.virtual_pipeline of them. Build it inside `trainer_session(config)`;
    `run()` trains, `train_step()` and `evaluate()` are the single steps (tools/bench_train.py
    times them).
    """

    def __init__(self, config: TrainConfig) -> None:
        """Initialise megatron's parallel state and build everything (process group required)."""
        self.config = config
        cfg, par = config, config.parallel
        self.start = _plan_start(cfg)
        _check_data(cfg)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        vp = par.virtual_pipeline
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=par.tensor,
            pipeline_model_parallel_size=par.pipeline,
            virtual_pipeline_model_parallel_size=vp if vp > 1 else None,
            context_parallel_size=par.context,
            expert_model_parallel_size=par.expert,
        )
        seed = cfg.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)

        params_dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        use_te = cfg.uses_transformer_engine
        self.tconfig = to_transformer_config(
            cfg.model,
            tensor_parallel=par.tensor,
            pipeline_parallel=par.pipeline,
            virtual_pipeline=vp,
            expert_parallel=par.expert,
            context_parallel=par.context,
            sequence_parallel=par.use_sequence_parallel,
            params_dtype=params_dtype,
            use_transformer_engine=use_te,
            recompute=cfg.recompute,
        )
        # Bad labels and non-finite logits are counted on the device and read once per step, in
        # train_step's all-reduce: the loss itself never waits for the device.
        self.input_flags = torch.zeros(len(INPUT_FLAGS), dtype=torch.float32, device=self.device)
        # Overlap: each bucket's reduce starts in the backward pass once its gradients are
        # complete (the fused output loss adds the output weight's gradient to main_grad before
        # its hook fires, so its bucket waits for it); with overlap_param_gather the optimizer
        # step leaves the all-gather to forward pre-hooks of the next forward pass.
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=par.overlap_grad_reduce,
            overlap_param_gather=par.overlap_param_gather,
            bucket_size=par.ddp_bucket_size,
            use_distributed_optimizer=par.distributed_optimizer,
        )
        # This rank's model chunks, in pipeline order: one, or parallel.virtual_pipeline of them
        # (megatron's layout: chunk i of stage r holds the layers of virtual stage
        # i * pipeline + r; the last chunk of the last stage has the output layer and the loss).
        self.model: list[DistributedDataParallel] = []
        for vp_stage in range(vp):
            chunk: torch.nn.Module = build_model(
                cfg.model,
                self.tconfig,
                cfg.shaping,
                use_transformer_engine=use_te,
                native_cross_entropy=cfg.native_cross_entropy,
                fused_output_loss=cfg.fused_output_loss,
                vp_stage=vp_stage if vp > 1 else None,
            )
            chunk.to(self.device)
            chunk.check_finite_logits = False  # non-finite losses are handled per step, below
            chunk.input_flags = self.input_flags
            if cfg.bf16:
                chunk = Float16Module(self.tconfig, chunk)
            # As megatron's own loop: the chunks after the first keep one bucket each (their
            # communication overlaps with the other chunks' computation anyway).
            self.model.append(
                DistributedDataParallel(
                    self.tconfig, ddp_config, chunk, disable_bucketing=vp_stage > 0
                )
            )

        opt = cfg.optimizer
        self.optimizer = get_megatron_optimizer(
            MegatronOptimizerConfig(
                optimizer="adam",  # torch AdamW without Apex/TE (decoupled weight decay)
                lr=opt.lr,
                min_lr=opt.min_lr,
                weight_decay=opt.weight_decay,
                adam_beta1=opt.adam_beta1,
                adam_beta2=opt.adam_beta2,
                adam_eps=opt.adam_eps,
                clip_grad=opt.clip_grad,
                bf16=cfg.bf16,
                params_dtype=params_dtype,
                use_distributed_optimizer=par.distributed_optimizer,
                overlap_param_gather=par.overlap_param_gather,
            ),
            self.model,
        )
        decay_steps = opt.decay_steps or cfg.train_steps
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=opt.lr,
            min_lr=opt.min_lr,
            lr_warmup_steps=opt.warmup_for(decay_steps),
            lr_decay_steps=decay_steps,
            lr_decay_style="WSD",
            start_wd=opt.weight_decay,
            end_wd=opt.weight_decay,
            wd_incr_steps=decay_steps,
            wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=not opt.override_scheduler,
            override_opt_param_scheduler=opt.override_scheduler,
            wsd_decay_steps=opt.wsd_decay_steps,
            lr_wsd_decay_style=opt.wsd_decay_style,
        )
        self.tconfig.grad_scale_func = self.optimizer.scale_loss
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        # As megatron's own loop sets them (a function per chunk, or the one chunk's): the
        # schedule holds the gradient reduce back (no_sync) until the last micro-batch, and with
        # overlap every pipeline stage but the first launches its remaining reduces together
        # after its last backward (grad_sync_func, megatron's align_grad_reduce; with chunks,
        # each chunk's after its last backward). No param_sync_func (megatron's
        # align_param_gather, off): the forward pre-hooks of each chunk wait for its all-gathers.
        no_sync = [chunk.no_sync for chunk in self.model]
        self.tconfig.no_sync_func = no_sync if vp > 1 else no_sync[0]
        if par.overlap_grad_reduce:
            grad_sync = [chunk.start_grad_sync for chunk in self.model]
            self.tconfig.grad_sync_func = grad_sync if vp > 1 else grad_sync[0]
        self.forward_backward = get_forward_backward_func()
        self._sigterm: _SigtermFlag | None = None
        self._async_saver: AsyncCheckpointSaver | None = None  # set by run() with async_save

        self.train_data, self.valid_data = build_datasets(cfg)
        self.plan = BatchPlan(
            global_batch_size=cfg.global_batch_size,
            micro_batch_size=cfg.micro_batch_size,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(),
        )
        self.writer: MetricsWriter | None = None  # opened by run(), after the start plan

    # -- one step ---------------------------------------------------------------------------

    def _run_schedule(self, batches: list[MicroBatch], forward_only: bool) -> torch.Tensor:
        """Run the micro-batches; this rank's token sums (zeros unless it computes the loss)."""
        # The interleaved schedule takes one iterator per chunk: each chunk's forward reads the
        # micro-batches in order (the first chunk uses the tokens, the last one the labels).
        data: Any = iter(batches)
        if len(self.model) > 1:
            data = [iter(batches) for _ in self.model]
        outputs = self.forward_backward(
            forward_step_func=_forward_step,
            data_iterator=data,
            model=self.model,
            num_microbatches=len(batches),
            seq_length=self.config.sequence_length,
            micro_batch_size=self.config.micro_batch_size,
            forward_only=forward_only,
        )
        sums = torch.zeros(len(LOSS_SUM_FIELDS), dtype=torch.float64, device=self.device)
        # The last stage's TP-rank-0 ranks hold one copy of the sums per DP rank (from its last
        # chunk, the one with the loss).
        owner = (
            parallel_state.is_pipeline_last_stage()
            and parallel_state.get_tensor_model_parallel_rank() == 0
        )
        if owner and outputs:
            sums = torch.stack([o["sums"] for o in outputs]).sum(0).to(self.device)
        return sums

    def _set_loss_stats(self, enabled: bool) -> None:
        for chunk in self.model:
            unwrap_model(chunk).compute_loss_stats = enabled

    def sync_params(self) -> None:
        """With overlap_param_gather, finish gathering the updated parameters now (the forward
        pre-hooks would otherwise do it in the next forward pass): before a checkpoint is saved
        and when the run ends, so that every rank's weights are the optimizer's. A no-op
        otherwise (the optimizer step gathers them)."""
        if self.config.parallel.overlap_param_gather:
            for chunk in self.model:
                chunk.start_param_sync(force_sync=True)

    def _grads_finite(self) -> torch.Tensor:
        """Whether this rank's reduced gradient buffers are all finite (a sum is NaN or infinite
        when any element is), as a bool tensor on the device (no host synchronisation)."""
        buffers = [
            buf for chunk in self.model for buf in (*chunk.buffers, *chunk.expert_parallel_buffers)
        ]
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        return torch.isfinite(
            sum((buf.grad_data.sum(dtype=torch.float32) for buf in buffers), zero)
        )

    def _ranks_flagged(self, flags: torch.Tensor) -> list[list[int]]:
        """Per flag of `flags` (this rank's 0/1 values), the ranks that raised it."""
        gathered = [torch.zeros_like(flags) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flags)
        table = torch.stack(gathered).cpu()  # [world, len(flags)]
        return [table[:, i].nonzero().flatten().tolist() for i in range(flags.numel())]

    def _raise_bad_labels(self, batches: list[MicroBatch]) -> None:
        """Some rank's loss saw a label outside the vocabulary (or unequal vocabulary slices):
        raise the same DataError on every rank, naming the ranks and the first bad position
        (this path reads the labels on the host; it ends the run)."""
        vocab = self.config.model.vocab_size
        found = None
        if self.input_flags.sum() > 0:
            for i, batch in enumerate(batches):
                labels = batch.labels.masked_fill(batch.loss_mask == 0, IGNORE_INDEX)  # [b, s]
                bad = ((labels < 0) & (labels != IGNORE_INDEX)) | (labels >= vocab)
                if bool(bad.any()):
                    b, s = (int(v) for v in bad.nonzero()[0])
                    found = (
                        f"micro-batch {i}, sequence {b}, position {s}: label "
                        f"{int(labels[b, s])} (samples {batch.sample_indices})"
                    )
                    break
            found = found or "unequal vocabulary slices across tensor-parallel ranks"
        details: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(details, found)
        ranks = [r for r, d in enumerate(details) if d is not None]
        first = next(d for d in details if d is not None) if ranks else "unknown"
        raise DataError(
            f"labels outside the vocabulary [0, {vocab}) (model.vocab_size={vocab}) on rank(s) "
            f"{ranks}, first at {first}; the data holds token ids the model cannot predict: "
            "train with the tokenizer the data was made with, or a larger model.vocab_size"
        )

    def train_step(self, batches: list[MicroBatch], diagnostics: bool = True) -> StepResult:
        """Forward and backward over the micro-batches, then the optimizer step, unless some rank
        saw a non-finite loss or gradient: then the step is withheld (the weights and optimizer
        state stay as they were) and the result names the ranks.

        diagnostics: compute entropy, p(x) and top-k mass (else they are NaN in the sums).
        """
        self._set_loss_stats(diagnostics)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.input_flags.zero_()
        sums = self._run_schedule(batches, forward_only=False)
        # One all-reduce carries the loss sums, three per-rank flags (non-finite loss here,
        # non-finite gradients here, SIGTERM received here) and the loss's input counts (bad
        # labels, non-finite logits, unequal slices). All stay on the device: one host
        # synchronisation per step, after the all-reduce.
        sigterm_here = self._sigterm is not None and self._sigterm.received
        flags = torch.stack(
            [
                ~torch.isfinite(sums[0]),
                ~self._grads_finite(),
                torch.tensor(sigterm_here, device=self.device),
            ]
        ).to(torch.float64)
        payload = torch.cat([sums, flags, self.input_flags.double()])
        dist.all_reduce(payload)
        payload = payload.cpu()
        n = len(LOSS_SUM_FIELDS)
        total, counts, inputs = payload[:n], payload[n : n + 3], payload[n + 3 :]
        if bool(inputs[INPUT_FLAGS.index("bad_target")] > 0) or bool(
            inputs[INPUT_FLAGS.index("unequal_slices")] > 0
        ):
            self._raise_bad_labels(batches)
        sigterm = bool(counts[2] > 0)
        if bool(counts[0] > 0) or bool(counts[1] > 0):
            loss_ranks, grad_ranks = self._ranks_flagged(flags[:2])
            parts = []
            if loss_ranks:
                parts.append(f"non-finite loss on rank(s) {loss_ranks}")
            if grad_ranks:
                parts.append(f"non-finite gradients on rank(s) {grad_ranks}")
            return StepResult(total, float("nan"), "; ".join(parts), sigterm)
        _, grad_norm, _ = self.optimizer.step()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        return StepResult(total, grad_norm, None, sigterm)

    def evaluate(self) -> dict[str, float]:
        """Metrics on the held-out samples (the same eval_iters global batches every time)."""
        for chunk in self.model:
            chunk.eval()
        self._set_loss_stats(True)
        total = torch.zeros(len(LOSS_SUM_FIELDS), dtype=torch.float64)
        with torch.no_grad():
            for i in range(self.config.eval_iters):
                batches = self.plan.micro_batches(
                    self.valid_data, i * self.config.global_batch_size, self.device
                )
                sums = self._run_schedule(batches, forward_only=True)
                dist.all_reduce(sums)
                total += sums.cpu()
        for chunk in self.model:
            chunk.train()
        return sums_to_metrics(total, prefix="val_")

    # -- the run ----------------------------------------------------------------------------

    def _resume(self) -> tuple[int, int]:
        """Carry out the start plan: remove what it says is stale (rank 0), then load its
        checkpoint. Returns the step and the consumed samples the run continues from."""
        plan, cfg = self.start, self.config
        if dist.get_rank() == 0:
            apply_start_plan(plan, cfg)
            print(plan.message, flush=True)
        dist.barrier()
        if plan.root is None:
            return 0, 0
        state = load_checkpoint(
            plan.root,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            distributed_optimizer=cfg.parallel.distributed_optimizer,
            load_optimizer=plan.full_state,
            step=plan.step,
            model_config=dataclasses.asdict(cfg.model),
        )
        if not plan.full_state:
            return 0, 0
        return state["step"], state["consumed_samples"]

    def _save(self, step: int, consumed: int) -> None:
        self.sync_params()
        save_checkpoint(
            self.config.checkpoint.save_dir,
            step=step,
            consumed_samples=consumed,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            distributed_optimizer=self.config.parallel.distributed_optimizer,
            extra={"config": config_to_dict(self.config)},
            keep_last=self.config.checkpoint.keep_last,
            optimizer_format=self.config.checkpoint.optimizer_format,
            async_saver=self._async_saver,
        )

    def _sample_log(self, step: int, batches: list[MicroBatch]) -> dict[str, Any] | None:
        """This step's sample indices and a CRC32 of its tokens, over all data-parallel ranks (in
        DP-rank order), for rank 0's samples.jsonl."""
        local = {
            "indices": [i for b in batches for i in b.sample_indices],
            "crc32": zlib.crc32(
                b"".join(b.tokens.cpu().numpy().astype("<i8").tobytes() for b in batches)
            ),
        }
        gathered: list[Any] = [None] * parallel_state.get_data_parallel_world_size()
        dist.all_gather_object(gathered, local, group=parallel_state.get_data_parallel_group())
        return {
            "step": step,
            "samples": [i for g in gathered for i in g["indices"]],
            "crc32": [g["crc32"] for g in gathered],
        }

    def run(self) -> TrainResult:
        """Resume if configured, train to train_steps, validate, log and save as configured.

        Non-finite steps are skipped or stop the run (TrainConfig.on_nonfinite). With a save_dir,
        SIGTERM makes the run finish its step, save and return early (stopped_by_signal).
        """
        cfg = self.config
        step, consumed = self._resume()
        self.writer = MetricsWriter(
            cfg.logging.log_dir,
            enabled=dist.get_rank() == 0,
            console=cfg.logging.console,
            tensorboard=cfg.logging.tensorboard,
        )
        result = TrainResult(records=[], sample_indices={}, start_step=step, final_step=step)
        tokens_per_step = cfg.global_batch_size * cfg.sequence_length
        save_dir, interval = cfg.checkpoint.save_dir, cfg.checkpoint.save_interval
        rank0 = dist.get_rank() == 0
        samples_log = None
        if cfg.logging.log_samples and cfg.logging.log_dir and rank0:
            os.makedirs(cfg.logging.log_dir, exist_ok=True)
            samples_log = open(  # noqa: SIM115 - closed in finally
                os.path.join(cfg.logging.log_dir, "samples.jsonl"), "a", buffering=1
            )
        consecutive_skips = 0
        for chunk in self.model:
            chunk.train()
        self._async_saver = (
            AsyncCheckpointSaver() if save_dir and cfg.checkpoint.async_save else None
        )
        failed = True
        try:
            while step < cfg.train_steps:
                t0 = time.perf_counter()
                batches = self.plan.micro_batches(self.train_data, consumed, self.device)
                lr = self.optimizer.param_groups[0]["lr"]
                last = step + 1 == cfg.train_steps
                logged = (step + 1) % cfg.logging.log_interval == 0 or last
                try:
                    out = self.train_step(batches, diagnostics=logged)
                except DataError as exc:  # bad labels seen by the loss: every rank raises
                    raise DataError(f"step {step + 1}: {exc}") from None
                step += 1
                if out.skipped:
                    consecutive_skips += 1
                    result.skipped_steps.append(step)
                    message = f"step {step}: {out.nonfinite}"
                    if cfg.on_nonfinite == "stop":
                        raise NonFiniteError(
                            f"{message}; stopping (on_nonfinite='stop'). The weights were not "
                            "updated; resume from the last checkpoint, e.g. with a lower "
                            "learning rate or on_nonfinite='skip'"
                        )
                    if consecutive_skips > cfg.max_consecutive_skips:
                        raise NonFiniteError(
                            f"{message}; {consecutive_skips} steps in a row were not finite "
                            f"(max_consecutive_skips={cfg.max_consecutive_skips}), stopping. "
                            "The weights were not updated by any of them; resume from the "
                            "last checkpoint with a lower learning rate or other data"
                        )
                    if rank0:
                        print(f"{message}; step skipped, its data dropped", flush=True)
                else:
                    consecutive_skips = 0
                    self.scheduler.step(increment=1)
                if self._async_saver is not None:
                    self._async_saver.maybe_finalize()  # publish a save every rank has written
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - t0
                result.sample_indices[step] = [i for b in batches for i in b.sample_indices]
                if cfg.logging.log_samples and cfg.logging.log_dir:
                    line = self._sample_log(step, batches)
                    if samples_log is not None:
                        samples_log.write(json.dumps(line) + "\n")
                consumed += cfg.global_batch_size
                record: dict[str, Any] = {"step": step, **sums_to_metrics(out.sums)}
                record.update(
                    grad_norm=out.grad_norm,
                    lr=lr,
                    step_time_s=elapsed,
                    tokens_per_s=tokens_per_step / elapsed,
                    consumed_samples=consumed,
                )
                if out.skipped:
                    record.update(loss=float("nan"), skipped=out.nonfinite)
                if cfg.eval_interval and (step % cfg.eval_interval == 0 or last):
                    record.update(self.evaluate())
                if logged or out.skipped:
                    self.writer.write(record)
                result.records.append(record)
                if save_dir and ((interval and step % interval == 0) or last or out.sigterm):
                    self._save(step, consumed)
                if out.sigterm:
                    result.stopped_by_signal = True
                    if self._async_saver is not None:
                        self._async_saver.finalize()
                    if rank0:
                        where = f"saved to {save_dir}" if save_dir else "not saved"
                        print(f"SIGTERM: stopped after step {step} ({where})", flush=True)
                    break
            if self._async_saver is not None:
                self._async_saver.finalize()  # the last save is published before the run ends
            failed = False
        except _RAISED_ON_EVERY_RANK:
            if self._async_saver is not None:  # the ranks meet again: publish what was written
                self._async_saver.finalize()
            failed = False
            raise
        finally:
            if failed and self._async_saver is not None:
                self._async_saver.abandon()
            self.writer.close()
            if samples_log is not None:
                samples_log.close()
        self.sync_params()
        result.final_step = step
        if rank0 and not result.stopped_by_signal:
            print(self._final_line(result), flush=True)
        return result

    def _final_line(self, result: TrainResult) -> str:
        """Where the run ended and where its outputs are."""
        cfg = self.config
        if result.final_step == result.start_step:
            head = f"nothing to train: the run is at step {result.final_step} of train_steps="
            head += f"{cfg.train_steps} already (raise train_steps to continue it)"
        else:
            head = f"finished at step {result.final_step} of {cfg.train_steps}"
        parts = [head]
        if cfg.checkpoint.save_dir:
            parts.append(f"checkpoint {checkpoint_dir(cfg.checkpoint.save_dir, result.final_step)}")
        if cfg.logging.log_dir:
            parts.append(f"metrics {os.path.join(cfg.logging.log_dir, 'metrics.jsonl')}")
        return "; ".join(parts)


# Errors every rank raises at the same point of the loop, after which the ranks can still meet to
# publish an asynchronous save that every rank finished writing.
_RAISED_ON_EVERY_RANK = (NonFiniteError, NonFiniteWeightsError, DataError)


def pretrain(config: TrainConfig) -> TrainResult:
    """Run (or resume) pre-training as configured; every rank calls it.

    The configuration is validated against the world size before anything else happens. Creates
    the default process group from the torchrun environment unless one exists (then it is used
    and left alone), initialises megatron's parallel state and tears it down at the end.

    Returns:
        The run's per-step metrics and this rank's sample indices (the same metrics on every rank).
    """
    with trainer_session(config) as trainer:
        return trainer.run()


def _release_model(model: torch.nn.Module | list[torch.nn.Module]) -> None:
    """Let the model, its optimizer and the process groups they hold be freed once the run is
    over, in a process that goes on (test workers, notebooks, repeated runs). Two references
    outlive the run otherwise: megatron DDP's gradient hooks sit on autograd nodes that hold
    them from C++ (a cycle the garbage collector cannot see), and RotaryEmbedding.forward's
    lru_cache holds the embedding. Each gloo group kept alive keeps three threads polling."""
    import gc
    from collections import OrderedDict
    from types import CellType, FunctionType

    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    for chunk in model if isinstance(model, list) else [model]:
        grad_accs = getattr(chunk, "grad_accs", None)
        if isinstance(grad_accs, list):
            grad_accs.clear()
        # The hooks themselves: megatron drops their handles, so find them through their
        # closures (cell -> closure tuple -> function) and empty the hook tables holding them.
        for cell in [r for r in gc.get_referrers(chunk) if isinstance(r, CellType)]:
            for closure in gc.get_referrers(cell):
                for hook in gc.get_referrers(closure):
                    if isinstance(hook, FunctionType) and "_make_backward_post_hook" in (
                        hook.__qualname__
                    ):
                        for table in gc.get_referrers(hook):
                            if isinstance(table, OrderedDict):
                                table.clear()
    cache_clear = getattr(RotaryEmbedding.forward, "cache_clear", None)
    if cache_clear is not None:
        cache_clear()


@contextlib.contextmanager
def trainer_session(config: TrainConfig) -> Iterator[Trainer]:
    """A Trainer for `config` (validated first), with the process group and megatron's parallel
    state set up around it and torn down after (a process group made by the caller is kept)."""
    config.validate(_world_size())
    device = resolve_device(config.device)
    owns_group = _init_distributed(config, device)
    groups_before = process_groups()
    # SIGTERM is noted from here on, so that one arriving while the run starts up is honoured at
    # its first step too (only with somewhere to save to).
    sigterm = _SigtermFlag(bool(config.checkpoint.save_dir) and config.checkpoint.save_on_sigterm)
    trainer = None
    try:
        with sigterm:
            trainer = Trainer(config)
            trainer._sigterm = sigterm
            yield trainer
    finally:
        if trainer is not None:
            _release_model(trainer.model)
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if owns_group:
            dist.destroy_process_group()
        else:
            destroy_new_process_groups(groups_before)
