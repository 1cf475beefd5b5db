"""Qwen3-style model configurations: our own typed dataclass and the presets of the paper's sizes.

The architecture (Qwen3 family): RMSNorm, SwiGLU MLP, rotary position embeddings, grouped-query
attention with RMSNorm on queries and keys (QK-norm), no linear biases; MoE layers route each token
to the top-k of `num_experts` SwiGLU experts (softmax over the selected logits, i.e. Qwen3's
`norm_topk_prob=True`; or over all logits before the selection, `moe_router_pre_softmax`),
optionally with a shared expert; an MoE model may keep a dense MLP in some layers
(`moe_dense_layers`).

`ModelConfig` is the one description of the architecture: the trainer builds its megatron model
from it (models.gpt), checkpoints record it (and refuse to load into a model whose
`weight_shape_fields()` differ), and the Hugging Face export and import translate it to and from
transformers' Qwen3 configs (megatron_ext.export.hf_config).

Hidden sizes of the paper's models are not published (setup.md). The presets below take Qwen3's
published shapes where a Qwen3 model of that size exists (4B) and otherwise Qwen3-like shapes
(head_dim 128, 151,936-token vocabulary, 128 experts) chosen so that `num_parameters()` and
`num_active_parameters()` match the names; tests/test_models.py checks them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

__all__ = ["MODEL_PRESETS", "QWEN3_VOCAB_SIZE", "ModelConfig", "model_preset"]

_SHAPES = {"weight_shapes": True}
"""Field metadata of the fields that decide the shapes of the weights (see weight_shape_fields)."""


def _shape_field(default: object = dataclasses.MISSING) -> Any:
    """A dataclass field that decides weight shapes."""
    return dataclasses.field(default=default, metadata=_SHAPES)


QWEN3_VOCAB_SIZE = 151_936
"""Size of the Qwen3 tokenizer's vocabulary (embedding rows of every Qwen3 model)."""


def _positive_int(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{owner}.{name} must be >= 1, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of a Qwen3-style decoder (dense or MoE)."""

    name: str = "custom"
    """Preset name, for logs."""
    vocab_size: int = _shape_field()
    """Tokenizer vocabulary size (rows are padded up for tensor parallelism, see padded_vocab_size)."""
    hidden_size: int = _shape_field()
    """Model width."""
    num_layers: int = _shape_field()
    """Number of decoder layers."""
    num_attention_heads: int = _shape_field()
    """Number of query heads."""
    num_query_groups: int = _shape_field()
    """Number of key/value heads (grouped-query attention); divides num_attention_heads."""
    head_dim: int = _shape_field()
    """Size of one attention head (Qwen3: 128, independent of hidden_size)."""
    ffn_hidden_size: int = _shape_field()
    """Intermediate size of the dense SwiGLU MLP (unused by MoE layers)."""
    rope_base: float = 10_000.0
    """RoPE base period (the paper: 1e4 in pre-training, 1e6 in mid-training)."""
    seq_length: int = 4096
    """Training sequence length (also the model's max_sequence_length)."""
    tie_embeddings: bool = _shape_field(True)
    """Whether the output layer reuses the input embedding matrix."""
    rms_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    make_vocab_size_divisible_by: int = _shape_field(128)
    """Embedding rows are padded to a multiple of this times the TP size (megatron convention)."""
    num_experts: int = _shape_field(0)
    """Routed experts per MoE layer; 0 for a dense model."""
    moe_router_topk: int = 0
    """Experts each token is routed to."""
    moe_ffn_hidden_size: int = _shape_field(0)
    """Intermediate size of one routed expert."""
    moe_shared_expert_ffn_hidden_size: int = _shape_field(0)
    """Intermediate size of the shared expert; 0 for none (Qwen3-MoE has none)."""
    moe_aux_loss_coeff: float = 1e-3
    """Weight of the load-balancing auxiliary loss (Qwen3-MoE: 1e-3)."""
    moe_router_pre_softmax: bool = False
    """Softmax over all experts' logits before the top-k selection, so the k routing weights do
    not sum to 1 (Hugging Face norm_topk_prob=False); False: softmax over the k selected logits
    (Qwen3-MoE, norm_topk_prob=True)."""
    moe_dense_layers: tuple[int, ...] = _shape_field(())
    """0-based indices of the layers of an MoE model that have a dense MLP (ffn_hidden_size)
    instead of experts (Hugging Face mlp_only_layers; megatron's moe_layer_freq pattern); empty:
    experts in every layer."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for field in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "num_query_groups",
            "head_dim",
            "ffn_hidden_size",
            "seq_length",
            "make_vocab_size_divisible_by",
        ):
            _positive_int(owner, field, getattr(self, field))
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"{owner}.num_query_groups={self.num_query_groups} does not divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        for field in ("rope_base", "rms_eps", "init_std"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{owner}.{field} must be a positive number, got {value!r}")
        for field in (
            "num_experts",
            "moe_router_topk",
            "moe_ffn_hidden_size",
            "moe_shared_expert_ffn_hidden_size",
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{owner}.{field} must be an int >= 0, got {value!r}")
        if self.num_experts:
            _positive_int(owner, "moe_router_topk", self.moe_router_topk)
            _positive_int(owner, "moe_ffn_hidden_size", self.moe_ffn_hidden_size)
            if self.moe_router_topk > self.num_experts:
                raise ValueError(
                    f"{owner}.moe_router_topk={self.moe_router_topk} exceeds "
                    f"num_experts={self.num_experts}"
                )
        elif self.moe_router_topk or self.moe_shared_expert_ffn_hidden_size:
            raise ValueError(
                f"{owner}: moe_router_topk={self.moe_router_topk} and "
                f"moe_shared_expert_ffn_hidden_size={self.moe_shared_expert_ffn_hidden_size} "
                "need num_experts > 0"
            )
        if not isinstance(self.moe_router_pre_softmax, bool):
            raise TypeError(
                f"{owner}.moe_router_pre_softmax must be true or false, got "
                f"{self.moe_router_pre_softmax!r}"
            )
        self._check_dense_layers(owner)

    def _check_dense_layers(self, owner: str) -> None:
        dense = self.moe_dense_layers
        if isinstance(dense, list):  # read from JSON or TOML
            dense = tuple(dense)
            object.__setattr__(self, "moe_dense_layers", dense)
        if not isinstance(dense, tuple) or any(
            isinstance(i, bool) or not isinstance(i, int) for i in dense
        ):
            raise TypeError(f"{owner}.moe_dense_layers must be a list of ints, got {dense!r}")
        if not dense:
            return
        if not self.num_experts:
            raise ValueError(f"{owner}.moe_dense_layers={list(dense)} needs num_experts > 0")
        if list(dense) != sorted(set(dense)) or dense[0] < 0 or dense[-1] >= self.num_layers:
            raise ValueError(
                f"{owner}.moe_dense_layers={list(dense)} must be increasing layer indices in "
                f"[0, num_layers={self.num_layers})"
            )
        if len(dense) == self.num_layers:
            raise ValueError(
                f"{owner}.moe_dense_layers={list(dense)} names every layer: a dense model has "
                "num_experts=0"
            )

    @property
    def is_moe(self) -> bool:
        """Whether the MLPs are mixtures of experts."""
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` (0-based) has experts."""
        return self.is_moe and layer not in self.moe_dense_layers

    @property
    def moe_layer_pattern(self) -> list[int]:
        """One 1 (experts) or 0 (dense MLP) per layer: megatron-core's list form of
        moe_layer_freq."""
        return [int(self.is_moe_layer(i)) for i in range(self.num_layers)]

    @property
    def heads_per_group(self) -> int:
        """Query heads sharing one key/value head."""
        return self.num_attention_heads // self.num_query_groups

    @classmethod
    def weight_shape_fields(cls) -> tuple[str, ...]:
        """The fields that decide the shapes of the weights: a checkpoint loads only into a model
        that agrees on all of them (the others, e.g. seq_length, rope_base or the MoE aux-loss
        weight, may change between pre-training and mid-training)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("weight_shapes"))

    def to_dict(self) -> dict[str, Any]:
        """Plain (JSON-serialisable) field values; `from_dict` reads them back."""
        out = dataclasses.asdict(self)
        out["moe_dense_layers"] = list(self.moe_dense_layers)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """A ModelConfig from plain field values (e.g. read from JSON).

        Raises:
            ValueError: an unknown field (named, with the known ones), or an invalid value.
            TypeError: a value of the wrong type.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {names}")
        return cls(**data)

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """Embedding rows: vocab_size rounded up to make_vocab_size_divisible_by * TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def _attention_parameters(self) -> int:
        h, d = self.hidden_size, self.head_dim
        q = h * self.num_attention_heads * d
        kv = 2 * h * self.num_query_groups * d
        out = self.num_attention_heads * d * h
        return q + kv + out + 2 * d  # + q/k RMSNorm weights

    def _mlp_parameters(self, active: bool, layer: int) -> int:
        h = self.hidden_size
        if not self.is_moe_layer(layer):
            return 3 * h * self.ffn_hidden_size
        experts = self.moe_router_topk if active else self.num_experts
        shared = 3 * h * self.moe_shared_expert_ffn_hidden_size
        return experts * 3 * h * self.moe_ffn_hidden_size + h * self.num_experts + shared

    def _count(self, active: bool) -> int:
        h = self.hidden_size
        layers = sum(
            self._attention_parameters() + self._mlp_parameters(active, i) + 2 * h
            for i in range(self.num_layers)
        )
        embeddings = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return layers + embeddings + h  # + final norm

    def num_parameters(self) -> int:
        """Total parameters (unpadded vocabulary, embeddings included)."""
        return self._count(active=False)

    def num_active_parameters(self) -> int:
        """Parameters used per token: top-k routed experts instead of all (embeddings included)."""
        return self._count(active=True)


def _tiny() -> ModelConfig:
    return ModelConfig(
        name="tiny",
        vocab_size=256,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=16,
        ffn_hidden_size=192,
        seq_length=64,
        tie_embeddings=False,
    )


def _tiny_moe() -> ModelConfig:
    return dataclasses.replace(
        _tiny(),
        name="tiny_moe",
        num_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=64,
    )


def _dense_1b() -> ModelConfig:
    # Between Qwen3-0.6B and Qwen3-1.7B: 1.09B parameters (0.86B without embeddings).
    return ModelConfig(
        name="dense_1b",
        vocab_size=QWEN3_VOCAB_SIZE,
        hidden_size=1536,
        num_layers=28,
        num_attention_heads=16,
        num_query_groups=8,
        head_dim=128,
        ffn_hidden_size=4608,
    )


def _dense_4b() -> ModelConfig:
    # Qwen3-4B's published shape: 4.02B parameters.
    return ModelConfig(
        name="dense_4b",
        vocab_size=QWEN3_VOCAB_SIZE,
        hidden_size=2560,
        num_layers=36,
        num_attention_heads=32,
        num_query_groups=8,
        head_dim=128,
        ffn_hidden_size=9728,
    )


def _moe(name: str, hidden: int, layers: int, heads: int) -> ModelConfig:
    # 128 experts of width 1024, top-4 routing: sparse enough for the names' total/active ratios
    # (~17-20x) with a 152K vocabulary whose embeddings count as active.
    return ModelConfig(
        name=name,
        vocab_size=QWEN3_VOCAB_SIZE,
        hidden_size=hidden,
        num_layers=layers,
        num_attention_heads=heads,
        num_query_groups=4,
        head_dim=128,
        ffn_hidden_size=3 * hidden,
        num_experts=128,
        moe_router_topk=4,
        moe_ffn_hidden_size=1024,
    )


MODEL_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": _tiny,
    "tiny_moe": _tiny_moe,
    "dense_1b": _dense_1b,
    "dense_4b": _dense_4b,
    "moe_5b_a0.3b": lambda: _moe("moe_5b_a0.3b", hidden=768, layers=16, heads=8),  # 4.99B / 0.31B
    "moe_10b_a0.5b": lambda: _moe("moe_10b_a0.5b", hidden=768, layers=32, heads=8),  # 9.86B / 0.50B
    "moe_20b_a1b": lambda: _moe("moe_20b_a1b", hidden=1536, layers=32, heads=12),  # 19.8B / 1.05B
}


def model_preset(name: str, **overrides: object) -> ModelConfig:
    """A preset by name (tiny, tiny_moe, dense_1b, dense_4b, moe_5b_a0.3b, moe_10b_a0.5b,
    moe_20b_a1b), with optional field overrides (e.g. seq_length=16384, rope_base=1e6)."""
    try:
        factory = MODEL_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown model preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}"
        ) from None
    config = factory()
    return dataclasses.replace(config, **overrides) if overrides else config
