"""`syncflow dev`: a local SyncFlow with the Dagster UI, daemon, sensors and schedules on.

Starts an embedded Postgres when SYNCFLOW_DATABASE_URL is unset (SyncFlow's
state in database `postgres`, Dagster's instance in database `dagster`),
both stand-ins on loopback, and `dagster dev -w workspace.yaml` with
SYNCFLOW_AUTOMATION=running and the code location's variables set. Its data
lives in --home (default .syncflow-dev): the embedded Postgres, DAGSTER_HOME and
ScheduleHub's records (<home>/schedulehub), so a restart on the same --home
keeps SyncFlow's state and ScheduleHub's contents together. Ctrl-C
stops `dagster dev` (its whole process group), the stand-ins and Postgres.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
import signal
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit, urlunsplit

import typer
from rich.console import Console

if TYPE_CHECKING:
    from fastapi import FastAPI

console = Console()
REPO_ROOT = Path(__file__).resolve().parents[2]
STOP_TIMEOUT_S = 30
# The op pools of the fetch and deliver stages (defs/assets.py) and their limit here.
POOLS = ("apismith", "schedulehub")
POOL_LIMIT = 2
# ScheduleHub's records under --home: kept with SyncFlow's state, which says what was delivered.
SCHEDULEHUB_DIR = "schedulehub"
# The instant APISmith's generated data is "as of", written at the first start on a --home:
# the generator spreads dates and times around it, so a restart regenerates the same records.
APISMITH_AS_OF_FILE = "apismith_as_of"


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def _ensure_database(server_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')


def _repo_file(name: str) -> Path:
    for base in (Path.cwd(), REPO_ROOT):
        if (base / name).is_file():
            return base / name
    raise FileNotFoundError(
        f"{name} not found in {Path.cwd()} or {REPO_ROOT}; run from the SyncFlow checkout"
    )


def stand_in_apps(
    home: Path, *, rows: int, seed: int, client_secrets: dict[str, str]
) -> tuple[FastAPI, FastAPI]:
    """The APISmith and ScheduleHub stand-ins of a dev session on `home`.

    APISmith's data is generated from `rows`, `seed` and the instant pinned in
    <home>/apismith_as_of, the same on every start (change sets applied with
    `syncflow simulate changes` are not kept). ScheduleHub keeps its records
    in <home>/schedulehub: a restart on the same --home finds what SyncFlow's
    state (also under --home) says it delivered, so unchanged parents skipped
    by the next sync are still there for their children (an empty stand-in
    made every child fail parent_missing).
    """
    from syncflow_dagster.simulators import apismith, schedulehub

    api_app = apismith.create_app(
        rows=rows, seed=seed, clients={"syncflow": client_secrets["apismith"]}, as_of=_pinned_as_of(home)
    )
    hub_app = schedulehub.create_app(
        clients={"syncflow": client_secrets["schedulehub"]}, data_dir=home / SCHEDULEHUB_DIR
    )
    return api_app, hub_app


def _pinned_as_of(home: Path) -> dt.datetime:
    """The as-of instant of APISmith's generated data on `home`: written at the first start, then read."""
    path = home / APISMITH_AS_OF_FILE
    if path.is_file():
        return dt.datetime.fromisoformat(path.read_text().strip())
    home.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    path.write_text(now.isoformat() + "\n")
    return now


def dev(
    home: Annotated[
        Path,
        typer.Option(help="Where dev data lives (embedded Postgres, DAGSTER_HOME, ScheduleHub's records)."),
    ] = Path(".syncflow-dev"),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Dagster UI port.")] = 3000,
    apismith_port: Annotated[int, typer.Option(min=0, max=65535)] = 8001,
    schedulehub_port: Annotated[int, typer.Option(min=0, max=65535)] = 8002,
    rows: Annotated[
        int, typer.Option(min=10, help="Rows of the largest entity in the APISmith stand-in.")
    ] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the stand-in's dataset.")] = 0,
) -> None:
    """Stand-ins, Postgres if needed, and `dagster dev` (webserver + daemon) with automation on."""
    from syncflow_dagster.simulators.serve import start_server
    from syncflow_dagster.store.database import dagster_postgres_url
    from syncflow_dagster.store.embedded import start_embedded_postgres
    from syncflow_dagster.store.migrate import upgrade

    workspace = _repo_file("workspace.yaml")
    instance_yaml = _repo_file("dagster.yaml")
    home = home.resolve()
    with ExitStack() as stack:
        database_url = os.environ.get("SYNCFLOW_DATABASE_URL")
        dagster_url = os.environ.get("DAGSTER_POSTGRES_URL")
        if not database_url or not dagster_url:
            server = start_embedded_postgres(home / "pgdata", keep_data=True)
            stack.callback(server.stop)
            if not dagster_url:
                _ensure_database(server.url, "dagster")
                dagster_url = _with_database(server.url, "dagster")
            database_url = database_url or server.url
        upgrade(database_url)

        client_secrets = {"apismith": secrets.token_urlsafe(24), "schedulehub": secrets.token_urlsafe(24)}
        api_app, hub_app = stand_in_apps(home, rows=rows, seed=seed, client_secrets=client_secrets)
        api = start_server(api_app, port=apismith_port)
        stack.callback(api.stop)
        hub = start_server(hub_app, port=schedulehub_port)
        stack.callback(hub.stop)

        dagster_home = home / "dagster_home"
        dagster_home.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(instance_yaml, dagster_home / "dagster.yaml")
        env = {
            **os.environ,
            "DAGSTER_HOME": str(dagster_home),
            "DAGSTER_POSTGRES_URL": dagster_postgres_url(dagster_url),
            "SYNCFLOW_DATABASE_URL": database_url,
            "SYNCFLOW_AUTOMATION": "running",
            "APISMITH_BASE_URL": api.url,
            "APISMITH_CLIENT_ID": "syncflow",
            "APISMITH_CLIENT_SECRET": client_secrets["apismith"],
            "SCHEDULEHUB_BASE_URL": hub.url,
            "SCHEDULEHUB_CLIENT_ID": "syncflow",
            "SCHEDULEHUB_CLIENT_SECRET": client_secrets["schedulehub"],
        }
        dagster_bin = Path(sys.executable).with_name("dagster")
        # Pool limits exist before the first run: two runs claiming a new pool at
        # once race on dagster-postgres's concurrency_limits key.
        for pool in POOLS:
            subprocess.run(
                [str(dagster_bin), "instance", "concurrency", "set", pool, str(POOL_LIMIT)],
                env=env,
                check=True,
                capture_output=True,
                timeout=120,
            )
        command = [str(dagster_bin), "dev", "-w", str(workspace), "-h", "127.0.0.1", "-p", str(port)]
        console.print(f"APISmith stand-in   {api.url}   (syncflow simulate changes --url {api.url})")
        console.print(f"ScheduleHub stand-in {hub.url}   (records in {home / SCHEDULEHUB_DIR})")
        console.print(f"Dagster UI          http://127.0.0.1:{port}   (Ctrl-C stops everything)")
        proc = subprocess.Popen(command, cwd=workspace.parent, env=env, start_new_session=True)
        stack.callback(_stop_process_group, proc)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            console.print("stopping ...")
            code = 0
    if code:
        raise typer.Exit(code)


def _stop_process_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT first (dagster dev shuts its webserver and daemon down on it), then SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(STOP_TIMEOUT_S)
    except ProcessLookupError:
        pass
