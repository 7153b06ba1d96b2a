"""A real SyncFlow deployment in one process for tests: both stand-ins over HTTP and a Postgres database."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from syncflow_dagster.defs.configuration import build_resources, deployment_environment
from syncflow_dagster.simulators import apismith, schedulehub
from syncflow_dagster.simulators.serve import start_server
from syncflow_dagster_tests import loopback_http


@dataclass
class Deployment:
    apismith_url: str
    schedulehub_url: str
    database_url: str
    secret: str
    resources: dict[str, Any]

    def environment(self) -> dict[str, str]:
        """The variables a code-location process needs to reach this deployment (its EnvVars)."""
        return deployment_environment(
            database_url=self.database_url,
            apismith_url=self.apismith_url,
            apismith_secret=self.secret,
            schedulehub_url=self.schedulehub_url,
            schedulehub_secret=self.secret,
        )

    def admin(self, base: str, method: str, path: str, **kwargs: Any) -> Any:
        response = loopback_http.request(method, base + path, timeout=60, **kwargs)
        response.raise_for_status()
        return response.json() if response.content else None

    def apply_changes(self, **shape: Any) -> Any:
        return self.admin(self.apismith_url, "POST", "/admin/changesets", json=shape)

    def schedulehub_records(self, resource: str) -> pa.Table:
        async def read() -> pa.Table:
            async with self.resources["schedulehub"].client() as client:
                return await client.read_all(resource)

        return asyncio.run(read())


def resources_for(deployment_variables: dict[str, str]) -> dict[str, Any]:
    """The code location's resources for these deployment variables; the test's own environment (a
    monkeypatched SYNCFLOW_STORE_RETRY_*, say) sets the tunables, as a user's shell would."""
    return build_resources({**os.environ, **deployment_variables})


@contextmanager
def deployment(
    database_url: str, *, rows: int = 400, seed: int = 7, **apismith_options: Any
) -> Iterator[Deployment]:
    secret = secrets.token_urlsafe(16)
    clients = {"syncflow": secret}
    source = start_server(apismith.create_app(rows=rows, seed=seed, clients=clients, **apismith_options))
    target = start_server(schedulehub.create_app(clients=clients))
    try:
        env = Deployment(source.url, target.url, database_url, secret, {})
        env.resources = resources_for(env.environment())
        yield env
    finally:
        source.stop()
        target.stop()
