"""megatron_ext.core.heap: the entry points freeze what the imports made before a run, and what
the run makes afterwards is still collected."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ext.training.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]


def test_the_imports_are_frozen_and_later_cycles_still_collected():
    code = """
import gc, weakref
import megatron_ext.training.trainer
from megatron_ext.core.heap import freeze_imported_objects
tracked = len(gc.get_objects())
frozen = freeze_imported_objects()
print(tracked, frozen, len(gc.get_objects()))
class Node: pass
a, b = Node(), Node()
a.other, b.other = b, a  # a cycle made after the freeze
gone = weakref.ref(a)
del a, b
gc.collect()
print(gone() is None)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    counts, collected = out.stdout.split("\n")[:2]
    tracked, frozen, left = map(int, counts.split())
    assert tracked > 100_000  # torch's and megatron-core's modules
    assert frozen >= tracked and left < 100  # the collector no longer walks them
    assert collected == "True"


@pytest.fixture
def restore_the_heap():
    yield
    gc.unfreeze()  # this process (pytest) goes on


@pytest.mark.parametrize("entry", ["command line", "rank task"])
def test_entry_points_freeze_before_the_run(entry, tmp_path, monkeypatch, restore_the_heap):
    import megatron_ext.training.trainer as trainer
    from megatron_ext.training.cli import main
    from megatron_ext.training.task import pretrain_on_this_rank
    from tests.tiny_run import tiny_run_config

    seen = []
    monkeypatch.setattr(trainer, "pretrain", lambda config: seen.append(gc.get_freeze_count()))
    monkeypatch.setattr("megatron_ext.core.shutdown._registered", True)  # no atexit handler here
    gc.unfreeze()
    prefix = write_synthetic_dataset(tmp_path / "synthetic", vocab_size=256, num_documents=20)
    if entry == "command line":
        assert main(["--model", "tiny", "--data-path", prefix, "--train-steps", "1"]) == 0
    else:
        pretrain_on_this_rank(tiny_run_config(prefix))
    assert len(seen) == 1 and seen[0] > 100_000
