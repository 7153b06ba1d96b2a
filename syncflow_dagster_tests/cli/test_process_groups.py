"""A reaped child's pid handed to a stranger: its group and session are left alone (cli/process_groups.py).

The stranger gets the reaped child's pid for real: the kernel hands out the pid
after the one written to /proc/sys/kernel/ns_last_pid (root only; skipped
elsewhere), so the test retries while other processes of the machine take it first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from syncflow_dagster.cli import dev, process_groups
from syncflow_dagster_tests.processes import stop_process_group
from syncflow_dagster_tests.waiting import wait_until

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")
ATTEMPTS = 200
SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]


def _writable() -> bool:
    try:
        NS_LAST_PID.write_text(NS_LAST_PID.read_text())
    except OSError:
        return False
    return True


needs_pid_choice = pytest.mark.skipif(
    not _writable(), reason="choosing the next pid needs root (/proc/sys/kernel/ns_last_pid)"
)


@contextlib.contextmanager
def _stranger_at_the_pid_of_a_reaped_child() -> Iterator[
    tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]
]:
    """(child, stranger): `child` led a session, exited and was reaped; `stranger` has its pid and leads a session."""
    for _ in range(ATTEMPTS):
        child = subprocess.Popen(["true"], start_new_session=True)
        child.wait()
        NS_LAST_PID.write_text(str(child.pid - 1))
        stranger = subprocess.Popen(SLEEP, start_new_session=True)
        if stranger.pid == child.pid:
            try:
                yield child, stranger
            finally:
                stop_process_group(stranger, first=signal.SIGKILL)
            return
        stop_process_group(stranger, first=signal.SIGKILL)
    pytest.fail(f"no stranger got a reaped child's pid in {ATTEMPTS} attempts (other processes took it)")


@needs_pid_choice
def test_a_reaped_leaders_group_id_now_a_strangers_is_not_signalled() -> None:
    with _stranger_at_the_pid_of_a_reaped_child() as (child, stranger):
        # What a bare killpg(child.pid) would reach: the stranger's group.
        assert os.getpgid(stranger.pid) == child.pid
        assert not process_groups.leader_id_is_ours(child)
        assert process_groups.signal_group(child, signal.SIGTERM) is False
        assert not process_groups.group_alive(child)
        stop_process_group(child, timeout_s=2)
        assert stranger.poll() is None, "the stranger was signalled"
        assert process_groups.session_members(child) == set()
        assert process_groups.descendants(child) == set()


@needs_pid_choice
def test_syncflow_dev_stopping_a_dagster_dev_reaped_long_ago_leaves_the_stranger_at_its_pid_alone() -> None:
    """`dagster dev` exited by itself (dev's proc.wait() reaped it) and its pid came round to another
    session leader: stopping neither counts the stranger as dagster dev's nor signals it."""
    with _stranger_at_the_pid_of_a_reaped_child() as (dagster_dev, stranger):
        # Looked up by the bare pid, the stranger is in "dagster dev's session".
        assert os.getsid(stranger.pid) == dagster_dev.pid
        assert dev._started_by(dagster_dev) == set()
        dev.stop_dagster_dev(dagster_dev)
        assert stranger.poll() is None, "the stranger was signalled"


def test_a_reaped_leaders_group_still_held_by_a_member_is_signalled() -> None:
    """The leader exited and was reaped, a member of its group lives on: the group id is still the child's
    (no other process can get that pid), so the member is reached."""
    child = subprocess.Popen(
        ["sh", "-c", "sleep 120 >/dev/null 2>&1 & echo $!"], start_new_session=True, stdout=subprocess.PIPE
    )
    out, _ = child.communicate(timeout=30)
    member = psutil.Process(int(out))
    try:
        assert child.returncode == 0
        assert process_groups.leader_id_is_ours(child)
        assert process_groups.group_alive(child)
        assert member in process_groups.session_members(child)
        stop_process_group(child, timeout_s=10)
        # The member ends; its group is gone once it has been reaped too (a zombie is still in it).
        wait_until(lambda: not process_groups.group_alive(child), "the member's group to go", timeout_s=30)
        assert not member.is_running()
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
