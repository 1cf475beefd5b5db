"""The pieces of a run, built from megatron-core's parts: parallel state and seeds, the
TransformerConfig, the model chunks (each in megatron DDP), the optimizer, the learning-rate
schedule, and the hooks that connect them to megatron's pipeline schedules.

Each builder takes the TrainConfig; they run in this order inside `Trainer.__init__`, after the
process group exists (training.session).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import MegatronOptimizer, get_megatron_optimizer
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module

from megatron_ext.models import build_model, to_transformer_config
from megatron_ext.training.config import TrainConfig

__all__ = [
    "build_model_chunks",
    "build_optimizer",
    "build_scheduler",
    "build_transformer_config",
    "connect_schedule",
    "initialize_parallel_state",
]


def initialize_parallel_state(cfg: TrainConfig) -> None:
    """megatron's parallel state for the layout, and the seeds (one per pipeline stage, and
    megatron's model-parallel RNG streams)."""
    par = cfg.parallel
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


def _params_dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.bf16 else torch.float32


def build_transformer_config(cfg: TrainConfig) -> TransformerConfig:
    """The model's TransformerConfig at the run's layout."""
    par = cfg.parallel
    return to_transformer_config(
        cfg.model,
        tensor_parallel=par.tensor,
        pipeline_parallel=par.pipeline,
        virtual_pipeline=par.virtual_pipeline,
        expert_parallel=par.expert,
        context_parallel=par.context,
        sequence_parallel=par.use_sequence_parallel,
        params_dtype=_params_dtype(cfg),
        use_transformer_engine=cfg.uses_transformer_engine,
        recompute=cfg.recompute,
    )


def build_model_chunks(
    cfg: TrainConfig,
    tconfig: TransformerConfig,
    device: torch.device,
    input_flags: torch.Tensor,
) -> list[DistributedDataParallel]:
    """This rank's model chunks, in pipeline order, each in megatron DDP: one, or
    parallel.virtual_pipeline of them (megatron's layout: chunk i of stage r holds the layers of
    virtual stage i * pipeline + r; the last chunk of the last stage has the output layer and
    the loss). `input_flags` is where the loss counts bad labels and non-finite logits."""
    par = cfg.parallel
    vp = par.virtual_pipeline
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
    chunks: list[DistributedDataParallel] = []
    for vp_stage in range(vp):
        chunk: torch.nn.Module = build_model(
            cfg.model,
            tconfig,
            cfg.shaping,
            use_transformer_engine=cfg.uses_transformer_engine,
            native_cross_entropy=cfg.native_cross_entropy,
            fused_output_loss=cfg.fused_output_loss,
            vp_stage=vp_stage if vp > 1 else None,
        )
        chunk.to(device)
        chunk.check_finite_logits = False  # non-finite losses are handled per step (trainer)
        chunk.input_flags = input_flags
        if cfg.bf16:
            chunk = Float16Module(tconfig, chunk)
        # As megatron's own loop: the chunks after the first keep one bucket each (their
        # communication overlaps with the other chunks' computation anyway).
        chunks.append(
            DistributedDataParallel(tconfig, ddp_config, chunk, disable_bucketing=vp_stage > 0)
        )
    return chunks


def build_optimizer(cfg: TrainConfig, model: list[DistributedDataParallel]) -> MegatronOptimizer:
    """megatron's optimizer over every chunk: torch AdamW (decoupled weight decay, no Apex/TE),
    optionally distributed."""
    opt, par = cfg.optimizer, cfg.parallel
    return get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer="adam",
            lr=opt.lr,
            min_lr=opt.min_lr,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1,
            adam_beta2=opt.adam_beta2,
            adam_eps=opt.adam_eps,
            clip_grad=opt.clip_grad,
            bf16=cfg.bf16,
            params_dtype=_params_dtype(cfg),
            use_distributed_optimizer=par.distributed_optimizer,
            overlap_param_gather=par.overlap_param_gather,
        ),
        model,
    )


def build_scheduler(cfg: TrainConfig, optimizer: MegatronOptimizer) -> OptimizerParamScheduler:
    """The warmup-stable-decay schedule of the learning rate (constant weight decay)."""
    opt = cfg.optimizer
    decay_steps = opt.decay_steps or cfg.train_steps
    return OptimizerParamScheduler(
        optimizer,
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


def connect_schedule(
    cfg: TrainConfig,
    tconfig: TransformerConfig,
    model: list[DistributedDataParallel],
    optimizer: MegatronOptimizer,
) -> None:
    """The TransformerConfig hooks megatron's pipeline schedules call, as megatron's own loop
    sets them (a function per chunk, or the one chunk's): loss scaling, finalize_model_grads, and
    no_sync, which holds the gradient reduce back until the last micro-batch. With overlap every
    pipeline stage but the first launches its remaining reduces together after its last backward
    (grad_sync_func, megatron's align_grad_reduce; with chunks, each chunk's after its last
    backward). No param_sync_func (megatron's align_param_gather, off): the forward pre-hooks of
    each chunk wait for its all-gathers."""
    several = len(model) > 1
    tconfig.grad_scale_func = optimizer.scale_loss
    tconfig.finalize_model_grads_func = finalize_model_grads
    no_sync = [chunk.no_sync for chunk in model]
    tconfig.no_sync_func = no_sync if several else no_sync[0]
    if cfg.parallel.overlap_grad_reduce:
        grad_sync = [chunk.start_grad_sync for chunk in model]
        tconfig.grad_sync_func = grad_sync if several else grad_sync[0]
