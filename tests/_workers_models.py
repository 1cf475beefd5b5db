"""Per-rank checks of megatron_ext.models (run on the gloo pools)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def _parallel(tp: int = 1, pp: int = 1, ep: int = 1, seed: int = 0) -> Iterator[None]:
    from megatron_ext.core.cpu_compat import install_cpu_compat
    from megatron_ext.core.parallel import model_parallel

    install_cpu_compat()
    torch.manual_seed(seed)
    with model_parallel(tp, pp, ep, seed=seed):
        yield


def model_loss_vs_standalone(model_name: str, shaping_name: str, tp: int) -> dict:
    """The model's loss against vocab_parallel_shaped_cross_entropy on the model's own logits."""
    from megatron.core import parallel_state

    from megatron_ext.loss import RewardShapingConfig, vocab_parallel_shaped_cross_entropy
    from megatron_ext.models import (
        ShapedLossGPTModel,
        build_model,
        model_preset,
        to_transformer_config,
    )

    model_cfg = model_preset(model_name)
    shaping = RewardShapingConfig.preset(shaping_name)
    with _parallel(tp=tp):
        tconfig = to_transformer_config(model_cfg, tensor_parallel=tp)
        model = build_model(model_cfg, tconfig, shaping)
        assert isinstance(model, ShapedLossGPTModel)
        model.eval()
        gen = torch.Generator().manual_seed(1)
        b, s = 2, model_cfg.seq_length
        tokens = torch.randint(0, model_cfg.vocab_size, (b, s), generator=gen)
        labels = torch.randint(0, model_cfg.vocab_size, (b, s), generator=gen)
        labels[0, :5] = -100  # ignored positions
        positions = torch.arange(s).unsqueeze(0).expand(b, s)
        with torch.no_grad():
            loss = model(tokens, positions, None, labels=labels)  # [b, s]
            stats = model.last_loss_stats
            logits = model(tokens, positions, None)  # [b, s, V/tp], not gathered
            expected, expected_stats = vocab_parallel_shaped_cross_entropy(
                logits.transpose(0, 1).contiguous(),  # [s, b, V/tp]
                labels.transpose(0, 1).contiguous(),  # [s, b]
                shaping,
                parallel_state.get_tensor_model_parallel_group(),
                return_stats=True,
            )
        return {
            "loss_shape": tuple(loss.shape),
            "logits_shape": tuple(logits.shape),
            "stats_shape": tuple(stats.entropy.shape),
            "max_loss_diff": (loss - expected.transpose(0, 1)).abs().max().item(),
            "max_entropy_diff": (stats.entropy - expected_stats.entropy.transpose(0, 1))
            .abs()
            .max()
            .item(),
            "ignored_loss": loss[0, :5].abs().max().item(),
        }


def norm_marks(model_name: str, tp: int) -> dict:
    """Which norm weights carry sequence_parallel=True, and the norm module types."""
    from megatron_ext.models import RMSNorm, build_model, model_preset, to_transformer_config

    model_cfg = model_preset(model_name)
    with _parallel(tp=tp):
        tconfig = to_transformer_config(model_cfg, tensor_parallel=tp)
        model = build_model(model_cfg, tconfig)
        norms = {
            n: type(m).__name__
            for n, m in model.named_modules()
            if "norm" in n.split(".")[-1] and type(m).__name__ != "IdentityOp"  # cross-attn slot
        }
        marked = sorted(
            n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False)
        )
        return {
            "sequence_parallel": tconfig.sequence_parallel,
            "norm_types": sorted(set(norms.values())),
            "num_norms": len(norms),
            "all_rmsnorm": all(
                isinstance(m, RMSNorm) for n, m in model.named_modules() if n in norms
            ),
            "marked": marked,
        }
