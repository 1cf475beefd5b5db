"""The Qwen3-style megatron GPT model whose language-model loss is the reward-shaped objective.

Why GPTModel and not HybridModel: megatron-core 0.19 logs a deprecation notice for GPTModel in
favour of HybridModel, but HybridModel's layer specs (models/hybrid/hybrid_layer_specs.py) are
built from Transformer Engine modules only, so it has no torch-native path (no CPU, no machine
without TE), and it splits each transformer layer into separate attention and MLP layers, which
changes checkpoint keys and pipeline splits. GPTModel still receives critical fixes, has the local
spec, and both compute their loss through the same seam, `compute_language_model_loss`, so moving
later means changing the base class and the spec, not the loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_ext.loss import (
    RewardShapingConfig,
    ShapedLossStats,
    vocab_parallel_shaped_cross_entropy,
)
from megatron_ext.models.config import ModelConfig
from megatron_ext.models.output import ShapedLossOutputProcessor
from megatron_ext.models.spec import decoder_block_spec

__all__ = ["IGNORE_INDEX", "ShapedLossGPTModel", "build_model", "to_transformer_config"]

IGNORE_INDEX = -100
"""Label of positions that carry no loss (the trainer writes it where loss_mask is 0)."""


def to_transformer_config(
    model: ModelConfig,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_pipeline: int = 1,
    expert_parallel: int = 1,
    context_parallel: int = 1,
    sequence_parallel: bool | None = None,
    params_dtype: torch.dtype = torch.float32,
    use_transformer_engine: bool = False,
    recompute: str = "none",
) -> TransformerConfig:
    """megatron-core's TransformerConfig for our model config and the given parallel layout.

    Args:
        model: the model shape.
        tensor_parallel: TP size.
        pipeline_parallel: PP size.
        virtual_pipeline: model chunks per pipeline stage (megatron's virtual pipeline size;
            1: none). Each chunk is built with its vp_stage (build_model).
        expert_parallel: EP size (MoE only).
        context_parallel: CP size (megatron-core implements it in Transformer Engine's attention
            only: use_transformer_engine must be True when it is above 1).
        sequence_parallel: None picks megatron's recommendation: on when TP > 1 (MoE with TP > 1
            requires it).
        params_dtype: float32, or bfloat16 (megatron mixed precision, fp32 main params in the
            optimizer).
        use_transformer_engine: whether the TE spec is used (enables TE's fused RoPE).
        recompute: activation recomputation: 'none'; 'selective' (megatron's selective
            granularity with its default module, the core attention of every layer); 'full'
            (every layer's whole forward, one layer per checkpoint).

    Raises:
        ValueError: an unknown `recompute`, or context_parallel > 1 without the TE spec.
    """
    if sequence_parallel is None:
        sequence_parallel = tensor_parallel > 1
    if context_parallel > 1 and not use_transformer_engine:
        raise ValueError(
            f"context_parallel={context_parallel} needs the Transformer Engine spec "
            "(megatron-core implements context parallelism in TE's attention only)"
        )
    moe: dict[str, Any] = {}
    if model.is_moe:
        moe = {
            "num_moe_experts": model.num_experts,
            "moe_router_topk": model.moe_router_topk,
            "moe_router_pre_softmax": model.moe_router_pre_softmax,
            # An int 1 (experts everywhere) keeps the stacked layer keys of older checkpoints;
            # a list makes megatron key the (mixed) layers one by one.
            "moe_layer_freq": model.moe_layer_pattern if model.moe_dense_layers else 1,
            "moe_ffn_hidden_size": model.moe_ffn_hidden_size,
            "moe_shared_expert_intermediate_size": model.moe_shared_expert_ffn_hidden_size or None,
            "moe_router_load_balancing_type": "aux_loss",
            "moe_aux_loss_coeff": model.moe_aux_loss_coeff,
            "moe_token_dispatcher_type": "alltoall",
            "moe_grouped_gemm": use_transformer_engine,
            "moe_router_dtype": "fp32",
        }
    recomputation: dict[str, Any]
    if recompute == "none":
        recomputation = {}
    elif recompute == "selective":
        recomputation = {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    elif recompute == "full":
        recomputation = {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        }
    else:
        raise ValueError(f"recompute={recompute!r}; choose 'none', 'selective' or 'full'")
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.rms_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline if virtual_pipeline > 1 else None,
        # The interleaved schedule's point-to-point transfers overlapped with computation, one
        # request per direction (megatron's training loop does the same). Not batched: with
        # PP = 2 both neighbours are the same rank, and one batch sending it both an activation
        # and a gradient of the same shape pairs them with its receives in posting order, which
        # swaps them (gloo; megatron-training refuses batching below PP = 3 for this reason).
        overlap_p2p_comm=virtual_pipeline > 1,
        batch_p2p_comm=virtual_pipeline == 1,
        expert_model_parallel_size=expert_parallel,
        context_parallel_size=context_parallel,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        # Token-sum losses; the trainer divides the gradients by the global token count.
        calculate_per_token_loss=True,
        attention_backend=AttnBackend.auto if use_transformer_engine else AttnBackend.local,
        # Fused kernels come from Apex/TE; the local path uses plain torch ops.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=use_transformer_engine,
        cross_entropy_loss_fusion=False,
        **moe,
        **recomputation,
    )


class ShapedLossGPTModel(GPTModel):
    """megatron-core's GPTModel with the reward-shaped loss as its language-model loss.

    Logits stay vocab-parallel ([s, b, V/tp], never gathered); the loss reduces over the model's
    own tensor-parallel group (`pg_collection.tp`). `last_loss_stats` holds the diagnostics of the
    latest loss computation ([b, s] detached fp32 tensors: entropy, target_prob, target_logprob,
    topk_mass), read by the trainer right after each forward. With multi-token prediction the main
    head's loss is computed last, so these are the main head's statistics. Setting
    `compute_loss_stats = False` skips them (they cost a top-k search per position when the
    shaping itself needs none); `last_loss_stats` is then None.

    With `input_flags` set (a zero [3] tensor, see vocab_parallel.INPUT_FLAGS) the loss makes no
    host-device synchronisation: bad labels and non-finite logits give NaN losses and add to
    those counts instead of raising.

    `fused_output_loss=True` computes the output layer and the loss together, a chunk of
    positions at a time, so the logits are never materialised (models/output.py: megatron-core's
    output_processor seam; the same results as the unfused path). MTP heads stay unfused.

    `native_cross_entropy=True` uses megatron-core's own loss instead (a baseline for
    benchmarks; `last_loss_stats` stays None).
    """

    def __init__(
        self,
        *args: Any,
        shaping: RewardShapingConfig | None = None,
        ignore_index: int = IGNORE_INDEX,
        native_cross_entropy: bool = False,
        fused_output_loss: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.shaping = shaping if shaping is not None else RewardShapingConfig()
        self.ignore_index = ignore_index
        self.native_cross_entropy = native_cross_entropy
        self.fused_output_loss = fused_output_loss
        self._output_loss = ShapedLossOutputProcessor()
        self.compute_loss_stats = True
        # False: NaN or infinite logits give a NaN loss instead of an error (the trainer finds
        # non-finite losses itself, on every rank at once, and skips or stops the step).
        self.check_finite_logits = True
        # A [len(INPUT_FLAGS)] float tensor on the model's device: the loss adds its counts of
        # bad labels and non-finite logits to it instead of raising, with no host-device
        # synchronisation (the trainer reads it once per step, in its all-reduce).
        self.input_flags: Tensor | None = None
        self.last_loss_stats: ShapedLossStats | None = None

    def forward(self, *args: Any, output_processor: Any = None, **kwargs: Any) -> Tensor:
        """GPTModel.forward; with fused_output_loss (and no output_processor of the caller's)
        the main head's loss goes through the fused output processor."""
        fused = (
            output_processor is None and self.fused_output_loss and not self.native_cross_entropy
        )
        if fused:
            processor = self._output_loss  # this step's settings, which the trainer may change
            processor.shaping = self.shaping
            processor.ignore_index = self.ignore_index
            processor.return_stats = self.compute_loss_stats
            processor.check_finite = self.check_finite_logits
            processor.input_flags = self.input_flags
            output_processor = processor
        self.last_loss_stats = None
        out = super().forward(*args, output_processor=output_processor, **kwargs)
        if fused and self._output_loss.last_stats is not None:
            self.last_loss_stats = self._output_loss.last_stats
        return out

    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        """Per-token shaped loss.

        Args:
            labels: [b, s] global token ids (ignore_index where no loss is wanted).
            logits: [s, b, V/tp] vocab-parallel logits of this rank (overwritten in place if fp32).

        Returns:
            [b, s] fp32 loss per position (0 at ignored positions).
        """
        self.last_loss_stats = None
        if self.native_cross_entropy:
            return super().compute_language_model_loss(labels, logits)
        labels = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b]
        out = vocab_parallel_shaped_cross_entropy(
            logits,  # [s, b, V/tp]
            labels,  # [s, b]
            self.shaping,
            self.pg_collection.tp,
            ignore_index=self.ignore_index,
            return_stats=self.compute_loss_stats,
            check_finite=self.check_finite_logits,
            input_flags=self.input_flags,
        )
        if self.compute_loss_stats:
            loss, stats = out
            self.last_loss_stats = ShapedLossStats(*(t.transpose(0, 1) for t in stats))  # [b, s]
        else:
            loss = out
        return loss.transpose(0, 1).contiguous()  # [s, b] -> [b, s]


def build_model(
    model: ModelConfig,
    config: TransformerConfig,
    shaping: RewardShapingConfig | None = None,
    *,
    use_transformer_engine: bool = False,
    native_cross_entropy: bool = False,
    fused_output_loss: bool = False,
    vp_stage: int | None = None,
) -> ShapedLossGPTModel:
    """This rank's pipeline stage of the model, or with a virtual pipeline its model chunk
    `vp_stage` (0-based; None without one). parallel_state must be initialised."""
    padded_vocab = model.padded_vocab_size(config.tensor_model_parallel_size)
    return ShapedLossGPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(
            model, config, use_transformer_engine=use_transformer_engine, vp_stage=vp_stage
        ),
        vocab_size=padded_vocab,
        max_sequence_length=model.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=model.rope_base,
        shaping=shaping,
        native_cross_entropy=native_cross_entropy,
        fused_output_loss=fused_output_loss,
        vp_stage=vp_stage,
    )
