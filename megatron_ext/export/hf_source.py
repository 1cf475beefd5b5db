"""A Hugging Face Qwen3 / Qwen3-MoE model directory, read and checked whole before an import.

`read_hf_model(directory, ...)` reads config.json (with transformers' own config class, into a
models.ModelConfig by export.hf_config.from_hf_config), the safetensors headers and the tokenizer,
and refuses, naming the config field or file, its value and the fix, everything the importer would
otherwise turn into a wrong checkpoint or fail on half-way:

- an architecture or option the megatron_ext model does not compute (another model_type or head,
  sliding-window attention, rope scaling, attention biases, another activation, shared experts);
- weights that are not all there: a shard the index names that is missing or shorter than its
  header says, a tensor the key map needs that no shard holds, a shape that config.json does not
  imply, a non-float dtype, or tensors the key map does not know;
- a tokenizer with more tokens than config.json's vocab_size;
- a parallel layout (--tp, --pp, --ep) the model's shape cannot be split into.

The checks run in that order, config first (so a config.json edited to fix one refusal shows
the next), tokenizer before the weights.

Only safetensors headers are read here (JSON at the start of each file); tensors are read later,
one at a time, by the importer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Any

from megatron_ext.export.arch import UnsupportedArchitectureError
from megatron_ext.export.hf_config import HF_ARCHITECTURES, from_hf_config
from megatron_ext.export.preflight import tokenizer_file_names
from megatron_ext.models.config import ModelConfig

__all__ = [
    "HF_ARCHITECTURES",
    "HfModel",
    "HfTensor",
    "read_hf_model",
    "read_safetensors_header",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
"""safetensors dtypes the importer reads -> torch dtype names."""


@dataclasses.dataclass(frozen=True)
class HfTensor:
    """Where one Hugging Face tensor is stored, from its shard's header."""

    file: str
    """Shard file name (in the model directory)."""
    dtype: str
    """torch dtype name (float32, bfloat16, float16)."""
    shape: tuple[int, ...]
    """Shape."""

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * (4 if self.dtype == "float32" else 2)


@dataclasses.dataclass(frozen=True)
class HfModel:
    """A checked Hugging Face model directory."""

    directory: Path
    """The model directory."""
    model_type: str
    """config.json's model_type (qwen3 or qwen3_moe)."""
    model: ModelConfig
    """The megatron_ext architecture of the model (vocab_size unpadded; export.hf_config)."""
    padded_vocab_size: int
    """Rows of the megatron embedding and output layer: vocab_size padded for the import's TP
    size (ModelConfig.padded_vocab_size)."""
    tensors: dict[str, HfTensor]
    """Every tensor the import reads, by Hugging Face name."""
    tokenizer_files: tuple[str, ...]
    """Tokenizer files of the directory (copied beside the checkpoint), maybe none."""
    eod_id: int | None
    """End-of-document id: config.json's eos_token_id (the first, if a list), else the
    tokenizer's; None when neither has one."""

    @property
    def files(self) -> list[str]:
        """The shard files read, sorted."""
        return sorted({t.file for t in self.tensors.values()})

    @property
    def total_bytes(self) -> int:
        """Bytes of the tensors read."""
        return sum(t.nbytes for t in self.tensors.values())


def _where(directory: Path, name: str = "config.json") -> str:
    return str(directory / name)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} {str(path)!r} is not readable JSON: {exc}") from None


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The tensor entries of a safetensors file's header (name -> dtype, shape, data_offsets),
    after checking that the file is as long as the header says.

    Raises:
        ValueError: the file is shorter than its header or data, or its header is not JSON.
    """
    path = Path(path)
    size = path.stat().st_size
    redownload = "download it again (an interrupted download or copy leaves such files)"
    with open(path, "rb") as f:
        start = f.read(8)
        if len(start) < 8:
            raise ValueError(
                f"{str(path)!r} is {size} bytes, too short for a safetensors header: {redownload}"
            )
        (header_len,) = struct.unpack("<Q", start)
        if 8 + header_len > size:
            raise ValueError(
                f"{str(path)!r} is truncated: {size} bytes, shorter than its "
                f"{8 + header_len}-byte header; {redownload}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"{str(path)!r} has no readable safetensors header ({exc}); {redownload}"
            ) from None
    header.pop("__metadata__", None)
    end = 8 + header_len + max((int(e["data_offsets"][1]) for e in header.values()), default=0)
    if end > size:
        raise ValueError(
            f"{str(path)!r} is truncated: {size} bytes, but its header describes {end} bytes; "
            f"{redownload}"
        )
    return header


def _weight_map(directory: Path) -> dict[str, str]:
    """Tensor name -> shard file, from the index (or the one model.safetensors)."""
    index = directory / INDEX_NAME
    if index.is_file():
        data = _read_json(index, "the weights index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{str(index)!r} has no weight_map (tensor name -> shard file)")
        return {str(k): str(v) for k, v in weight_map.items()}
    single = directory / SINGLE_FILE
    if single.is_file():
        return dict.fromkeys(read_safetensors_header(single), SINGLE_FILE)
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(
        p.name for p in directory.glob("*.safetensors")
    )
    raise FileNotFoundError(
        f"{str(directory)!r} has neither {INDEX_NAME} nor {SINGLE_FILE}"
        + (f" (it has {', '.join(others[:5])})" if others else "")
        + "; the importer reads safetensors weights, as save_pretrained writes them"
    )


def _read_tensors(directory: Path) -> dict[str, HfTensor]:
    weight_map = _weight_map(directory)
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    missing = sorted(f for f in by_file if not (directory / f).is_file())
    if missing:
        names = ", ".join(f"{f} ({len(by_file[f])} tensors)" for f in missing)
        raise FileNotFoundError(
            f"{INDEX_NAME} in {str(directory)!r} names shard files that are missing: {names}; "
            "download them again"
        )
    tensors: dict[str, HfTensor] = {}
    for file, names in sorted(by_file.items()):
        header = read_safetensors_header(directory / file)
        absent = sorted(set(names) - set(header))
        if absent:
            raise ValueError(
                f"{INDEX_NAME} places {len(absent)} tensors in {file}, which does not hold them "
                f"({', '.join(absent[:5])}); the index and the shard are of different "
                "downloads: download the model again"
            )
        for name in names:
            entry = header[name]
            dtype = _DTYPES.get(entry["dtype"])
            if dtype is None:
                raise UnsupportedArchitectureError(
                    f"{name} in {file} has dtype {entry['dtype']}; the importer reads "
                    f"{', '.join(_DTYPES)} weights (a quantized model cannot be imported: "
                    "use its unquantized release)"
                )
            tensors[name] = HfTensor(file=file, dtype=dtype, shape=tuple(entry["shape"]))
    return tensors


def _read_config(directory: Path) -> tuple[str, Any]:
    """(model_type, transformers config) of config.json, its model_type and head checked first."""
    path = directory / "config.json"
    raw = _read_json(path, "the model's config")
    if not isinstance(raw, dict):
        raise ValueError(f"{str(path)!r} holds a {type(raw).__name__}, not an object")
    model_type = raw.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        known = ", ".join(f"{t!r} ({a})" for t, a in HF_ARCHITECTURES.items())
        raise UnsupportedArchitectureError(
            f"{str(path)!r} has model_type={json.dumps(model_type)}; the importer reads {known} "
            "models only"
        )
    architectures = raw.get("architectures")
    if architectures not in (None, [HF_ARCHITECTURES[model_type]]):
        raise UnsupportedArchitectureError(
            f"{str(path)!r} has architectures={json.dumps(architectures)}; the importer reads "
            f"the causal language model ({HF_ARCHITECTURES[model_type]}) only"
        )
    if model_type == "qwen3":
        from transformers import Qwen3Config as config_class
    else:
        from transformers import Qwen3MoeConfig as config_class
    return model_type, config_class.from_pretrained(str(directory))


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _check_layout(model: ModelConfig, tp: int, pp: int, ep: int, directory: Path) -> None:
    """The basic splits of the layout the checkpoint is padded for (the trainer checks the rest,
    TrainConfig.validate, when it starts)."""
    where = _where(directory)
    for flag, value in (("--tp", tp), ("--pp", pp), ("--ep", ep)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be an int >= 1, got {value!r}")
    splits = (
        ("--tp", tp, "num_attention_heads", model.num_attention_heads),
        ("--tp", tp, "num_key_value_heads", model.num_query_groups),
        ("--pp", pp, "num_hidden_layers", model.num_layers),
    )
    if model.is_moe:
        splits += (("--ep", ep, "num_experts", model.num_experts),)
    elif ep != 1:
        raise ValueError(f"--ep {ep} needs an MoE model; {where} describes a dense one (--ep 1)")
    for flag, value, field, size in splits:
        if size % value:
            raise ValueError(
                f"{flag} {value} does not divide {field}={size} of {where} (sizes that do: "
                f"{_divisors(size)})"
            )


def _expected_shapes(model: ModelConfig, padded_vocab_size: int) -> dict[str, tuple[int, ...]]:
    """HF name -> shape, from the key map's megatron shapes through its transforms (meta)."""
    import torch

    from megatron_ext.export.key_map import plan_keys

    shapes: dict[str, tuple[int, ...]] = {}
    for entry in plan_keys(model, padded_vocab_size):
        outs = entry.transform(torch.empty(entry.shape, device="meta"), model)
        shapes |= {name: tuple(t.shape) for name, t in zip(entry.hf, outs, strict=True)}
    return shapes


def _listing(names: list[str], limit: int = 8) -> str:
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''} ({', '.join(names[:limit])}{more})"


def _check_tensors(
    tensors: dict[str, HfTensor], model: ModelConfig, padded_vocab_size: int, directory: Path
) -> dict[str, HfTensor]:
    """The tensors the key map reads, after checking names and shapes; returns them."""
    expected = _expected_shapes(model, padded_vocab_size)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(
            f"the weights in {str(directory)!r} lack {_listing(missing)} that config.json's "
            "architecture needs; the download is incomplete or config.json is of another model"
        )
    extra = sorted(set(tensors) - set(expected))
    if model.tie_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")  # a copy of the tied embedding that some writers keep
    if extra:
        raise UnsupportedArchitectureError(
            f"the weights in {str(directory)!r} hold {_listing(extra)} that the Qwen3 key map "
            "does not know (megatron_ext's model has no place for them: biases, shared "
            "experts, another architecture?)"
        )
    wrong = [
        f"{name}: {list(tensors[name].shape)}, expected {list(shape)}"
        for name, shape in expected.items()
        if tensors[name].shape != shape
    ]
    if wrong:
        raise ValueError(
            f"tensors in {str(directory)!r} do not have the shapes config.json implies: "
            + "; ".join(wrong[:5])
            + (f"; ... ({len(wrong) - 5} more)" if len(wrong) > 5 else "")
        )
    return {name: tensors[name] for name in expected}


def _check_tokenizer(directory: Path, vocab_size: int) -> tuple[tuple[str, ...], int | None]:
    """The tokenizer files present and the tokenizer's eos id, after checking its size."""
    files = tuple(tokenizer_file_names(directory))
    if not files:
        return (), None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer in {str(directory)!r} has {len(tokenizer)} tokens but "
            f"{_where(directory)} has vocab_size={vocab_size}: ids >= {vocab_size} would have "
            "no embedding row; use the tokenizer the model was trained with, or a config.json "
            f"with vocab_size >= {len(tokenizer)}"
        )
    return files, tokenizer.eos_token_id


def read_hf_model(
    directory: str | os.PathLike[str],
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    expert_parallel: int = 1,
) -> HfModel:
    """Read and check a Hugging Face Qwen3 / Qwen3-MoE directory (see the module docstring).

    Args:
        directory: the model directory (config.json, safetensors weights, tokenizer files).
        tensor_parallel: TP size the vocabulary is padded for (ModelConfig.padded_vocab_size).
        pipeline_parallel: PP size the layers must split into.
        expert_parallel: EP size the experts must split into.

    Raises:
        FileNotFoundError: the directory, config.json or a shard file is missing.
        UnsupportedArchitectureError: an architecture, option or tensor the importer cannot map.
        ValueError: a truncated shard, missing tensors or wrong shapes, a tokenizer larger than
            vocab_size, or a layout that does not divide the model.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"Hugging Face model directory {str(directory)!r} does not exist")
    model_type, config = _read_config(directory)
    model = from_hf_config(config, name=directory.name or "hf", where=_where(directory))
    _check_layout(model, tensor_parallel, pipeline_parallel, expert_parallel, directory)
    tokenizer_files, tokenizer_eos = _check_tokenizer(directory, model.vocab_size)
    padded_vocab_size = model.padded_vocab_size(tensor_parallel)
    tensors = _check_tensors(_read_tensors(directory), model, padded_vocab_size, directory)
    eos = config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return HfModel(
        directory=directory,
        model_type=model_type,
        model=model,
        padded_vocab_size=padded_vocab_size,
        tensors=tensors,
        tokenizer_files=tokenizer_files,
        eod_id=eos if eos is not None else tokenizer_eos,
    )
