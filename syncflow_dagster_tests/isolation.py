"""What keeps parallel test workers apart: each one's name, its databases' names and its own TCP ports.

`make test` runs the suite in pytest-xdist workers (gw0, gw1, ...), each a
pytest session of its own. Nothing a worker creates may be seen by another:

- databases: every scratch database is named `<prefix>_<worker>_<random>`
  (conftest.py), so a leftover one says which worker made it;
- ports: a server started as a subprocess (dagster-webserver, `syncflow
  simulate`, `syncflow dev`) is told its port, so the port is chosen before the
  server binds it. `free_port` picks it from a block of ports of this worker's
  own, below the kernel's ephemeral range (where `bind(0)` and every outgoing
  connection take theirs), walking the block so that one process is handed
  the same port again only after the whole block. A port that `bind(0)` found free could otherwise be taken by another
  worker's client connection, or by another worker's `bind(0)`, before the
  subprocess binds it. In-process stand-ins need none of this: `start_server`
  binds port 0 itself.
"""

from __future__ import annotations

import itertools
import os
import queue
import random
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg

# Blocks of PORTS_PER_WORKER ports from FIRST_PORT up; the ephemeral range starts at 32768 by default.
FIRST_PORT = 20_000
PORTS_PER_WORKER = 500
MAX_WORKERS = 24

_lock = threading.Lock()
_cursor: itertools.count[int] | None = None


def worker_id() -> str:
    """This process's xdist worker name (`gw0`, `gw1`, ...), or `main` when the suite runs in one process."""
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def worker_index() -> int:
    """0 for `main` and `gw0`, n for `gwn` (modulo MAX_WORKERS)."""
    match = re.fullmatch(r"gw(\d+)", worker_id())
    return int(match.group(1)) % MAX_WORKERS if match else 0


def worker_port_range() -> range:
    start = FIRST_PORT + worker_index() * PORTS_PER_WORKER
    return range(start, start + PORTS_PER_WORKER)


def _bindable(port: int, host: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port of this worker's block that nothing is bound to now and that this process did not just hand out.

    The walk through the block starts at a random place, so two sessions on one
    machine (two developers' `make test`) rarely try the same ports either.
    """
    global _cursor
    ports = worker_port_range()
    with _lock:
        if _cursor is None:
            _cursor = itertools.count(random.randrange(len(ports)))
        for _ in range(len(ports)):
            port = ports[next(_cursor) % len(ports)]
            if _bindable(port, host):
                return port
    raise RuntimeError(f"no free port left in {ports} for worker {worker_id()}")


def scratch_name(prefix: str) -> str:
    """A database name no other worker or session uses: `<prefix>_<worker>_<12 hex>`."""
    return f"{prefix}_{worker_id()}_{os.urandom(6).hex()}"


def with_database(url: str, dbname: str) -> str:
    """`url` naming database `dbname` on the same server."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{dbname}", parts.query, parts.fragment))


@contextmanager
def scratch_database(server_url: str, prefix: str = "syncflow_test") -> Iterator[str]:
    """A new database on the server of `server_url` (any database there), dropped afterwards, connections and all."""
    name = scratch_name(prefix)
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(server_url, name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class DatabaseDropper:
    """Drops scratch databases on a thread of its own while the worker's next tests run.

    DROP DATABASE makes Postgres checkpoint (flush every dirty buffer of the
    server) before it returns: a second or more on a busy server, for each test
    of its own database. The test gave its database up; nothing waits for the
    drop but the end of the session (`close`), which fails if one failed.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._failed: list[str] = []

    def drop(self, server_url: str, name: str) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="scratch-database-dropper", daemon=True)
            self._thread.start()
        self._queue.put((server_url, name))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            server_url, name = item
            try:
                with psycopg.connect(server_url, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as exc:  # reported by close(), at the end of the session
                self._failed.append(f"{name}: {exc}")

    def close(self) -> None:
        """Wait until every database handed over is dropped."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        assert not self._failed, f"scratch databases not dropped: {self._failed}"


@contextmanager
def scratch_database_dropped_later(server_url: str, dropper: DatabaseDropper) -> Iterator[str]:
    """`scratch_database`, whose drop `dropper` does in the background."""
    name = scratch_name("syncflow_test")
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(server_url, name)
    finally:
        dropper.drop(server_url, name)
