"""Import a Hugging Face Qwen3 / Qwen3-MoE model directory as a megatron_ext checkpoint.

    python tools/import_hf.py --hf HF_DIR --out CKPT [--tp N --pp N --ep N] [--dtype fp32|bf16] \\
        [--overwrite]

HF_DIR holds config.json, the safetensors weights (model.safetensors, or shards with
model.safetensors.index.json) and usually the tokenizer files. CKPT becomes a checkpoint root:
iter_0000000/ (a megatron-core dist checkpoint of the weights, loadable at any TP/PP/EP layout),
`latest`, config.json (the run configuration: model, parallel, data.eod_id) and tokenizer/. The
vocabulary is padded for --tp (ModelConfig.padded_vocab_size); --pp and --ep are checked against the
model and recorded. Weights are stored as --dtype (default fp32, the trainer's parameter dtype).

Train from it with `python -m megatron_ext.training --init-from CKPT ...` (weights only, step 0);
export it back with `python tools/export_hf.py --checkpoint CKPT --out DIR --tokenizer
CKPT/tokenizer`. A directory that cannot be imported (another architecture or option, a missing or
truncated shard, a tokenizer larger than vocab_size, ...) is reported as one `error:` line on
stderr with exit status 1 before anything is written; CKPT appears only once complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Only the standard library (and the export's torch-free modules) before the arguments are checked.
from megatron_ext.export.preflight import check_output_dir

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hf", required=True, help="Hugging Face model directory")
    p.add_argument("--out", required=True, help="checkpoint root to create (unless --overwrite)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size the vocabulary fits")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (checked, recorded)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (checked, recorded)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32", help="stored dtype (fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Check the paths and sizes of the command line (standard library only).

    Raises:
        FileNotFoundError: --hf is not a directory.
        FileExistsError: --out exists and --overwrite is not given.
        ValueError: a parallel size below 1, or --out holding --hf.
    """
    for flag in ("tp", "pp", "ep"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not Path(args.hf).is_dir():
        raise FileNotFoundError(f"--hf {args.hf}: no such directory")
    check_output_dir(
        args.out, overwrite=args.overwrite, overwrite_hint="--overwrite", checkpoint=args.hf
    )


def _error(exc: BaseException) -> int:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    print(f"error: {'; '.join(lines) or type(exc).__name__}", file=sys.stderr, flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run the import; returns 0, or 1 after printing one `error:` line for an expected error
    (see the module docstring). Unexpected errors propagate with their traceback."""
    args = _parser().parse_args(argv)
    try:
        check_args(args)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        return _error(exc)

    from megatron_ext.core.quiet import quiet_expected_messages

    quiet_expected_messages(single_process=True)  # one process writes the checkpoint

    import torch

    from megatron_ext.export import UnsupportedArchitectureError, import_hf_model

    try:
        out = import_hf_model(
            args.hf,
            args.out,
            tensor_parallel=args.tp,
            pipeline_parallel=args.pp,
            expert_parallel=args.ep,
            dtype=getattr(torch, _DTYPES[args.dtype]),
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (
        FileNotFoundError,  # config.json or a shard missing
        FileExistsError,  # --out created since the check
        UnsupportedArchitectureError,
        ValueError,  # a truncated shard, missing tensors, a tokenizer larger than the model
    ) as exc:
        return _error(exc)
    print(f"imported to {out}")
    return 0


if __name__ == "__main__":
    from megatron_ext.core.shutdown import skip_final_gc

    skip_final_gc()  # a quicker exit (see megatron_ext.core.shutdown)
    sys.exit(main())
