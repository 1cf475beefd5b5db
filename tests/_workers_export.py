"""Per-rank functions of the export tests (run in tests.distributed worker pools).

Each function sets up megatron-core's parallel state on the pool's gloo ranks, does its work on a
tiny Qwen3-style GPTModel built with the local (torch) spec, and tears the parallel state down.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinyGPT:
    """A tiny Qwen3-style model: GQA, QK RMSNorm, SwiGLU, RoPE, no biases."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    head_dim: int = 16
    ffn_hidden_size: int = 96
    vocab_size: int = 250
    padded_vocab_size: int = 256
    max_sequence_length: int = 64
    rotary_base: float = 1_000_000.0
    layernorm_epsilon: float = 1e-6
    tied: bool = False
    num_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int = 32
    moe_layer_freq: int | tuple[int, ...] = 1
    moe_router_pre_softmax: bool = False
    seed: int = 1234


def _config(spec: TinyGPT, tp: int, pp: int, ep: int):
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    moe: dict[str, Any] = {}
    if spec.num_experts:
        moe = {
            "num_moe_experts": spec.num_experts,
            "moe_router_topk": spec.moe_router_topk,
            "moe_ffn_hidden_size": spec.moe_ffn_hidden_size,
            "moe_layer_freq": (
                spec.moe_layer_freq
                if isinstance(spec.moe_layer_freq, int)
                else list(spec.moe_layer_freq)
            ),
            "moe_router_pre_softmax": spec.moe_router_pre_softmax,
            "moe_token_dispatcher_type": "allgather",  # alltoall opens a CUDA stream
            "moe_router_load_balancing_type": "none",
            "expert_model_parallel_size": ep,
        }
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.head_dim,
        ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=spec.layernorm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        qk_layernorm=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.05,
        # The local spec's attention. Building a model exports NVTE_*_ATTN environment variables
        # for its backend and asserts that earlier models of the process agree: the pool's ranks
        # also run megatron_ext.training, which uses the local backend.
        attention_backend=AttnBackend.local,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        **moe,
    )


def _build(spec: TinyGPT, tp: int = 1, pp: int = 1, ep: int = 1):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    config = _config(spec, tp, pp, ep)
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_decoder_block_spec(
            config, use_transformer_engine=False, normalization="RMSNorm"
        ),
        vocab_size=spec.padded_vocab_size,
        max_sequence_length=spec.max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=spec.tied,
        position_embedding_type="rope",
        rotary_base=spec.rotary_base,
    )


def _save(sharded_state_dict: dict[str, Any], checkpoint_dir: str) -> None:
    """dist_checkpointing.save from a pool worker.

    The torch_dist writer collects its (synchronous, in-process) write results through a
    multiprocessing Manager queue, which a daemonic pool worker may not start; a plain queue
    serves the same purpose here.
    """
    import queue

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    dist_checkpointing.save(sharded_state_dict, checkpoint_dir)


@contextlib.contextmanager
def _parallel(tp: int = 1, pp: int = 1, ep: int = 1, seed: int = 0) -> Iterator[None]:
    from megatron_ext.core.cpu_compat import install_cpu_compat
    from megatron_ext.core.parallel import model_parallel

    install_cpu_compat()
    with model_parallel(tp, pp, ep, seed=seed):
        yield


def reference_model(
    spec: TinyGPT, input_ids: torch.Tensor, checkpoint_dir: str | None = None
) -> dict[str, Any]:
    """TP=1 model with perturbed norm weights: its state dict, fp32 logits [b, s, padded_v],
    ExportArch, and (optionally) a dist checkpoint of it saved at checkpoint_dir.

    Every rank of the pool builds the same model (data-parallel replicas); rank 0 answers.
    """
    from megatron_ext.export import arch_from_gpt_model

    torch.manual_seed(spec.seed)
    with _parallel(seed=spec.seed):
        model = _build(spec)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:  # all-ones norms would hide a swapped norm mapping
                    param.add_(0.3 * torch.randn_like(param))
        model.eval()
        b, s = input_ids.shape
        position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
        with torch.no_grad():
            logits = model(input_ids, position_ids, attention_mask=None)  # [b, s, padded_v]
        if checkpoint_dir is not None:
            _save(model.sharded_state_dict(), checkpoint_dir)
        state = {
            k: v.detach().clone()
            for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor)
        }
        arch = arch_from_gpt_model(model, vocab_size=spec.vocab_size)
    if torch.distributed.get_rank() != 0:
        return None
    return {"state": state, "logits": logits.detach().clone(), "arch": arch}


def reshard_checkpoint(
    spec: TinyGPT, src_dir: str, dst_dir: str, tp: int, pp: int, ep: int = 1
) -> int:
    """Load src_dir into a model at TP=tp, PP=pp, EP=ep (megatron reshards on load) and save it
    again to dst_dir with that layout. Returns the number of parameters on this rank."""
    from megatron.core import dist_checkpointing

    with _parallel(tp, pp, ep, seed=spec.seed):
        model = _build(spec, tp, pp, ep)
        sharded = model.sharded_state_dict()
        loaded = dist_checkpointing.load(sharded, src_dir)
        model.load_state_dict(loaded, strict=False)
        _save(model.sharded_state_dict(), dst_dir)
        return sum(p.numel() for p in model.parameters())


def train_run(run_config: dict[str, Any]) -> int:
    """megatron_ext.training.pretrain on this pool's ranks; returns the final step."""
    from megatron_ext.training import config_from_dict, pretrain

    return pretrain(config_from_dict(run_config)).final_step


def trained_model_reference(checkpoint: str, input_ids: torch.Tensor) -> dict[str, Any] | None:
    """Load a training checkpoint into a TP=1, PP=1 model of megatron_ext.models through
    megatron-core's own resharding load (independent of the exporter's loader); return its state
    dict and fp32 logits [b, s, padded_v]. Every rank does the same; rank 0 answers."""
    from megatron.core import dist_checkpointing

    from megatron_ext.export.checkpoint import model_key_prefix
    from megatron_ext.export.from_training import training_run_config
    from megatron_ext.models import ModelConfig, build_model, to_transformer_config

    model_config = ModelConfig(**training_run_config(checkpoint)["model"])
    # The trainer may save a wrapped model (keys under "module."): request the same keys.
    prefix = model_key_prefix(dist_checkpointing.load_tensors_metadata(checkpoint))
    with _parallel():
        model = build_model(model_config, to_transformer_config(model_config))
        request = {"model": model.sharded_state_dict(prefix=prefix)}
        loaded = dist_checkpointing.load(request, checkpoint)
        model.load_state_dict({k[len(prefix) :]: v for k, v in loaded["model"].items()})
        model.eval()
        b, s = input_ids.shape
        position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
        with torch.no_grad():
            logits = model(input_ids, position_ids, None)  # [b, s, padded_v]
        state = {
            k: v.detach().clone()
            for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor)
        }
    if torch.distributed.get_rank() != 0:
        return None
    return {"state": state, "logits": logits.detach().clone()}
