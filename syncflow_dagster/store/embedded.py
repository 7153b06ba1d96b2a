"""An embedded PostgreSQL for the demo, dev and tests, started from the pgserver wheel.

Used only when no database URL is configured: a machine with nothing but
Python still gets a real Postgres (never SQLite). The server listens on a Unix
socket inside its data directory, so it never takes a TCP port.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class EmbeddedPostgres:
    """A running embedded server; `url` is a libpq URL to its `postgres` database."""

    data_dir: Path
    url: str
    _server: Any

    def stop(self) -> None:
        try:
            self._server.cleanup()
        except Exception:  # pragma: no cover - best effort on shutdown
            log.warning("embedded postgres at %s did not stop cleanly", self.data_dir, exc_info=True)


def start_embedded_postgres(data_dir: str | Path, *, keep_data: bool = True) -> EmbeddedPostgres:
    """Start (or reuse) an embedded Postgres whose data lives in `data_dir`."""
    import pgserver  # imported lazily: only the embedded path needs it

    path = Path(data_dir)
    path.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(path, cleanup_mode="stop" if keep_data else "delete")
    return EmbeddedPostgres(data_dir=path, url=server.get_uri(), _server=server)
