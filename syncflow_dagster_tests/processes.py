"""Subprocesses the tests start (Dagster webserver and daemon, Celery workers, `syncflow ...`): found, read, stopped.

Each is started with `start_new_session=True`, so it leads a process group of
its own that holds everything it spawns (a daemon's code server and runs, a
worker's pool). `stop_process_group` ends that whole group: SIGTERM, a bounded
wait for it to go, then SIGKILL for whatever is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from syncflow_dagster.cli.process_groups import group_alive, signal_group
from syncflow_dagster_tests.waiting import WaitTimeout, wait_until

STOP_TIMEOUT_S = 30.0


def venv_bin(name: str) -> str:
    """A console script of the venv running the tests (they sit next to its interpreter)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_process_group(
    process: subprocess.Popen[bytes],
    *,
    first: signal.Signals = signal.SIGTERM,
    timeout_s: float = STOP_TIMEOUT_S,
) -> None:
    """Send `first` to the process group `process` leads, wait (bounded) until all of it is gone, then SIGKILL the rest.

    A leader that exited long ago and was reaped may have left its group id to another
    process's group: `process_groups` signals the group only while it is still this one.
    """
    signal_group(process, first)
    with contextlib.suppress(WaitTimeout):
        wait_until(
            lambda: process.poll() is not None and not group_alive(process),
            f"process group {process.pid} to exit",
            timeout_s=timeout_s,
            interval_s=0.1,
        )
    signal_group(process, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout_s)


def syncflow_launch_command(
    command: str, *args: str, dagster_url: str, partitions_start: str, timeout: float
) -> subprocess.CompletedProcess[str]:
    """`syncflow <command> ARGS` (sync, resync) as a user runs it: only the Dagster URL and the
    partitions' start from SyncFlow's settings, 120 columns, output captured, never raising."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SYNCFLOW_")}
    environ.update(
        {"COLUMNS": "120", "SYNCFLOW_DAGSTER_URL": dagster_url, "SYNCFLOW_PARTITIONS_START": partitions_start}
    )
    return subprocess.run(
        [sys.executable, "-m", "syncflow_dagster.cli.main", command, *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=timeout,
        check=False,
    )
