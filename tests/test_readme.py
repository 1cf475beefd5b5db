"""The README's documented commands, run as written, in the README's order, in a fresh folder
(a few groups of them beside the others: Command.beside).

Every line of the README's ```bash blocks is a command this test knows (COMMANDS): it either runs
it exactly as written (in a folder that has only the repository's .venv, tools/ and run_configs/,
as a fresh clone has after setup) and checks what it must produce, or names the test that runs it
(the quick start's `make test` is this suite; `make demo` and the benchmarks run on small settings
in tests/test_run_configs.py and tests/test_benchmarks.py). A README command that this test does
not know fails it, so that no documented command goes untried.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.tiny_run import standalone_env

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
WARNING = re.compile(r"\b(UserWarning|FutureWarning|DeprecationWarning)\b|^Traceback", re.MULTILINE)


def readme_commands(text: str) -> list[str]:
    """The command lines of the ```bash blocks: continuations joined, comments dropped."""
    commands: list[str] = []
    for block in re.findall(r"^\s*```bash\n(.*?)^\s*```", text, flags=re.MULTILINE | re.DOTALL):
        pending = ""
        for raw in block.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            line = re.sub(r"\s+#\s.*$", "", line)  # a trailing comment
            if line.endswith("\\"):
                pending += line[:-1].strip() + " "
                continue
            commands.append(" ".join((pending + line).split()))
            pending = ""
    return commands


@dataclass(frozen=True)
class Command:
    """What the test does with one README command."""

    expect: tuple[str, ...] = ()
    """Text its output must hold (it is run, and must exit with 0)."""
    covered_by: str | None = None
    """Instead of running it here: the test file that runs it (on small settings)."""
    files: tuple[str, ...] = field(default=())
    """Files it must leave in the folder."""
    beside: str | None = None
    """The name of a group of commands that run beside the README's others (two cores sit a third
    idle while one command runs): one after the other, in the README's order, from where the
    group's first command stands, when every command before it has finished, while the commands
    after it go on. Nothing outside the group may use what its commands make."""


T = ".venv/bin/python -m megatron_ext.training --nproc-per-node 2 --model tiny --shaping precision "
T += "--tp 2 --data-path data/default/train_text_document --train-steps {} --save runs/tiny "
T += "--log-dir runs/tiny/logs"
RC = ".venv/bin/python -m run_configs"

COMMANDS: dict[str, Command] = {
    "make demo": Command(covered_by="tests/test_run_configs.py"),  # main_job at small settings
    "make test": Command(covered_by="tests"),  # this suite
    ".venv/bin/python tools/bench_loss.py": Command(covered_by="tests/test_benchmarks.py"),
    ".venv/bin/python -m megatron_ext.data.default_corpus --out data/default": Command(
        files=("data/default/manifest.json", "data/default/train_text_document.bin")
    ),
    ".venv/bin/python tools/preprocess_data.py --input corpus/*.jsonl --output-prefix "
    "data/mycorpus --tokenizer data/default/tokenizer --workers 2": Command(
        files=("data/mycorpus.bin", "data/mycorpus.idx"), beside="own corpus"
    ),
    T.format(12): Command(
        expect=(
            "model.vocab_size=8192 and data.eod_id=0 from data/default/manifest.json",
            "starting from scratch",
            "finished at step 12 of 12; checkpoint runs/tiny/iter_0000012",
        ),
    ),
    T.format(16): Command(
        expect=(
            "resuming from runs/tiny at step 12",
            "finished at step 16 of 16; checkpoint runs/tiny/iter_0000016",
        )
    ),
    ".venv/bin/python tools/export_hf.py --checkpoint runs/tiny --out hf/tiny --tokenizer "
    "data/default/tokenizer": Command(
        expect=("exported to",), files=("hf/tiny/config.json", "hf/tiny/tokenizer.json")
    ),
    f"{RC} recipes": Command(expect=("loss presets: ce, precision",), beside="launcher only"),
    f"{RC} pretrain --recipe tiny --preset precision --data-dir data/default --nproc 2 tp=2 "
    "steps=10": Command(
        expect=("SUCCEEDED", "outputs: checkpoints"),
        files=("outputs/tiny-precision/checkpoints/iter_0000010",),
        beside="recipe runs",
    ),
    f"{RC} midtrain --recipe tiny --load outputs/tiny-precision/checkpoints --data-dir "
    "data/default --nproc 2 tp=2 steps=4": Command(
        expect=("loss preset 'precision': the one", "SUCCEEDED"),
        files=("outputs/tiny-precision-midtrain/checkpoints/iter_0000004",),
        beside="recipe runs",
    ),
    f"{RC} pretrain --recipe dense_4b --preset precision --executor slurm --data "
    "/data/pretrain_text_document --account ACCOUNT --partition PART --container-image IMAGE "
    "--mount /lustre/data:/data --mount /lustre/results:/results --nodes 16 --job-dir "
    "/lustre/results/nemo_run_jobs --dryrun": Command(
        expect=(
            "#SBATCH --nodes=16",
            "#SBATCH --output=/lustre/results/nemo_run_jobs/",
            "dry run: nothing was launched",
        ),
        beside="launcher only",
    ),
    f"{RC} compare --data-dir data/default --out outputs/compare --presets ce precision "
    "--steps 5": Command(
        expect=("report:",), files=("outputs/compare/report.md",), beside="comparison"
    ),
    ".venv/bin/python tools/import_hf.py --hf hf/tiny --out ckpt/tiny --tp 2": Command(
        expect=("imported to",), files=("ckpt/tiny/latest", "ckpt/tiny/tokenizer/tokenizer.json")
    ),
    f"{RC} midtrain --recipe tiny --init-from ckpt/tiny --preset precision --data-dir "
    "data/default --out runs/tiny-cpt --nproc 2 tp=2 steps=4": Command(
        expect=("(weights only, from step 0)", "SUCCEEDED"),
        files=("runs/tiny-cpt/checkpoints/iter_0000004",),
    ),
    ".venv/bin/python tools/export_hf.py --checkpoint runs/tiny-cpt/checkpoints --out "
    "hf/tiny-cpt --tokenizer ckpt/tiny/tokenizer": Command(
        expect=("exported to",), files=("hf/tiny-cpt/config.json", "hf/tiny-cpt/tokenizer.json")
    ),
}


def test_every_readme_command_is_known():
    """A command added to the README must be added here too (run, or covered elsewhere)."""
    commands = readme_commands(README.read_text())
    unknown = [c for c in commands if c not in COMMANDS]
    assert not unknown, f"README commands this test does not run: {unknown}"
    missing = [c for c in COMMANDS if c not in commands]
    assert not missing, f"commands no longer in the README: {missing}"
    for command, spec in COMMANDS.items():
        if spec.covered_by:
            target = ROOT / spec.covered_by
            assert target.exists(), (command, spec.covered_by)
    # `make demo` is the main job, which tests/test_run_configs.py runs at small settings.
    dry = subprocess.run(
        ["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert ".venv/bin/python -m run_configs.main_job --out outputs/main" in dry.stdout
    assert "run_main_job(" in (ROOT / "tests" / "test_run_configs.py").read_text()
    assert "bench_loss.py" in (ROOT / "tests" / "test_benchmarks.py").read_text()


def _fresh_folder(tmp: Path) -> Path:
    """A folder like a fresh clone after `make setup`: the venv, tools/ and run_configs/, in a git
    repository of its own (the Slurm launcher ships the checkout's committed HEAD)."""
    work = tmp / "clone"
    work.mkdir()
    for name in (".venv", "tools", "run_configs"):
        (work / name).symlink_to(ROOT / name)
    corpus = work / "corpus"
    corpus.mkdir()
    lines = (ROOT / "megatron_ext" / "training" / "config.py").read_text().splitlines()
    with open(corpus / "part1.jsonl", "w") as f:
        f.writelines(
            json.dumps({"text": "\n".join(lines[i : i + 4])}) + "\n"
            for i in range(0, len(lines) - 4, 4)
        )
    git = ["git", "-c", "user.email=readme@test", "-c", "user.name=readme"]
    subprocess.run([*git, "init", "-q"], cwd=work, check=True)
    subprocess.run([*git, "add", "."], cwd=work, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "fresh clone"], cwd=work, check=True)
    return work


def _run_as_written(command: str, work: Path, env: dict[str, str]) -> None:
    """Run one README command in `work` and check what it printed and left."""
    spec = COMMANDS[command]
    out = subprocess.run(
        command,
        shell=True,
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"{command}\n{text[-4000:]}"
    for expected in spec.expect:
        assert expected in text, f"{command}: {expected!r} not in\n{text[-4000:]}"
    for name in spec.files:
        assert (work / name).exists(), f"{command}: {name} missing"
    noise = WARNING.findall(text)
    assert not noise, f"{command} printed warnings or a traceback:\n{text[-4000:]}"


def _run_in_turn(commands: list[str], work: Path, env: dict[str, str]) -> None:
    for command in commands:
        _run_as_written(command, work, env)


@pytest.mark.slow
def test_readme_commands_work_as_written(tmp_path):
    work = _fresh_folder(tmp_path)
    env = standalone_env()
    env["NEMORUN_HOME"] = str(tmp_path / "nemo_run")  # keep the user's ~/.nemo_run out of it
    env.pop("PYTHONPATH", None)
    commands = [c for c in readme_commands(README.read_text()) if not COMMANDS[c].covered_by]
    groups: dict[str, list[str]] = {}
    for command in commands:
        if COMMANDS[command].beside:
            groups.setdefault(COMMANDS[command].beside, []).append(command)
    with ThreadPoolExecutor(max_workers=max(1, len(groups))) as pool:
        running = {}
        for command in commands:
            group = COMMANDS[command].beside
            if group is None:
                _run_as_written(command, work, env)
            elif group not in running:
                running[group] = pool.submit(_run_in_turn, groups[group], work, env)
        for done in running.values():
            done.result()  # a failure in a group fails the test
    # The relaunch resumed: one record per step, 1..16, and `latest` moved forward only.
    steps = [json.loads(x)["step"] for x in (work / "runs/tiny/logs/metrics.jsonl").open()]
    assert steps == list(range(1, 17))
    assert (work / "runs/tiny/latest").read_text().strip() == "16"
    # The export is readable by everyone the umask allows (0644 under the usual 022).
    umask = os.umask(0)
    os.umask(umask)
    for path in (work / "hf/tiny").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    # A second export into the same folder is one error line naming the flag.
    again = subprocess.run(
        shlex.split(
            ".venv/bin/python tools/export_hf.py --checkpoint runs/tiny --out hf/tiny "
            "--tokenizer data/default/tokenizer"
        ),
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 1 and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    _check_comparison(work / "outputs" / "compare", steps=5)
    _check_continued_import(work)


def _check_continued_import(work: Path) -> None:
    """The walk-through from a Hugging Face base: hf/tiny imported, four `precision` steps from
    its weights at step 0, exported with the mid-training sequence length and RoPE base, and
    other weights than the base's."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    records = [json.loads(x) for x in (work / "runs/tiny-cpt/logs/metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(abs(r["loss"] - r["ce_loss"]) > 1e-4 for r in records)  # the shaped loss
    base, cpt = (AutoConfig.from_pretrained(work / d) for d in ("hf/tiny", "hf/tiny-cpt"))
    assert cpt.architectures == ["Qwen3ForCausalLM"] and cpt.max_position_embeddings == 512
    assert (base.rope_parameters["rope_theta"], cpt.rope_parameters["rope_theta"]) == (1e4, 1e6)
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings")
    assert [getattr(cpt, k) for k in fields] == [getattr(base, k) for k in fields]
    before, after = (
        {k: v for f in sorted((work / d).glob("*.safetensors")) for k, v in load_file(f).items()}
        for d in ("hf/tiny", "hf/tiny-cpt")
    )
    assert before.keys() == after.keys()
    assert not before["model.embed_tokens.weight"].equal(after["model.embed_tokens.weight"])


def _check_comparison(out: Path, steps: int) -> None:
    """The README's compare: one report row per preset, a plot, summaries, and runs that differ
    by their loss only (same data and seed: the same first-step CE)."""
    report = (out / "report.md").read_text()
    assert "One seed per preset, so there is no interval over seeds" in report
    table = report.split("## Runs\n", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [r.split("|")[1].strip() for r in rows] == ["`ce`", "`precision`"]
    assert [r.split("|")[2].strip() for r in rows] == ["0", "-0.25"]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summaries = json.loads((out / "report.json").read_text())["runs"]
    assert [s["steps"] for s in summaries] == [steps, steps]
    vocab = 8192  # data/default's
    for s in summaries:
        assert 1.0 < s["val"]["ppl"] < 2 * vocab
        assert 0.0 < s["train"]["entropy"] <= math.log(vocab) + 1e-3
    ce, precision = (
        [json.loads(x) for x in (out / p / "logs/metrics.jsonl").read_text().splitlines()]
        for p in ("ce", "precision")
    )
    assert ce[0]["ce_loss"] == pytest.approx(precision[0]["ce_loss"], rel=1e-5)
    assert ce[0]["loss"] == pytest.approx(ce[0]["ce_loss"], rel=1e-6)
    # At initialisation p(x) ~ 1/8192, where beta = -0.25 moves the loss by ~1e-3 (2.5e-3 here).
    assert abs(precision[0]["loss"] - precision[0]["ce_loss"]) > 1e-4


if __name__ == "__main__":
    print("\n".join(readme_commands(README.read_text())), file=sys.stdout)
