"""Runs a real Dagster deployment of the SyncFlow code location for UI and GraphQL tests.

`dagster_deployment` starts `dagster-webserver` (and, when asked, `dagster-daemon`)
as subprocesses on a free loopback port, with a temporary DAGSTER_HOME whose
dagster.yaml stores runs and events in Postgres (dagster-postgres) and keeps the
repository dagster.yaml's run queue, concurrency limits and run retries, so the
tests exercise the instance configuration operators actually run. The code
location reads the stand-ins' URLs and credentials from the environment given
here. Every wait is bounded; the subprocesses are killed as process groups.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import yaml
from dagster_graphql import DagsterGraphQLClient
from playwright.sync_api import Browser, Playwright, expect

from syncflow_dagster.defs.assets import STAGE_ASSETS as stage_asset_defs
from syncflow_dagster_tests import loopback_http
from syncflow_dagster_tests.isolation import free_port, scratch_database, with_database
from syncflow_dagster_tests.processes import log_tail, stop_process_group, venv_bin
from syncflow_dagster_tests.waiting import WaitTimeout, wait_until

__all__ = ["free_port", "scratch_database", "with_database"]

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKSPACE_YAML = REPO_ROOT / "workspace.yaml"
INSTANCE_YAML = REPO_ROOT / "dagster.yaml"
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"
CODE_LOCATION = "syncflow"

# Loading the code location imports dagster, pandas and pyarrow; on a shared
# 2-core machine that can take a minute, so the bounds are generous.
WEBSERVER_START_TIMEOUT_S = 240.0
DAEMON_START_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 1.0

# Debian's chromium package (scripts/install-chromium.sh); Playwright only drives it.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# The first render compiles the asset graph in a browser on a busy 2-core box.
PAGE_TIMEOUT_MS = 120_000
# Every `expect` waits as long as a page may take: the asset pages render "External
# Asset" with a loading bar until the code location's data arrives, which took more
# than Playwright's default 5 s under CI load (the backfill screenshot failed so).
expect.set_options(timeout=PAGE_TIMEOUT_MS)
# The "join the community" dialog the UI shows on localhost would cover the
# pages; the webserver's own mutation records it as seen.
SET_NUX_SEEN = "mutation { setNuxSeen }"
# The nine stage asset keys, in pipeline order, as the product defines them.
STAGE_ASSETS = tuple(asset.key.to_user_string() for asset in stage_asset_defs)

# The fetch and deliver stages' op pools (defs/assets.py) at dagster.yaml's default limit,
# created up front (set_pool_limits) by every deployment that runs syncs.
STAGE_POOL_LIMITS = {"apismith": 2, "schedulehub": 2}

# Sections of the repository dagster.yaml that describe how runs are queued and
# retried; storage is replaced by the test database, everything else is kept.
_INSTANCE_SECTIONS_KEPT = (
    "run_coordinator",
    "run_launcher",
    "run_monitoring",
    "concurrency",
    "run_retries",
    "telemetry",
)


class DeploymentError(RuntimeError):
    """A Dagster subprocess did not come up; the message carries the tail of its log."""


@dataclass
class DagsterDeployment:
    """A running webserver (and optional daemon) on loopback."""

    host: str
    port: int
    dagster_home: Path
    instance_database_url: str
    logs: dict[str, Path]
    # The webserver and daemon by name ("webserver", "daemon"), as they are started.
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def graphql_client(self, timeout_s: int = 120) -> DagsterGraphQLClient:
        return DagsterGraphQLClient(self.host, port_number=self.port, timeout=timeout_s)

    def graphql(
        self, query: str, variables: Mapping[str, Any] | None = None, timeout_s: float = 120.0
    ) -> Any:
        """POST a GraphQL document; raises on transport or GraphQL errors, returns `data`.

        Raises DeploymentError first if the webserver or daemon has exited, so a test waiting
        on a run or a backfill fails at once with that process's log rather than at its timeout.
        """
        self.assert_running()
        response = loopback_http.post(
            f"{self.url}/graphql",
            json={"query": query, "variables": dict(variables or {})},
            timeout=timeout_s,
        )
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise DeploymentError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def assert_running(self) -> None:
        """Raise DeploymentError naming any of the deployment's processes that has exited, with its log's tail."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise DeploymentError(
                    f"dagster-{name} exited with code {process.returncode} while the deployment was in use:\n"
                    + log_tail(self.logs[name])
                )


def dagster_postgres_url(url: str) -> str:
    """The instance database URL with the psycopg2 driver named explicitly.

    SQLAlchemy 2.1 maps a bare postgresql:// onto psycopg 3, and dagster-postgres's
    webserver hook (set_pg_statement_timeout) opens `with conn:` on the raw DBAPI
    connection: a transaction in psycopg2, but a *close* in psycopg 3, after which
    every webserver query fails with "the connection is closed".
    """
    parts = urlsplit(url)
    return urlunsplit(("postgresql+psycopg2", parts.netloc, parts.path, parts.query, parts.fragment))


def launch_chromium(playwright: Playwright) -> Browser:
    """Debian's chromium through `executable_path`: never a browser Playwright downloaded."""
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS), headless=True, timeout=PAGE_TIMEOUT_MS
    )


def write_instance_yaml(dagster_home: Path, *, source: Path = INSTANCE_YAML) -> dict[str, Any]:
    """Write DAGSTER_HOME/dagster.yaml: Postgres storage (from DAGSTER_POSTGRES_URL) plus the repo's run queue.

    The URL stays in the environment, never in the file, as in production.
    """
    repo_config = yaml.safe_load(source.read_text()) or {}
    config: dict[str, Any] = {"storage": {"postgres": {"postgres_url": {"env": "DAGSTER_POSTGRES_URL"}}}}
    for section in _INSTANCE_SECTIONS_KEPT:
        if section in repo_config:
            config[section] = repo_config[section]
    config.setdefault("telemetry", {"enabled": False})
    dagster_home.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return config


def set_pool_limits(env: Mapping[str, str], pools: Mapping[str, int]) -> None:
    """Create the op pools' limits up front, as docs/operations.md tells operators to.

    Left to the default_limit, Dagster inserts a pool's row when two runs first
    claim it at once; under dagster-postgres the loser's INSERT hits the unique
    key and the run fails (InFailedSqlTransaction), a race the tests saw.
    """
    for pool, limit in pools.items():
        subprocess.run(
            [venv_bin("dagster"), "instance", "concurrency", "set", pool, str(limit)],
            cwd=REPO_ROOT,
            env=dict(env),
            check=True,
            capture_output=True,
            timeout=WEBSERVER_START_TIMEOUT_S,
        )


def _wait_for(ready: Any, process: subprocess.Popen[bytes], log: Path, what: str, timeout_s: float) -> None:
    """Wait until `ready()`; fail at once, with the log's tail, if the process exits first."""

    def probe() -> bool:
        if process.poll() is not None:
            raise DeploymentError(f"{what} exited with code {process.returncode}:\n{log_tail(log)}")
        return bool(ready())

    try:
        wait_until(probe, f"{what} to be ready", timeout_s=timeout_s, interval_s=POLL_INTERVAL_S)
    except WaitTimeout:
        raise DeploymentError(f"{what} not ready after {timeout_s:.0f}s:\n{log_tail(log)}") from None


def _server_answers(url: str) -> bool:
    try:
        return loopback_http.get(f"{url}/server_info", timeout=5.0).status_code == 200
    except httpx.HTTPError:
        return False


_DAEMON_HEALTH = """
query DaemonHealth {
  instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } }
}
"""


def _daemons_healthy(deployment: DagsterDeployment) -> bool:
    """True once every required daemon (run queue, backfills, sensors, ...) has sent a healthy heartbeat."""
    try:
        data = deployment.graphql(_DAEMON_HEALTH, timeout_s=10.0)
    except (httpx.HTTPError, DeploymentError):
        return False
    statuses = data["instance"]["daemonHealth"]["allDaemonStatuses"]
    required = [s for s in statuses if s["required"]]
    return bool(required) and all(s["healthy"] for s in required)


def deployment_environment(
    dagster_home: Path, instance_database_url: str, code_location_env: Mapping[str, str]
) -> dict[str, str]:
    """The subprocesses' environment: ours, minus anything that would start automation, plus the code location's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "SYNCFLOW_"))}
    env.update(
        {
            "DAGSTER_HOME": str(dagster_home),
            "DAGSTER_POSTGRES_URL": dagster_postgres_url(instance_database_url),
            # Sensors and schedules stay stopped: a test counts exactly the runs it launched.
            "SYNCFLOW_AUTOMATION": "stopped",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(code_location_env)
    return env


@contextlib.contextmanager
def dagster_deployment(
    *,
    server_database_url: str,
    dagster_home: Path,
    code_location_env: Mapping[str, str] | None = None,
    with_daemon: bool = False,
    pool_limits: Mapping[str, int] | None = None,
    workspace: Path = WORKSPACE_YAML,
    host: str = "127.0.0.1",
) -> Iterator[DagsterDeployment]:
    """Start dagster-webserver (and dagster-daemon) for `workspace`; stop both on exit, whatever happens.

    `server_database_url` is any database on the Postgres server; the instance
    gets a fresh database of its own next to it.
    """
    with scratch_database(server_database_url, "dagster_instance") as instance_url:
        write_instance_yaml(dagster_home)
        env = deployment_environment(dagster_home, instance_url, code_location_env or {})
        set_pool_limits(env, pool_limits or {})
        port = free_port(host)
        logs = {"webserver": dagster_home / "webserver.log", "daemon": dagster_home / "daemon.log"}
        deployment = DagsterDeployment(host, port, dagster_home, instance_url, logs)

        def start(name: str, args: list[str]) -> subprocess.Popen[bytes]:
            with logs[name].open("wb") as log:
                process = subprocess.Popen(
                    args, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            deployment.processes[name] = process
            return process

        try:
            webserver = start(
                "webserver",
                [venv_bin("dagster-webserver"), "-h", host, "-p", str(port), "-w", str(workspace)],
            )
            daemon_args = [venv_bin("dagster-daemon"), "run", "-w", str(workspace)]
            # Both load the code location (a minute on a loaded 2-core box), so they do it at the
            # same time once the instance's tables exist (`set_pool_limits` created them); on an
            # empty instance database the webserver creates them first, alone.
            daemon = start("daemon", daemon_args) if with_daemon and pool_limits else None
            _wait_for(
                lambda: _server_answers(deployment.url),
                webserver,
                logs["webserver"],
                "dagster-webserver",
                WEBSERVER_START_TIMEOUT_S,
            )
            if with_daemon and daemon is None:
                daemon = start("daemon", daemon_args)
            if daemon is not None:
                _wait_for(
                    lambda: _daemons_healthy(deployment),
                    daemon,
                    logs["daemon"],
                    "dagster-daemon",
                    DAEMON_START_TIMEOUT_S,
                )
            yield deployment
        finally:
            # The daemon first, so it launches nothing more while the webserver goes.
            for process in reversed(deployment.processes.values()):
                stop_process_group(process, timeout_s=STOP_TIMEOUT_S)
