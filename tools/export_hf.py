"""Export a megatron_ext checkpoint as a Hugging Face model directory (Qwen3 / Qwen3-MoE).

    python tools/export_hf.py --checkpoint RUN_DIR --out OUT_DIR --tokenizer TOKENIZER_DIR \\
        [--step N] [--dtype bf16] [--max-shard-size 5GB] [--chat-template FILE] [--overwrite]

--checkpoint is a training run's checkpoint root (CheckpointConfig.save_dir: the latest step, or
--step), one of its iter_* folders, or any megatron-core dist checkpoint (torch_dist format) of a
GPTModel; any TP/PP/EP layout. The architecture is read from the run configuration that the
trainer and the importer store in their checkpoints; for other checkpoints pass --arch, a JSON
file with the fields of megatron_ext.models.ModelConfig (ModelConfig.to_dict; the padded
vocabulary is read from the stored embedding). The tokenizer's files are copied with its chat
template; --chat-template FILE (a Jinja template) becomes the template, replacing the tokenizer's
if it has one (the output says which). OUT_DIR appears only once the export is complete, with
the file modes the umask gives (e.g. 0644 files, 0755 folders). Runs on the CPU.

A path that is not a checkpoint, an existing OUT_DIR without --overwrite or a bad value is
reported as one `error:` line on stderr, with exit status 1, before torch is imported.
"""

from __future__ import annotations

import argparse
import sys

# Only the standard library (and the export's torch-free modules) before the arguments are checked;
# torch and megatron-core take 10-20 s to import and are loaded only after that.
from megatron_ext.export.preflight import (
    check_checkpoint_path,
    check_output_dir,
    parse_size,
    read_arch_file,
    read_chat_template,
    tokenizer_chat_template,
    tokenizer_files,
)

_DTYPES = {  # --dtype -> name of the torch dtype
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="run checkpoint root or checkpoint folder")
    p.add_argument("--out", required=True, help="output directory (new, unless --overwrite)")
    p.add_argument("--step", type=int, help="step under the run root (default: latest)")
    p.add_argument("--arch", help="JSON file of ModelConfig fields (default: from the run)")
    p.add_argument("--tokenizer", help="directory with tokenizer.json / tokenizer_config.json")
    p.add_argument(
        "--chat-template", help="Jinja chat template file for the tokenizer (replaces its own)"
    )
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="weight dtype (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (5GB)")
    p.add_argument("--bos-token-id", type=int, help="default: the tokenizer's")
    p.add_argument("--eos-token-id", type=int, help="default: the tokenizer's, else the run's eod")
    p.add_argument("--pad-token-id", type=int, help="default: the tokenizer's")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Check the paths and values of the command line (standard library only).

    Raises:
        FileNotFoundError: --checkpoint is not a checkpoint, or --tokenizer / --arch /
            --chat-template is missing.
        FileExistsError: --out exists and --overwrite is not given.
        ValueError: a bad value (--arch contents, an empty --chat-template or one without
            --tokenizer, --max-shard-size, --step, --out holding the checkpoint).
    """
    if args.step is not None and args.step < 0:
        raise ValueError(f"--step must be >= 0, got {args.step}")
    check_checkpoint_path(args.checkpoint, args.step)
    check_output_dir(
        args.out, overwrite=args.overwrite, overwrite_hint="--overwrite", checkpoint=args.checkpoint
    )
    if args.tokenizer is not None:
        tokenizer_files(args.tokenizer)
    if args.arch is not None:
        read_arch_file(args.arch)
    if args.chat_template is not None:
        try:
            read_chat_template(args.chat_template)
        except (FileNotFoundError, ValueError) as exc:
            raise type(exc)(f"--chat-template: {exc}") from None
        if args.tokenizer is None:
            raise ValueError(
                "--chat-template needs --tokenizer: the template is installed into the exported "
                "tokenizer's files"
            )
    try:
        parse_size(args.max_shard_size)
    except ValueError as exc:
        raise ValueError(f"--max-shard-size: {exc}") from None


def _error(exc: BaseException) -> int:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    print(f"error: {'; '.join(lines) or type(exc).__name__}", file=sys.stderr, flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run the export; returns 0, or 1 after printing one `error:` line for an expected error
    (a path that is not a checkpoint, an existing output, bad values, an incomplete or
    unsupported checkpoint). Unexpected errors propagate with their traceback."""
    args = _parser().parse_args(argv)
    try:
        check_args(args)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        return _error(exc)

    from megatron_ext.core.quiet import quiet_expected_messages

    quiet_expected_messages(single_process=True)  # one process reads the dist checkpoint

    import torch

    from megatron_ext.core.checkpoint_layout import CheckpointError
    from megatron_ext.export import (
        IncompleteCheckpointError,
        UnsupportedArchitectureError,
        export_training_checkpoint,
    )

    template = previous = None
    if args.chat_template is not None:
        template = read_chat_template(args.chat_template)
        previous = tokenizer_chat_template(args.tokenizer)
    try:
        out = export_training_checkpoint(
            args.checkpoint,
            args.out,
            step=args.step,
            model=read_arch_file(args.arch) if args.arch else None,
            tokenizer_dir=args.tokenizer,
            chat_template=template,
            dtype=getattr(torch, _DTYPES[args.dtype]) if args.dtype else None,
            max_shard_size=args.max_shard_size,
            bos_token_id=args.bos_token_id,
            eos_token_id=args.eos_token_id,
            pad_token_id=args.pad_token_id,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (
        FileNotFoundError,  # a step folder that is missing or incomplete
        FileExistsError,  # --out created since the check
        IncompleteCheckpointError,
        UnsupportedArchitectureError,
        CheckpointError,  # an unreadable 'latest' file
        ValueError,  # e.g. no run configuration and no --arch, a tokenizer larger than the model
    ) as exc:
        return _error(exc)
    if template is not None:
        if previous is None:
            print(f"chat template: {args.chat_template} (the tokenizer had none)")
        elif previous == template:
            print(f"chat template: {args.chat_template} (the same as the tokenizer's)")
        else:
            print(f"chat template: {args.chat_template} replaces the tokenizer's own")
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    from megatron_ext.core.shutdown import skip_final_gc

    skip_final_gc()  # a quicker exit (see megatron_ext.core.shutdown)
    sys.exit(main())
