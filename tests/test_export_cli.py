"""tools/export_hf.py's argument errors: one `error:` line, exit status 1, before torch is imported.

Each case runs the tool as a subprocess with `-X importtime`, which lists every module the process
imports on stderr; the remaining stderr lines are the tool's own output. No case needs a real
checkpoint: the checks look at paths and values only (a fake run root is a folder with a `latest`
file). The successful export and the file modes are tested in test_export.py, on real
checkpoints.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ext.export.preflight import (
    check_checkpoint_path,
    check_output_dir,
    read_arch_file,
    tokenizer_files,
)
from tests.test_export import ARCH_FIELDS

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "export_hf.py"
HEAVY = ("torch", "megatron", "transformers", "safetensors", "numpy")
"""Top-level modules that an argument error must not have imported."""


def _run_tool(*args: str) -> tuple[int, list[str], set[str]]:
    """(exit status, stderr lines other than -X importtime's, top-level modules imported)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(TOOL), *args],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.stdout == ""
    lines, imported = [], set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:"):
            imported.add(line.rpartition("|")[2].strip().split(".")[0])
        else:
            lines.append(line)
    return proc.returncode, lines, imported


def _fake_root(path: Path) -> Path:
    """A folder that passes for a training run's checkpoint root (the checks read no tensors)."""
    path.mkdir()
    (path / "latest").write_text("2\n")
    return path


def _assert_one_error(args: list[str], *fragments: str) -> None:
    rc, lines, imported = _run_tool(*args)
    assert rc == 1, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert "megatron_ext" in imported  # the check did run through the package


def test_existing_output_needs_overwrite(tmp_path):
    root = _fake_root(tmp_path / "run")
    out = tmp_path / "hf"
    out.mkdir()
    _assert_one_error(["--checkpoint", str(root), "--out", str(out)], str(out), "--overwrite")


def test_missing_checkpoint(tmp_path):
    missing = tmp_path / "no" / "such" / "run"
    _assert_one_error(
        ["--checkpoint", str(missing), "--out", str(tmp_path / "hf")], str(missing), "not exist"
    )
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("content", ["empty", "files", "step-folder-without-latest"])
def test_folder_that_is_not_a_checkpoint(tmp_path, content):
    folder = tmp_path / "stuff"
    folder.mkdir()
    if content == "files":
        (folder / "notes.txt").write_text("not a checkpoint")
        (folder / "sub").mkdir()
    elif content == "step-folder-without-latest":
        (folder / "iter_0000002").mkdir()
    _assert_one_error(
        ["--checkpoint", str(folder), "--out", str(tmp_path / "hf")],
        str(folder),
        "not a checkpoint",
    )


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [("garbage", "not a dist checkpoint description"), ('{"sharded_backend": "zarr"}', "zarr")],
)
def test_unreadable_checkpoint_description(tmp_path, metadata, fragment):
    folder = tmp_path / "iter_0000002"
    folder.mkdir()
    (folder / "metadata.json").write_text(metadata)
    _assert_one_error(
        ["--checkpoint", str(folder), "--out", str(tmp_path / "hf")], str(folder), fragment
    )


def test_bad_values(tmp_path):
    root = _fake_root(tmp_path / "run")
    base = ["--checkpoint", str(root), "--out", str(tmp_path / "hf")]
    _assert_one_error([*base, "--max-shard-size", "5 parsecs"], "--max-shard-size", "5 parsecs")
    _assert_one_error([*base, "--tokenizer", str(tmp_path / "tok")], str(tmp_path / "tok"))
    _assert_one_error([*base, "--arch", str(tmp_path / "arch.json")], str(tmp_path / "arch.json"))
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(ARCH_FIELDS | {"num_query_groups": 3}))
    _assert_one_error([*base, "--arch", str(arch)], str(arch), "num_query_groups=3")
    arch.write_text(json.dumps(ARCH_FIELDS | {"rope_theta": 1e6}))  # an HF name, not a field
    _assert_one_error([*base, "--arch", str(arch)], str(arch), "unknown ModelConfig field(s)")
    template = tmp_path / "chat.jinja"
    _assert_one_error([*base, "--chat-template", str(template)], "--chat-template", "not exist")
    template.write_text(" \n")
    _assert_one_error([*base, "--chat-template", str(template)], str(template), "is empty")
    template.write_text("{{ messages[0].content }}")
    _assert_one_error([*base, "--chat-template", str(template)], "needs --tokenizer")
    # --overwrite of a folder that holds the checkpoint would delete it
    _assert_one_error(
        ["--checkpoint", str(root), "--out", str(tmp_path), "--overwrite"], "delete the checkpoint"
    )


def test_unexpected_errors_keep_their_traceback(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("export_hf_cli_errors", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(module, "check_args", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        module.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "hf")])


def test_export_package_imports_without_torch():
    from megatron_ext import export

    assert sorted(export.__all__) == sorted(export._MODULES)  # every public name loads lazily
    code = (
        "import sys, megatron_ext.export as e, megatron_ext.export.preflight\n"
        "assert e.to_hf_config.__name__ == 'to_hf_config'\n"
        "assert e.arch_from_megatron_config.__name__ == 'arch_from_megatron_config'\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def _megatron_ext_imports(module: str) -> set[str]:
    """The megatron_ext modules that `module`'s source imports anywhere (module level or inside
    a function), resolved to module names."""
    path = REPO / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            # the longest prefix that is a module or package of megatron_ext
            for end in range(len(parts), 0, -1):
                candidate = REPO / Path(*parts[:end])
                if parts[0] == "megatron_ext" and (
                    candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file()
                ):
                    found.add(".".join(parts[:end]))
                    break
    return found


def test_the_exporter_does_not_import_the_trainer():
    """No module of the export and import reaches megatron_ext.training through any import
    statement, at module level or inside a function, directly or through other megatron_ext
    modules (the checkpoint layout and the model description live below both)."""
    start = [
        f"megatron_ext.export.{p.stem}"
        for p in sorted((REPO / "megatron_ext" / "export").glob("*.py"))
    ]
    assert len(start) >= 10 and "megatron_ext.export.from_training" in start
    seen: dict[str, str | None] = dict.fromkeys(start)
    todo = list(start)
    while todo:
        module = todo.pop()
        for imported in _megatron_ext_imports(module):
            # importing a.b.c runs a/__init__ and a/b/__init__ too
            parts = imported.split(".")
            for end in range(1, len(parts) + 1):
                name = ".".join(parts[:end])
                if name not in seen:
                    seen[name] = module
                    todo.append(name)
    assert "megatron_ext.export.key_map" in seen and "megatron_ext.models.config" in seen
    reached = sorted(m for m in seen if m.startswith("megatron_ext.training"))

    def chain(name: str) -> str:
        path = [name]
        while seen.get(path[-1]) is not None:
            path.append(seen[path[-1]])
        return " <- ".join(path)

    assert not reached, [chain(m) for m in reached]


# ---------------------------------------------------------------------------------------------
# The checks as library functions


def test_check_checkpoint_path_kinds(tmp_path):
    folder = tmp_path / "iter_0000002"
    folder.mkdir()
    (folder / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    with pytest.raises(FileNotFoundError, match=r"no \.metadata file"):
        check_checkpoint_path(folder)
    (folder / ".metadata").write_bytes(b"")
    assert check_checkpoint_path(folder) == "folder"
    with pytest.raises(ValueError, match="step=2 needs the run's root"):
        check_checkpoint_path(folder, step=2)
    assert check_checkpoint_path(tmp_path, step=2) == "root"  # iter_* folders and a step
    with pytest.raises(FileNotFoundError, match="iter_0000002 but no 'latest' file"):
        check_checkpoint_path(tmp_path)
    (tmp_path / "latest").write_text("2")
    assert check_checkpoint_path(tmp_path) == "root"
    with pytest.raises(FileNotFoundError, match="is a file"):
        check_checkpoint_path(tmp_path / "latest")


def test_check_output_dir(tmp_path):
    out = tmp_path / "hf"
    assert check_output_dir(out) == out.absolute()
    out.mkdir()
    with pytest.raises(FileExistsError, match=r"pass overwrite=True to replace it"):
        check_output_dir(out)
    assert check_output_dir(out, overwrite=True) == out.absolute()
    with pytest.raises(ValueError, match="delete the checkpoint"):
        check_output_dir(out, overwrite=True, checkpoint=out / "run" / "iter_0000001")
    with pytest.raises(ValueError, match="delete the checkpoint"):
        check_output_dir(out, overwrite=True, checkpoint=out)


def test_read_arch_file_and_tokenizer_files(tmp_path):
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(ARCH_FIELDS))
    model = read_arch_file(arch)
    assert model.to_dict() == ARCH_FIELDS | {
        "name": "custom",
        "init_std": 0.02,
        "num_experts": 0,
        "moe_router_topk": 0,
        "moe_ffn_hidden_size": 0,
        "moe_shared_expert_ffn_hidden_size": 0,
        "moe_aux_loss_coeff": 1e-3,
        "moe_router_pre_softmax": False,
        "moe_dense_layers": [],
    }
    arch.write_text(json.dumps({k: v for k, v in ARCH_FIELDS.items() if k != "head_dim"}))
    with pytest.raises(ValueError, match="head_dim"):
        read_arch_file(arch)
    arch.write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a list"):
        read_arch_file(arch)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        tokenizer_files(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert tokenizer_files(tmp_path) == ["tokenizer.json"]
