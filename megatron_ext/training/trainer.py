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

The pieces: training.session (the process group, SIGTERM, the teardown), training.builders
(parallel state and seeds, model chunks, optimizer, schedule), training.step (one micro-batch:
the forward step and its loss function) and this module, the Trainer (one optimizer step,
`train_step`, validation, checkpoints) and its run loop (`run`).

The same code runs with NCCL on GPUs and with gloo on CPU (megatron_ext.core.cpu_compat bridges
megatron-core's CUDA-only calls when no GPU is used; TrainConfig.device chooses). Entry point:
`pretrain(config)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import zlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import unwrap_model

from megatron_ext.core.quiet import transformer_engine_notice
from megatron_ext.data.errors import DataError
from megatron_ext.loss.vocab_parallel import INPUT_FLAGS
from megatron_ext.models import IGNORE_INDEX
from megatron_ext.training.builders import (
    build_model_chunks,
    build_optimizer,
    build_scheduler,
    build_transformer_config,
    connect_schedule,
    initialize_parallel_state,
)
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
from megatron_ext.training.data import (
    BatchLoader,
    BatchPlan,
    LoaderSettings,
    MicroBatch,
    build_datasets,
)
from megatron_ext.training.metrics import LOSS_SUM_FIELDS, MetricsWriter, sums_to_metrics
from megatron_ext.training.session import SigtermFlag, distributed_session, release_model
from megatron_ext.training.start import StartPlan, apply_start_plan, plan_start
from megatron_ext.training.step import context_parallel_shard, forward_step

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
        cfg = config
        self.start = _plan_start(cfg)
        _check_data(cfg)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        initialize_parallel_state(cfg)
        self.tconfig = build_transformer_config(cfg)
        # Bad labels and non-finite logits are counted on the device and read once per step, in
        # train_step's all-reduce: the loss itself never waits for the device.
        self.input_flags = torch.zeros(len(INPUT_FLAGS), dtype=torch.float32, device=self.device)
        self.model = build_model_chunks(cfg, self.tconfig, self.device, self.input_flags)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        connect_schedule(cfg, self.tconfig, self.model, self.optimizer)
        self.forward_backward = get_forward_backward_func()
        self._sigterm: SigtermFlag | None = None
        self._async_saver: AsyncCheckpointSaver | None = None  # set by run() with async_save

        self.train_data, self.valid_data = build_datasets(cfg)
        self.plan = BatchPlan(
            global_batch_size=cfg.global_batch_size,
            micro_batch_size=cfg.micro_batch_size,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(),
        )
        # megatron's convention: only the first and last pipeline stages read their input.
        self.reads_data = parallel_state.is_pipeline_first_stage(
            ignore_virtual=True
        ) or parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.loader_settings = LoaderSettings.resolve(cfg.data, self.device)
        self._valid_loader: BatchLoader | None = None
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
            forward_step_func=forward_step,
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
        if self._valid_loader is None:
            self._valid_loader = self.batch_loader(
                self.valid_data,
                0,
                self.config.eval_iters * self.config.global_batch_size,
                "validation",
            )
        with torch.no_grad():
            for batches in self._valid_loader:
                sums = self._run_schedule(batches, forward_only=True)
                dist.all_reduce(sums)
                total += sums.cpu()
        for chunk in self.model:
            chunk.train()
        return sums_to_metrics(total, prefix="val_")

    # -- the run ----------------------------------------------------------------------------

    def batch_loader(
        self, dataset: Any, consumed_samples: int, total_samples: int, name: str = "training"
    ) -> BatchLoader:
        """This rank's global batches of `dataset` from `consumed_samples` on, read as
        `config.data` says (nothing is read on the pipeline stages between the first and last;
        within a tensor-parallel group, its rank 0 reads and broadcasts)."""
        return BatchLoader(
            dataset,
            self.plan,
            consumed_samples=consumed_samples,
            total_samples=total_samples,
            device=self.device,
            settings=self.loader_settings,
            reads=self.reads_data,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            sample_shape=(self.config.micro_batch_size, self.config.sequence_length),
            name=name,
        )

    def close_loaders(self) -> None:
        """Stop the validation loader's worker processes (trainer_session calls it)."""
        if self._valid_loader is not None:
            self._valid_loader.close()
            self._valid_loader = None

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
                b"".join(
                    b.tokens.cpu().numpy().astype("<i8").tobytes()
                    for b in batches
                    if b.tokens is not None
                )
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
        loader = self.batch_loader(
            self.train_data, consumed, consumed + (cfg.train_steps - step) * cfg.global_batch_size
        )
        train_batches = iter(loader)
        self._async_saver = (
            AsyncCheckpointSaver() if save_dir and cfg.checkpoint.async_save else None
        )
        failed = True
        try:
            while step < cfg.train_steps:
                t0 = time.perf_counter()
                batches = next(train_batches)
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
            loader.close()
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


@contextlib.contextmanager
def trainer_session(config: TrainConfig) -> Iterator[Trainer]:
    """A Trainer for `config` (validated first), with the process group and megatron's parallel
    state set up around it and torn down after (a process group made by the caller is kept)."""
    with distributed_session(config) as session:
        trainer = Trainer(config)
        trainer._sigterm = session.sigterm
        try:
            yield trainer
        finally:
            trainer.close_loaders()
            release_model(trainer.model)
