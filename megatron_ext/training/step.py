"""One micro-batch of the run: the forward step that megatron's pipeline schedules call, and the
loss function it returns (token sums and metric sums of the micro-batch).

`forward_step(data_iterator, model)` shards each sequence for context parallelism
(`context_parallel_shard`), runs the model with its labels (the reward-shaped loss is computed by
the model's output layer) and returns `loss_func` bound to the micro-batch's loss mask and loss
statistics.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model

from megatron_ext.loss import ShapedLossStats
from megatron_ext.models import IGNORE_INDEX
from megatron_ext.training.data import MicroBatch

__all__ = ["context_parallel_shard", "forward_step", "loss_func"]


def loss_func(
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


def forward_step(data_iterator, model: torch.nn.Module):
    batch: MicroBatch = next(data_iterator)
    tokens, positions, loss_mask = batch.tokens, batch.position_ids, batch.loss_mask  # [b, s]
    if batch.labels is None:  # a stage between the first and the last: its input comes by p2p
        return model(None, None, None), partial(loss_func, None, None, False)
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
    return output, partial(loss_func, loss_mask, inner.last_loss_stats, loss_is_ce)
