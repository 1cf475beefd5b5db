from pathlib import Path

import pytest

import megatron_ext  # noqa: F401 - before megatron-core (see megatron_ext.core.jit)
from tests import reliability_report
from tests.distributed import get_pool, shutdown_pools

ROOT = Path(__file__).resolve().parents[1]

# Files whose `reliability` tests write docs/reliability.md; the report is rewritten only when all
# of them were collected whole and passed.
RELIABILITY_FILES = ("test_reliability.py", "test_data_validation.py", "test_config_errors.py")
_reliability = {"collected": set(), "passed": set(), "deselected": False}


def pytest_sessionstart(session):
    """Compile the loss's CPU kernels once, here, before any worker process starts. numba keeps
    them on disk (cache=True), so the gloo pools and every subprocess then load them; in a fresh
    clone there is no cache yet, and each process that meets a kernel first compiles it itself
    (the serial twins in the one-thread pool workers, the parallel ones in the 2-thread
    subprocesses), several at once. They compile in three processes side by side (see
    tests._warm_kernels; about 27 s on 2 cores from an empty cache)."""
    import subprocess
    import sys

    from tests._warm_kernels import MODES

    procs = {
        mode: subprocess.Popen(
            [sys.executable, "-m", "tests._warm_kernels", mode],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for mode in MODES
    }
    for mode, proc in procs.items():
        output, _ = proc.communicate()
        if proc.returncode:  # the tests that need the kernels compile them, and fail if broken
            print(f"\ncompiling the {mode} CPU kernels failed:\n{output[-3000:]}")


@pytest.fixture(scope="session")
def pool2():
    """Two gloo ranks, shared by every test of the session."""
    return get_pool(2)


@pytest.fixture(scope="session")
def pool4():
    """Four gloo ranks, shared by every test of the session."""
    return get_pool(4)


def pytest_collection_modifyitems(config, items):
    """The `slow` tests that do not use the gloo pools run last, in their files' order: the pools
    are stopped before each of them (see pytest_runtest_setup), so the pools start once instead
    of again after each such test met between pool tests (6 processes, ~4 s of CPU each)."""
    items[:] = sorted(items, key=lambda item: _stops_the_pools(item))  # stable
    names = {item.path.name for item in items}
    if not set(RELIABILITY_FILES) <= names:
        _reliability["deselected"] = True


def pytest_deselected(items):
    if any(item.get_closest_marker("reliability") for item in items):
        _reliability["deselected"] = True


def pytest_collection_finish(session):
    _reliability["collected"] = {
        item.nodeid for item in session.items if item.get_closest_marker("reliability")
    }


_POOL_FIXTURES = {"pool2", "pool4"}


def _stops_the_pools(item) -> bool:
    uses_pool = _POOL_FIXTURES & set(getattr(item, "fixturenames", ()))
    return item.get_closest_marker("slow") is not None and not uses_pool


def pytest_runtest_setup(item):
    """Stop the shared gloo ranks before a `slow` test (multi-process runs) that does not use
    them; they start again, lazily, for the next test that does (about 8 s). Idle, they are not
    free: each holds a few hundred gloo threads and took 15-21% of a core, which the multi-process
    tests of a 2-core machine need."""
    if _stops_the_pools(item):
        shutdown_pools()


def pytest_runtest_logreport(report):
    if report.nodeid in _reliability["collected"]:
        if report.when == "call" and report.passed:
            _reliability["passed"].add(report.nodeid)
        elif report.failed:
            _reliability["passed"].discard(report.nodeid)
            _reliability["deselected"] = True


def pytest_sessionfinish(session, exitstatus):
    shutdown_pools()
    written = reliability_report.write_if_complete(
        _reliability["collected"], _reliability["passed"], _reliability["deselected"]
    )
    if written:
        print(f"\nreliability report written to {written}")


@pytest.fixture
def world1():
    """A one-rank gloo group in the test process itself, destroyed after the test."""
    import os

    import torch.distributed as dist

    from tests.distributed import free_port

    if dist.is_initialized():
        yield dist.group.WORLD
        return
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
