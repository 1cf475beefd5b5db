"""megatron_ext.core.shutdown: the entry points' exit leaves the live heap out of the final
garbage collections, and still runs the atexit handlers registered before and after it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_exit_freezes_the_heap_and_runs_every_atexit_handler(tmp_path):
    code = f"""
import atexit, gc, pathlib
out = pathlib.Path({str(tmp_path / "exit.txt")!r})
frozen = gc.get_freeze_count()  # what the interpreter froze at startup
# registered before skip_final_gc: runs after it (atexit is last in, first out)
def after():
    out.write_text(out.read_text() + f"after {{gc.get_freeze_count() > frozen}}\\n")
atexit.register(after)
from megatron_ext.core.shutdown import skip_final_gc
handlers = atexit._ncallbacks()
skip_final_gc()
skip_final_gc()  # idempotent: one handler
print(atexit._ncallbacks() - handlers)
atexit.register(lambda: out.write_text(f"before {{gc.get_freeze_count() > frozen}}\\n"))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["1"]
    assert (tmp_path / "exit.txt").read_text().split("\n") == ["before False", "after True", ""]
