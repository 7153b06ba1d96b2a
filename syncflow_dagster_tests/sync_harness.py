"""A real SyncFlow deployment in one process for tests: both stand-ins over HTTP and a Postgres database."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pyarrow as pa

from syncflow_dagster.defs.resources import ApiSmithResource, ScheduleHubResource, SyncDatabase, SyncTuning
from syncflow_dagster.simulators import apismith, schedulehub
from syncflow_dagster.simulators.serve import start_server
from syncflow_dagster.store.frames.io_manager import PostgresFrameIOManager


@dataclass
class Deployment:
    apismith_url: str
    schedulehub_url: str
    database_url: str
    secret: str
    resources: dict[str, Any]

    def environment(self) -> dict[str, str]:
        """The variables a code-location process needs to reach this deployment (its EnvVars)."""
        return {
            "SYNCFLOW_DATABASE_URL": self.database_url,
            "APISMITH_BASE_URL": self.apismith_url,
            "APISMITH_CLIENT_ID": "syncflow",
            "APISMITH_CLIENT_SECRET": self.secret,
            "SCHEDULEHUB_BASE_URL": self.schedulehub_url,
            "SCHEDULEHUB_CLIENT_ID": "syncflow",
            "SCHEDULEHUB_CLIENT_SECRET": self.secret,
        }

    def admin(self, base: str, method: str, path: str, **kwargs: Any) -> Any:
        response = httpx.request(method, base + path, timeout=60, **kwargs)
        response.raise_for_status()
        return response.json() if response.content else None

    def apply_changes(self, **shape: Any) -> Any:
        return self.admin(self.apismith_url, "POST", "/admin/changesets", json=shape)

    def schedulehub_records(self, resource: str) -> pa.Table:
        async def read() -> pa.Table:
            async with self.resources["schedulehub"].client() as client:
                return await client.read_all(resource)

        return asyncio.run(read())


@contextmanager
def deployment(
    database_url: str, *, rows: int = 400, seed: int = 7, **apismith_options: Any
) -> Iterator[Deployment]:
    secret = secrets.token_urlsafe(16)
    clients = {"syncflow": secret}
    source = start_server(apismith.create_app(rows=rows, seed=seed, clients=clients, **apismith_options))
    target = start_server(schedulehub.create_app(clients=clients))
    try:
        resources: dict[str, Any] = {
            "database": SyncDatabase(url=database_url),
            "apismith": ApiSmithResource(base_url=source.url, client_id="syncflow", client_secret=secret),
            "schedulehub": ScheduleHubResource(
                base_url=target.url, client_id="syncflow", client_secret=secret
            ),
            "tuning": SyncTuning(),
            "frame_io_manager": PostgresFrameIOManager(database_url=database_url),
        }
        yield Deployment(source.url, target.url, database_url, secret, resources)
    finally:
        source.stop()
        target.stop()
