"""The one key map from megatron-core GPTModel names to Hugging Face Qwen3 / Qwen3-MoE names.

`KEY_MAP` is the whole mapping: one row per megatron tensor, with the Hugging Face tensor(s) it
becomes and the transform between them; `INVERSES` holds the way back of every transform (the
importer's). `plan_keys(model, padded_vocab_size)` expands it for one model (a models.ModelConfig,
its embedding rows; layer and expert indices filled in); nothing else in the exporter or the
importer knows a parameter name.

Megatron names are those of `GPTModel.state_dict()` for a TP=1, PP=1, EP=1 model. The local layer
spec and the Transformer Engine spec differ only in where the pre-norms live; the TE names (and the
keys that megatron's dist checkpoints use for the local spec, `sharded_state_dict_keys_map`) are
accepted as aliases. Experts are accepted in the SequentialMLP layout (local spec,
`experts.local_experts.{expert}.linear_fc1.weight`) and the TEGroupedMLP layout
(`experts.linear_fc1.weight{expert}`).

Hugging Face names are those that transformers writes to disk. For Qwen3-MoE experts that is one
tensor per expert and projection (`mlp.experts.{expert}.gate_proj.weight`): transformers 5 keeps the
experts fused in memory (`gate_up_proj` [E, 2*I, H], `down_proj` [E, H, I]) but converts on load
(conversion_mapping "qwen2_moe", also used by qwen3_moe) and back on save, so this is the layout
that transformers 4.x, transformers 5.x, vLLM and SGLang all read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import torch

from megatron_ext.models.config import ModelConfig

__all__ = ["IGNORED_SUFFIXES", "INVERSES", "KEY_MAP", "KeyRule", "PlannedKey", "plan_keys"]

Scope = Literal["model", "untied", "layer", "dense", "moe", "expert"]
Transform = Callable[[torch.Tensor, ModelConfig], tuple[torch.Tensor, ...]]
"""(megatron tensor, model) -> the Hugging Face tensors."""
Merge = Callable[[tuple[torch.Tensor, ...], ModelConfig, tuple[int, ...]], torch.Tensor]
"""(Hugging Face tensors, model, the megatron tensor's shape) -> the megatron tensor."""


def identity(t: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, ...]:
    """The same tensor."""
    return (t,)


def strip_vocab_padding(t: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Drop megatron's padding rows: [padded_vocab, h] -> [vocab, h]."""
    return (t[: model.vocab_size],)  # [v, h]


def split_qkv(t: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Split megatron's fused QKV, laid out per query group, into q, k and v projections.

    Each of the num_query_groups groups holds heads_per_group*head_dim rows of q, then head_dim
    rows of k, then head_dim rows of v.
    """
    ng, hpg, d, h = model.num_query_groups, model.heads_per_group, model.head_dim, model.hidden_size
    grouped = t.view(ng, hpg + 2, d, h)  # [ng, hpg + 2, d, h]
    q = grouped[:, :hpg].reshape(ng * hpg * d, h)  # [nh*d, h]
    k = grouped[:, hpg].reshape(ng * d, h)  # [ng*d, h]
    v = grouped[:, hpg + 1].reshape(ng * d, h)  # [ng*d, h]
    return q, k, v


def split_gate_up(t: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Split a fused SwiGLU linear_fc1 = [gate; up] ([2*ffn, h]) into gate and up ([ffn, h] each).

    megatron's SwiGLU is silu(first half) * second half, so the first half is the gate.
    """
    gate, up = t.chunk(2, dim=0)  # [ffn, h] each
    return gate, up


def only(ts: tuple[torch.Tensor, ...], model: ModelConfig, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of `identity`: the one tensor."""
    (t,) = ts
    return t


def pad_vocab(
    ts: tuple[torch.Tensor, ...], model: ModelConfig, shape: tuple[int, ...]
) -> torch.Tensor:
    """The inverse of `strip_vocab_padding`: [vocab, h] -> [padded_vocab, h] (`shape`), the
    padding rows 0."""
    (t,) = ts
    out = t.new_zeros(shape)  # [pv, h]
    out[: model.vocab_size] = t
    return out


def fuse_qkv(
    ts: tuple[torch.Tensor, ...], model: ModelConfig, shape: tuple[int, ...]
) -> torch.Tensor:
    """The inverse of `split_qkv`: q, k and v projections -> megatron's QKV, per query group."""
    q, k, v = ts
    ng, hpg, d, h = model.num_query_groups, model.heads_per_group, model.head_dim, model.hidden_size
    grouped = torch.cat(
        [q.reshape(ng, hpg, d, h), k.reshape(ng, 1, d, h), v.reshape(ng, 1, d, h)], dim=1
    )  # [ng, hpg + 2, d, h]
    return grouped.reshape(ng * (hpg + 2) * d, h)  # [(nh + 2*ng)*d, h]


def fuse_gate_up(
    ts: tuple[torch.Tensor, ...], model: ModelConfig, shape: tuple[int, ...]
) -> torch.Tensor:
    """The inverse of `split_gate_up`: gate and up ([ffn, h] each) -> [gate; up] ([2*ffn, h])."""
    gate, up = ts
    return torch.cat([gate, up], dim=0)  # [2*ffn, h]


INVERSES: dict[Transform, Merge] = {
    identity: only,
    strip_vocab_padding: pad_vocab,
    split_qkv: fuse_qkv,
    split_gate_up: fuse_gate_up,
}
"""Each transform of KEY_MAP -> its inverse (Hugging Face tensors -> the megatron tensor)."""


Shape = Callable[[ModelConfig, int], tuple[int, ...]]
"""(model, padded vocabulary size) -> the shape of a megatron tensor."""


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One row of the key map."""

    scope: Scope
    """Where the row applies: model (once), untied (once, only without tied embeddings), layer
    (every layer), dense (layers with a dense MLP), moe (MoE layers), expert (every expert)."""
    megatron: str
    """Megatron name; {layer} and {expert} are filled in."""
    shape: Shape
    """Shape of the megatron tensor, checked before the transform."""
    hf: tuple[str, ...]
    """Hugging Face name(s), one per tensor the transform returns."""
    transform: Transform
    """Megatron tensor -> HF tensors."""
    aliases: tuple[str, ...] = ()
    """Other megatron names of the same tensor (TE spec, grouped experts, dist-checkpoint keys)."""


def _vocab(a: ModelConfig, padded_vocab: int) -> tuple[int, ...]:
    return (padded_vocab, a.hidden_size)


def _hidden(a: ModelConfig, padded_vocab: int) -> tuple[int, ...]:
    return (a.hidden_size,)


def _head(a: ModelConfig, padded_vocab: int) -> tuple[int, ...]:
    return (a.head_dim,)


def _qkv(a: ModelConfig, padded_vocab: int) -> tuple[int, ...]:
    return ((a.num_attention_heads + 2 * a.num_query_groups) * a.head_dim, a.hidden_size)


def _proj(a: ModelConfig, padded_vocab: int) -> tuple[int, ...]:
    return (a.hidden_size, a.num_attention_heads * a.head_dim)


def _fc1(a: ModelConfig, padded_vocab: int) -> tuple[int, ...]:
    return (2 * a.ffn_hidden_size, a.hidden_size)


def _fc2(a: ModelConfig, padded_vocab: int) -> tuple[int, ...]:
    return (a.hidden_size, a.ffn_hidden_size)


def _router(a: ModelConfig, padded_vocab: int) -> tuple[int, ...]:
    return (a.num_experts, a.hidden_size)


def _expert_fc1(a: ModelConfig, padded_vocab: int) -> tuple[int, ...]:
    return (2 * a.moe_ffn_hidden_size, a.hidden_size)


def _expert_fc2(a: ModelConfig, padded_vocab: int) -> tuple[int, ...]:
    return (a.hidden_size, a.moe_ffn_hidden_size)


_L = "decoder.layers.{layer}."
_H = "model.layers.{layer}."
_E = "mlp.experts.local_experts.{expert}."

KEY_MAP: tuple[KeyRule, ...] = (
    # scope     megatron name                              megatron shape
    #           HF name(s)                                 transform, aliases
    KeyRule("model", "embedding.word_embeddings.weight", _vocab,
            ("model.embed_tokens.weight",), strip_vocab_padding),
    KeyRule("model", "decoder.final_layernorm.weight", _hidden,
            ("model.norm.weight",), identity),
    KeyRule("untied", "output_layer.weight", _vocab,
            ("lm_head.weight",), strip_vocab_padding),
    KeyRule("layer", _L + "input_layernorm.weight", _hidden,
            (_H + "input_layernorm.weight",), identity,
            aliases=(_L + "self_attention.linear_qkv.layer_norm_weight",)),
    KeyRule("layer", _L + "self_attention.linear_qkv.weight", _qkv,
            (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight",
             _H + "self_attn.v_proj.weight"), split_qkv),
    KeyRule("layer", _L + "self_attention.q_layernorm.weight", _head,
            (_H + "self_attn.q_norm.weight",), identity),
    KeyRule("layer", _L + "self_attention.k_layernorm.weight", _head,
            (_H + "self_attn.k_norm.weight",), identity),
    KeyRule("layer", _L + "self_attention.linear_proj.weight", _proj,
            (_H + "self_attn.o_proj.weight",), identity),
    KeyRule("layer", _L + "pre_mlp_layernorm.weight", _hidden,
            (_H + "post_attention_layernorm.weight",), identity,
            aliases=(_L + "mlp.linear_fc1.layer_norm_weight",)),
    KeyRule("dense", _L + "mlp.linear_fc1.weight", _fc1,
            (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), split_gate_up),
    KeyRule("dense", _L + "mlp.linear_fc2.weight", _fc2,
            (_H + "mlp.down_proj.weight",), identity),
    KeyRule("moe", _L + "mlp.router.weight", _router,
            (_H + "mlp.gate.weight",), identity),
    KeyRule("expert", _L + _E + "linear_fc1.weight", _expert_fc1,
            (_H + "mlp.experts.{expert}.gate_proj.weight",
             _H + "mlp.experts.{expert}.up_proj.weight"), split_gate_up,
            aliases=(_L + "mlp.experts.linear_fc1.weight{expert}",)),
    KeyRule("expert", _L + _E + "linear_fc2.weight", _expert_fc2,
            (_H + "mlp.experts.{expert}.down_proj.weight",), identity,
            aliases=(_L + "mlp.experts.linear_fc2.weight{expert}",)),
)  # fmt: skip

IGNORED_SUFFIXES: tuple[str, ...] = ("._extra_state",)
"""Megatron state-dict entries that carry no weights (Transformer Engine / fp8 metadata)."""


@dataclasses.dataclass(frozen=True)
class PlannedKey:
    """One row of the key map for one model: concrete names."""

    megatron: tuple[str, ...]
    """Accepted megatron names, the canonical one first."""
    shape: tuple[int, ...]
    """Expected shape of the megatron tensor."""
    hf: tuple[str, ...]
    """Hugging Face names produced."""
    transform: Transform
    """Megatron tensor -> HF tensors."""
    merge: Merge
    """(HF tensors in `hf` order, model, `shape`) -> the megatron tensor (INVERSES[transform])."""


def plan_keys(model: ModelConfig, padded_vocab_size: int | None = None) -> list[PlannedKey]:
    """KEY_MAP expanded for `model`, in Hugging Face order (embeddings, layers, norm, head).

    Args:
        model: the model.
        padded_vocab_size: rows of megatron's embedding and output layer (vocab_size rounded up
            for the TP size the model was built for); None: model.padded_vocab_size() (TP=1).

    Raises:
        ValueError: padded_vocab_size is smaller than the model's vocab_size.
    """
    if padded_vocab_size is None:
        padded_vocab_size = model.padded_vocab_size()
    if padded_vocab_size < model.vocab_size:
        raise ValueError(
            f"padded_vocab_size={padded_vocab_size} is smaller than vocab_size="
            f"{model.vocab_size}: the embedding must hold a row for every token"
        )

    def expand(rule: KeyRule, **idx: int) -> PlannedKey:
        names = (rule.megatron, *rule.aliases)
        return PlannedKey(
            megatron=tuple(n.format(**idx) for n in names),
            shape=rule.shape(model, padded_vocab_size),
            hf=tuple(n.format(**idx) for n in rule.hf),
            transform=rule.transform,
            merge=INVERSES[rule.transform],
        )

    by_scope: dict[str, list[KeyRule]] = {}
    for rule in KEY_MAP:
        by_scope.setdefault(rule.scope, []).append(rule)
    first, *rest = by_scope["model"]  # the embedding first, the final norm after the layers
    plan = [expand(first)]
    for layer in range(model.num_layers):
        plan += [expand(r, layer=layer) for r in by_scope["layer"]]
        if model.is_moe_layer(layer):
            plan += [expand(r, layer=layer) for r in by_scope["moe"]]
            for expert in range(model.num_experts):
                plan += [expand(r, layer=layer, expert=expert) for r in by_scope["expert"]]
        else:
            plan += [expand(r, layer=layer) for r in by_scope["dense"]]
    plan += [expand(r) for r in rest]
    if not model.tie_embeddings:
        plan += [expand(r) for r in by_scope["untied"]]
    return plan
