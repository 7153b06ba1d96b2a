"""A private database per benchmark run, so runs on one server never share state."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa


@contextmanager
def private_database(server_url: str | None, prefix: str = "syncflow_bench") -> Iterator[str]:
    """A fresh database on the server (embedded when no URL), dropped afterwards."""
    if server_url is None:
        from syncflow_dagster.store.embedded import start_embedded_postgres

        with tempfile.TemporaryDirectory(prefix="syncflow-bench-") as tmp:
            server = start_embedded_postgres(Path(tmp) / "pg", keep_data=False)
            try:
                with private_database(server.url, prefix) as url:
                    yield url
            finally:
                server.stop()
        return
    base = sa.make_url(server_url).set(drivername="postgresql+psycopg")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            yield base.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
