"""The fused output-layer loss behind megatron-core's own seam: `GPTModel.forward(...,
output_processor=...)` (megatron-core 0.18 and later).

`ShapedLossOutputProcessor` replaces the output layer's matmul and the loss with
megatron_ext.loss.output.fused_output_shaped_cross_entropy, so the [s, b, V/tp] logits are never
materialised. Any megatron-core GPTModel takes it, in Megatron-LM's or Megatron-Bridge's own
forward_step; ShapedLossGPTModel uses one by default (fused_output_loss).

What the output layer does around its matmul, it does too: the all-gather of sequence-parallel
hidden states ([s/tp, b, h] -> [s, b, h], reduce-scatter of the gradient) or the copy whose
backward all-reduces the hidden states' gradient over the tensor-parallel group; the weight is
the model's (`output_weight`, the embedding's, when they are tied, else output_layer.weight), and
its gradient reaches megatron DDP's main_grad buffer in fp32. The output layer's forward
pre-hooks run before its weight is read, as a call of the layer would run them: megatron DDP's
overlapped parameter all-gather (overlap_param_gather) waits there for the weight's bucket, which
the fused path would otherwise read before the all-gather has finished. Multi-token-prediction
heads keep megatron's unfused path (GPTModel computes them before the output processor runs); so
does a model with MuP logit scaling. Without labels (inference) it returns the logits as GPTModel
does.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from torch import Tensor

from megatron_ext.loss import RewardShapingConfig, ShapedLossStats
from megatron_ext.loss.output import fused_output_shaped_cross_entropy

__all__ = ["ShapedLossOutputProcessor"]


def _run_forward_pre_hooks(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
    """The forward pre-hooks of `module` (its own, not torch's global ones), as `module(*args)`
    would run them; what they return is dropped (the fused path computes without the module)."""
    with_kwargs = getattr(module, "_forward_pre_hooks_with_kwargs", {})
    for hook_id, hook in list(getattr(module, "_forward_pre_hooks", {}).items()):
        if hook_id in with_kwargs:
            hook(module, args, {})
        else:
            hook(module, args)


class ShapedLossOutputProcessor:
    """megatron-core output processor: the output layer and the reward-shaped loss, fused.

    Pass it as `model(tokens, position_ids, attention_mask, labels=labels,
    output_processor=processor)`; the model then returns the per-token loss [b, s] (fp32, 0 at
    ignore_index), as with its own loss, for a loss_func that multiplies it by loss_mask.

    Attributes are read at each call, so a trainer may change them between steps:
        shaping: the reward shaping.
        ignore_index: label of positions without loss.
        return_stats: compute the statistics (entropy, p(x), log p(x), top-k mass); they are
            left in `last_stats` ([b, s] detached tensors), None otherwise.
        check_finite / input_flags: as in vocab_parallel_shaped_cross_entropy (input_flags: no
            host synchronisation; bad input is counted on the device instead of raising).
        chunk_rows: positions per chunk of logits (None: loss.output.chunk_rows_for).
        gradient: "precompute" (the gradients in the forward, scaled in the backward: needs the
            same upstream gradient at every counted position, as megatron's loss functions
            give) or "recompute" (the logits again in the backward, any upstream gradient, one
            matmul more); see loss/output.py.

    Positions where the model's `loss_mask` (when the caller passes it to the model) is 0 are
    ignored like ignore_index labels: loss 0, no gradient. Pass it with "precompute" when your
    labels there are real tokens (Megatron-LM's convention), so that the upstream gradient,
    loss * loss_mask, is the same at every counted position.
    """

    def __init__(
        self,
        shaping: RewardShapingConfig | None = None,
        *,
        ignore_index: int = -100,
        return_stats: bool = False,
        check_finite: bool = True,
        input_flags: Tensor | None = None,
        chunk_rows: int | None = None,
        gradient: str = "precompute",
    ) -> None:
        self.shaping = shaping if shaping is not None else RewardShapingConfig()
        self.ignore_index = ignore_index
        self.return_stats = return_stats
        self.check_finite = check_finite
        self.input_flags = input_flags
        self.chunk_rows = chunk_rows
        self.gradient = gradient
        self.last_stats: ShapedLossStats | None = None

    def __call__(
        self,
        *,
        hidden_states: Tensor,
        output_layer: torch.nn.Module,
        output_weight: Tensor | None,
        labels: Tensor | None,
        loss_mask: Tensor | None = None,
        runtime_gather_output: bool | None = None,
        compute_language_model_loss=None,
        scale_logits=None,
        config: Any = None,
        **unused: Any,
    ) -> Tensor:
        """GPTModel._postprocess's call (keyword arguments of megatron-core 0.19)."""
        self.last_stats = None
        if labels is None or (config is not None and getattr(config, "use_mup", False)):
            # Inference, or MuP's logit scaling: megatron's own output layer (and loss).
            logits, _ = output_layer(
                hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output
            )
            if scale_logits is not None:
                logits = scale_logits(logits)
            if labels is None:
                return logits.transpose(0, 1).contiguous()  # [s, b, v] -> [b, s, v]
            return compute_language_model_loss(labels, logits)
        if getattr(output_layer, "bias", None) is not None:
            raise ValueError(
                "ShapedLossOutputProcessor supports an output layer without bias only (GPT "
                "models have none: add_bias_linear=False or skip_bias_add)"
            )
        _run_forward_pre_hooks(output_layer, (hidden_states,))
        weight = output_weight if output_weight is not None else output_layer.weight
        tp_group = output_layer.tp_group
        if output_layer.sequence_parallel:
            # [s/tp, b, h] -> [s, b, h]; the backward reduce-scatters the gradient.
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=True, group=tp_group
            )
        elif tp_group is not None and tp_group.size() > 1:
            # Identity; the backward all-reduces the gradient over the vocabulary slices.
            hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=tp_group)
        s, b, h = hidden_states.shape
        if loss_mask is not None:  # masked positions count as ignored (loss 0, no gradient)
            labels = labels.masked_fill(loss_mask == 0, self.ignore_index)
        target = labels.transpose(0, 1).reshape(s * b)  # [b, s] -> [s * b]
        out = fused_output_shaped_cross_entropy(
            hidden_states.reshape(s * b, h),  # [s * b, h]
            weight,  # [V/tp, h]
            target,
            self.shaping,
            tp_group,
            ignore_index=self.ignore_index,
            return_stats=self.return_stats,
            check_finite=self.check_finite,
            input_flags=self.input_flags,
            chunk_rows=self.chunk_rows,
            gradient=self.gradient,
        )
        loss = out[0] if self.return_stats else out

        def per_token(x: Tensor) -> Tensor:
            return x.view(s, b).transpose(0, 1).contiguous()  # [s * b] -> [b, s]

        if self.return_stats:
            self.last_stats = ShapedLossStats(*(per_token(t) for t in out[1]))
        return per_token(loss)
