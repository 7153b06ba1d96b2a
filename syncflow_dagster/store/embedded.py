"""An embedded PostgreSQL for the demo, dev and tests, started from the pgserver wheel.

Used only when no database URL is configured: a machine with nothing but
Python still gets a real Postgres (never SQLite). The server listens on a Unix
socket inside its data directory, so it never takes a TCP port.

`stop_server` and `start_server` stop a running server (pg_ctl's fast or
immediate mode) and start it again on the same data directory, socket and
port, so the URL stays valid: the fault tests restart Postgres under a run.

Run as root, pgserver starts postgres as the unprivileged system user
`pgserver` and creates it with `useradd` when it is missing. Processes that
start embedded servers at once (the test suite's workers on a fresh machine)
would race to create it, and the losers' `useradd` fails ("username already in
use", exit 9); `ensure_system_user` creates it first, one process at a time.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pwd
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PGSERVER_SYSTEM_USER = "pgserver"  # the name pgserver's PostgresServer runs postgres as under root
USERADD_NAME_IN_USE = 9  # useradd's exit status when the login name already exists


@dataclass
class EmbeddedPostgres:
    """A running embedded server; `url` is a libpq URL to its `postgres` database."""

    data_dir: Path
    url: str
    _server: Any

    def stop_server(self, mode: str = "fast", timeout_s: float = 60.0) -> None:
        """`pg_ctl stop -m <mode>` on the data directory; `start_server` brings it back.

        `fast` rolls back open transactions and shuts down cleanly; `immediate`
        kills the server, and the next start runs crash recovery (which empties
        UNLOGGED tables).
        """
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"pg_ctl stop mode must be smart, fast or immediate, not {mode!r}")
        wait = str(max(1, int(timeout_s)))
        pg_ctl(
            ["-w", "-t", wait, "-m", mode, "stop"],
            pgdata=self._server.pgdata,
            user=self._server.system_user,
            timeout=timeout_s + 10,
        )

    def start_server(self) -> None:
        """Start the stopped server again with pgserver's own options: same socket directory and port.

        pgserver's handle is refreshed too, so `stop` still stops (and cleans up
        after) the new server process rather than the old one.
        """
        with type(self._server)._lock:
            self._server.ensure_postgres_running()
        url = self._server.get_uri()
        if url != self.url:
            raise RuntimeError(f"embedded postgres at {self.data_dir} came back at {url}, not {self.url}")

    @property
    def pid(self) -> int | None:
        """The postmaster's process id (changes on every start)."""
        pid: int | None = self._server.get_pid()
        return pid

    def stop(self) -> None:
        try:
            self._server.cleanup()
        except Exception:  # pragma: no cover - best effort on shutdown
            log.warning("embedded postgres at %s did not stop cleanly", self.data_dir, exc_info=True)


def system_user_lock_path() -> Path:
    """The file whose exclusive `flock` serialises `ensure_system_user` across processes."""
    return Path(tempfile.gettempdir()) / "syncflow-system-user.lock"


def ensure_system_user(name: str = PGSERVER_SYSTEM_USER) -> None:
    """Make sure the system user `name` exists (root only; elsewhere there is nothing to do).

    The check and the `useradd` run under an exclusive lock on a file in the
    temporary directory, so processes of this machine take turns; a `useradd`
    that still finds the name taken (a process that did not take the lock) counts
    as done.
    """
    if os.geteuid() != 0:
        return
    with open(system_user_lock_path(), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            pwd.getpwnam(name)
            return
        except KeyError:
            pass
        result = subprocess.run(
            ["useradd", "-s", "/bin/bash", name], capture_output=True, text=True, check=False
        )
        if result.returncode not in (0, USERADD_NAME_IN_USE):
            raise RuntimeError(
                f"could not create the system user {name!r} the embedded Postgres runs as "
                f"(useradd exit {result.returncode}): {result.stderr.strip()}"
            )


def start_embedded_postgres(data_dir: str | Path, *, keep_data: bool = True) -> EmbeddedPostgres:
    """Start (or reuse) an embedded Postgres whose data lives in `data_dir`."""
    import pgserver  # imported lazily: only the embedded path needs it

    ensure_system_user()
    path = Path(data_dir)
    path.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(path, cleanup_mode="stop" if keep_data else "delete")
    return EmbeddedPostgres(data_dir=path, url=server.get_uri(), _server=server)
