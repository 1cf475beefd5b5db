"""Per-rank functions of the import tests (run in tests.distributed worker pools)."""

from __future__ import annotations

from typing import Any

import torch

from tests._workers_export import _parallel


def imported_logits(
    checkpoint_root: str, input_ids: torch.Tensor, tp: int, pp: int, ep: int = 1
) -> Any:
    """Build megatron_ext's model at TP=tp, PP=pp, EP=ep from the run configuration of an
    imported checkpoint, load it with megatron-core's own dist_checkpointing.load (which
    reshards), and run the batch through the pipeline schedule (every data-parallel rank the
    same batch). Returns the full fp32 logits [b, s, padded_v] on the last stage's first
    tensor-parallel ranks, None elsewhere."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ext.export.from_training import resolve_training_checkpoint, training_run_config
    from megatron_ext.models import ModelConfig, build_model, to_transformer_config

    checkpoint = resolve_training_checkpoint(checkpoint_root)
    model_config = ModelConfig(**training_run_config(checkpoint)["model"])
    b, s = input_ids.shape
    with _parallel(tp, pp, ep):
        config = to_transformer_config(
            model_config, tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep
        )
        model = build_model(model_config, config)
        metadata = {
            "singleton_local_shards": False,
            "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
        }
        request = {"model": model.sharded_state_dict(metadata=metadata)}
        model.load_state_dict(dist_checkpointing.load(request, checkpoint)["model"])
        model.eval()
        position_ids = torch.arange(s).unsqueeze(0).expand(b, s)

        def forward_step(data_iterator, model):
            output = model(next(data_iterator), position_ids, None)  # last stage: [b, s, v/tp]

            def collect(output_tensor):
                zero = output_tensor.sum() * 0
                return zero, torch.tensor(1, dtype=torch.int), {"logits": output_tensor.detach()}

            return output, collect

        with torch.no_grad():
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter([input_ids]),
                model=[model],
                num_microbatches=1,
                seq_length=s,
                micro_batch_size=b,
                forward_only=True,
            )
        if not parallel_state.is_pipeline_last_stage():
            return None
        local = outputs[0]["logits"].contiguous()  # [b, s, v/tp]
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local, group=group)
        if parallel_state.get_tensor_model_parallel_rank() != 0:
            return None
        return torch.cat(parts, dim=-1)  # [b, s, padded_v]
