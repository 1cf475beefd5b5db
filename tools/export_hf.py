"""Export a megatron_ext checkpoint as a Hugging Face model directory (Qwen3 / Qwen3-MoE).

    python tools/export_hf.py --checkpoint RUN_DIR --out OUT_DIR --tokenizer TOKENIZER_DIR \\
        [--step N] [--dtype bf16] [--max-shard-size 5GB] [--overwrite]

--checkpoint is a training run's checkpoint root (CheckpointConfig.save_dir: the latest step, or
--step), one of its iter_* folders, or any megatron-core dist checkpoint (torch_dist format) of a
GPTModel; any TP/PP/EP layout. The architecture is read from the run configuration that
megatron_ext.training stores in its checkpoints; for other checkpoints pass --arch, a JSON file
with the fields of megatron_ext.export.ExportArch. OUT_DIR appears only once the export is
complete. Runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from megatron_ext.export import ExportArch, export_training_checkpoint

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="run checkpoint root or checkpoint folder")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--step", type=int, help="step under the run root (default: latest)")
    p.add_argument("--arch", help="JSON file with the ExportArch fields (default: from the run)")
    p.add_argument("--tokenizer", help="directory with tokenizer.json / tokenizer_config.json")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="weight dtype (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (5GB)")
    p.add_argument("--bos-token-id", type=int, help="default: the tokenizer's")
    p.add_argument("--eos-token-id", type=int, help="default: the tokenizer's, else the run's eod")
    p.add_argument("--pad-token-id", type=int, help="default: the tokenizer's")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    arch = ExportArch.from_dict(json.loads(Path(args.arch).read_text())) if args.arch else None
    out = export_training_checkpoint(
        args.checkpoint,
        args.out,
        step=args.step,
        arch=arch,
        tokenizer_dir=args.tokenizer,
        dtype=_DTYPES[args.dtype] if args.dtype else None,
        max_shard_size=args.max_shard_size,
        bos_token_id=args.bos_token_id,
        eos_token_id=args.eos_token_id,
        pad_token_id=args.pad_token_id,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
