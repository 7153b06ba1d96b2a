"""ensure_system_user: processes that start embedded servers at once all get the system user, none fails.

On a fresh machine the suite's workers each start an embedded Postgres at the
same moment; pgserver's own check-then-`useradd` raced there and failed every
test of the losing workers (useradd exit 9, "username already in use"). These
tests create throwaway users and delete them again, so they run only as root
(the only case in which pgserver creates a user at all).
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncflow_dagster.store import embedded
from syncflow_dagster.store.embedded import ensure_system_user, system_user_lock_path
from syncflow_dagster_tests.waiting import wait_until

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None,
    reason="creating system users needs root and useradd",
)

PROCESSES = 6
TIMEOUT_S = 60


def _exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture
def throwaway_user() -> Iterator[str]:
    """A login name no one has; the user is deleted afterwards if a test created it."""
    name = f"sfu{uuid.uuid4().hex[:12]}"
    assert not _exists(name)
    yield name
    if _exists(name):
        subprocess.run(["userdel", name], check=True, capture_output=True, timeout=TIMEOUT_S)


def _blocked_on(path: Path) -> int:
    """How many flock requests wait for the file at `path` (the kernel lists them in /proc/locks with `->`)."""
    inode = f":{path.stat().st_ino} "
    with open("/proc/locks") as locks:
        return sum("->" in line and "FLOCK" in line and inode in line for line in locks)


def test_processes_starting_at_once_take_turns_and_all_get_the_user(throwaway_user: str) -> None:
    script = (
        "from syncflow_dagster.store.embedded import ensure_system_user\n"
        f"ensure_system_user({throwaway_user!r})\n"
        "print('ok')\n"
    )
    lock_path = system_user_lock_path()
    with open(lock_path, "a") as held:
        # While the test holds the lock, every process queues on it: none looks the user up or creates it yet.
        fcntl.flock(held, fcntl.LOCK_EX)
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(PROCESSES)
        ]
        try:
            wait_until(
                lambda: _blocked_on(lock_path) >= PROCESSES,
                f"{PROCESSES} processes queued on {lock_path}",
                timeout_s=TIMEOUT_S,
            )
            assert not _exists(throwaway_user)
            fcntl.flock(held, fcntl.LOCK_UN)
            outcomes = [p.communicate(timeout=TIMEOUT_S) for p in processes]
        finally:
            for p in processes:
                p.kill()
    failures = [
        (p.returncode, err) for p, (_, err) in zip(processes, outcomes, strict=True) if p.returncode != 0
    ]
    assert failures == [], failures
    assert [out.strip() for out, _ in outcomes] == ["ok"] * PROCESSES
    with open("/etc/passwd") as passwd:
        assert sum(line.split(":", 1)[0] == throwaway_user for line in passwd) == 1


def test_a_user_another_process_created_meanwhile_counts_as_done(
    throwaway_user: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    subprocess.run(
        ["useradd", "-s", "/bin/bash", throwaway_user], check=True, capture_output=True, timeout=TIMEOUT_S
    )
    # A process that did not take the lock created it between our look-up and our useradd.
    looked_up: list[str] = []

    def not_there_yet(name: str) -> pwd.struct_passwd:
        looked_up.append(name)
        raise KeyError(name)

    monkeypatch.setattr(embedded.pwd, "getpwnam", not_there_yet)
    ensure_system_user(throwaway_user)  # useradd exits 9; that is success
    assert looked_up == [throwaway_user]
    monkeypatch.undo()
    assert _exists(throwaway_user)


def test_a_name_useradd_refuses_is_a_clear_error() -> None:
    bad = "no spaces allowed"
    with pytest.raises(
        RuntimeError, match=r"could not create the system user 'no spaces allowed'.*useradd exit \d+"
    ):
        ensure_system_user(bad)
    assert not _exists(bad)
