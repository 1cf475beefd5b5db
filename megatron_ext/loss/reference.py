"""Single-device reference of the reward-shaped loss: plain torch, written for reading.

Every other implementation is tested against this one. It follows the objective's definition
(arXiv 2512.22955) literally: full log-softmax, the top-k set by threshold (ties at the k-th logit
are in), stop-gradient weights, and autograd for the gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from megatron_ext.loss.config import RewardShapingConfig

__all__ = ["ShapedLossStats", "reference_shaped_cross_entropy", "positive_weight"]


class ShapedLossStats(NamedTuple):
    """Per-position diagnostics (detached, fp32, the target's shape)."""

    entropy: torch.Tensor
    """Entropy of the predicted distribution, -sum_a p_a log p_a (nats)."""
    target_prob: torch.Tensor
    """Probability of the ground-truth token, p(x)."""
    target_logprob: torch.Tensor
    """log p(x): the cross-entropy loss is its negative."""
    topk_mass: torch.Tensor
    """Probability mass of the top-k set (k = config.top_k, capped at the vocabulary size)."""


def positive_weight(target_logprob: torch.Tensor, beta: float) -> torch.Tensor:
    """w_pos = p ** (1 - (1 - p) ** beta), computed in log space (objective.md section 3).

    1 - p is taken as -expm1(log p), clamped to the dtype's smallest normal number, so that both
    p -> 1 and p -> 0 give finite weights for every beta > -1.
    """
    if beta == 0.0:
        return torch.ones_like(target_logprob)
    tiny = torch.finfo(target_logprob.dtype).tiny
    one_minus_p = (-torch.expm1(target_logprob)).clamp_min(tiny)
    return torch.exp((1.0 - one_minus_p.pow(beta)) * target_logprob)


def _check_targets(target: torch.Tensor, vocab_size: int, ignore_index: int) -> torch.Tensor:
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= vocab_size))
    if bool(bad.any()):
        pos = int(bad.flatten().nonzero()[0])
        raise ValueError(
            f"target id {int(target.flatten()[pos])} at flat position {pos} is outside the "
            f"vocabulary [0, {vocab_size}) and is not ignore_index={ignore_index}"
        )
    return valid


def reference_shaped_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    config: RewardShapingConfig,
    ignore_index: int = -100,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ShapedLossStats]:
    """Per-position reward-shaped loss on one device.

    Args:
        logits: [..., V] logits over the whole vocabulary, any float dtype (computed in fp32, or
            fp64 when given fp64).
        target: [...] ground-truth ids; positions equal to ignore_index get zero loss and gradient.
        config: the reward shaping.
        ignore_index: target value of positions to skip.
        return_stats: also return ShapedLossStats.

    Returns:
        The loss with target's shape (fp32, or fp64 for fp64 logits); with return_stats, also the
        diagnostics.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree: logits must "
            "be target's shape plus the vocabulary dimension"
        )
    vocab_size = logits.shape[-1]
    if config.uses_top_k and config.top_k > vocab_size:
        raise ValueError(
            f"top_k={config.top_k} exceeds the vocabulary size {vocab_size}; choose top_k <= "
            f"{vocab_size}"
        )
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if not bool(torch.isfinite(z).all()):
        raise ValueError("logits contain non-finite values (NaN or +-inf)")
    valid = _check_targets(target, vocab_size, ignore_index)
    safe_target = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(-1)

    logp = torch.log_softmax(z, dim=-1)  # [..., V]
    p = logp.exp()
    target_logprob = logp.gather(-1, safe_target).squeeze(-1)  # [...]

    w_pos = positive_weight(target_logprob.detach(), config.beta)

    k = min(config.top_k, vocab_size)
    tau = torch.topk(z.detach(), k, dim=-1).values[..., -1:]  # [..., 1], the k-th largest logit
    in_topk = z.detach() >= tau  # ties at tau are inside the set
    is_target = torch.zeros_like(in_topk).scatter_(-1, safe_target, True)
    reward_neg = torch.where(
        in_topk,
        torch.as_tensor(config.lambda_head, dtype=z.dtype),
        torch.as_tensor(config.lambda_tail, dtype=z.dtype),
    )
    reward_neg = reward_neg.masked_fill(is_target, 0.0)
    w_neg = (reward_neg * p).detach()  # [..., V]

    loss = -(w_pos * target_logprob + (w_neg * logp).sum(-1))
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if not return_stats:
        return loss
    with torch.no_grad():
        zero = torch.zeros_like(target_logprob)
        stats = ShapedLossStats(
            entropy=-(p * logp).sum(-1).float(),
            target_prob=torch.where(valid, target_logprob.exp(), zero).float(),
            target_logprob=torch.where(valid, target_logprob, zero).float(),
            topk_mass=(p * in_topk).sum(-1).float(),
        )
    return loss, stats
