"""torchrun's elastic agent (torch.distributed.run's command line and launcher) for the tests that
launch whole jobs, without a fresh interpreter per process.

`main(argv)` takes torchrun's command line, `[torchrun flags] SCRIPT [SCRIPT flags]`, where
SCRIPT is a file defining `prepare()` and `rank_main(argv) -> int` (tests/_fault_entry.py). It
runs `prepare()` (the imports every rank needs: torch, megatron-core and the trainer), then
launches `rank_main(SCRIPT flags)` as torchrun's function entry point with the `fork` start
method: the ranks start with those modules loaded instead of importing them again. Everything
else is torchrun's: rendezvous, the ranks' environment (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, ...), SIGTERM forwarded to the ranks, the other ranks stopped when one dies, the exit
status (1 when a rank failed or the agent was signalled). A rank's exit code is the one its
`rank_main` returns. One thing differs from script ranks: a forked rank whose function returned
waits for the agent to collect its result, which an agent that is shutting down (signalled
itself) never does: it stops such a rank at the end of its grace period (SIGKILL after 30 s). A
test of the shutdown on SIGTERM runs script ranks (fork_ranks=False).

`start_job(argv, ...)` runs `main(argv)` as a job of its own: a process forked from
multiprocessing's fork server, which imported SCRIPT's modules once for the whole test session,
in a session of its own (os.killpg reaches the agent, its ranks and their checkpoint writers),
with the given environment, working folder and output file. Each job is still a process of its
own, started from a copy of an interpreter that has only imported modules.

Measured on 2 cores: one two-rank job of the reliability tests (16 steps) took 7.7-8.1 s
(13.0-13.7 s of CPU) as `torchrun` with script ranks and 6.8-7.1 s (9.4-10.1 s of CPU) with
forked ranks; forked from the fork server as well, the four tests of tests/test_reliability.py
that run jobs took 33.4 s instead of 73.0 s in a run of the whole suite.

`python -m tests._torchrun ...` runs `main` as a command line.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import subprocess
import sys

import megatron_ext  # noqa: F401 - first: it silences the expected import-time notices

PRELOAD = ("megatron_ext", "torch.distributed.run", "tests._torchrun")
"""What the fork server imports, before the modules start_job names."""


def main(argv: list[str] | None = None, fork_ranks: bool = True) -> None:
    """torchrun's command line; with fork_ranks=False, exactly torchrun's (each rank a fresh
    `python -u SCRIPT`)."""
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args, run

    from megatron_ext.core.shutdown import skip_final_gc

    skip_final_gc()
    args = parse_args(argv)
    if not fork_ranks:
        run(args)
        return
    if args.master_port is None:
        raise SystemExit("tests._torchrun needs --master-port (a static rendezvous on this host)")
    args.start_method = "fork"
    entry = _load_script(args.training_script)
    entry.prepare()
    config, _, _ = config_from_args(args)
    sys.stdout.flush()  # nothing buffered here may be written again by a forked rank
    sys.stderr.flush()
    elastic_launch(config=config, entrypoint=_exit_with(entry.rank_main))(
        list(args.training_script_args)
    )


def _load_script(path: str):
    spec = importlib.util.spec_from_file_location("_rank_entry", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exit_with(rank_main):
    def run(argv: list[str]) -> None:
        # A rank's console lines reach the job's output as they are printed (as `python -u`).
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr.reconfigure(line_buffering=True)
        code = rank_main(argv)
        if code:
            sys.exit(code)  # the rank's exit status, as a script's would be

    return run


class ForkedJob:
    """A job started by start_job: the subprocess.Popen calls the tests use."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self._process = process
        self.pid = process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status (-N: killed by signal N), None while it runs."""
        return self._process.exitcode

    def poll(self) -> int | None:
        self._process.join(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(f"job {self.pid}", timeout)
        return self.returncode


_context: multiprocessing.context.BaseContext | None = None


def start_job(
    argv: list[str],
    *,
    fork_ranks: bool = True,
    preload: tuple[str, ...],
    env: dict[str, str],
    cwd: str | os.PathLike,
    output: str | os.PathLike,
) -> ForkedJob:
    """Start `main(argv, fork_ranks)` as a job forked from the fork server (see the module's
    docstring), its stdout and stderr appended to `output`. `preload` names the modules SCRIPT's
    ranks import; the fork server imports them when it starts (for the session's first job), so
    every job names the same ones."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload([*PRELOAD, *preload])
    process = _context.Process(
        target=_run_job,
        args=(list(argv), fork_ranks, dict(env), str(cwd), str(output)),
        daemon=False,
    )
    process.start()
    return ForkedJob(process)


def _run_job(argv: list[str], fork_ranks: bool, env: dict[str, str], cwd: str, output: str) -> None:
    os.setsid()
    fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    main(argv, fork_ranks)


if __name__ == "__main__":
    main()
