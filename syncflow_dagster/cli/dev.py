"""`syncflow dev`: a local SyncFlow with the Dagster UI, daemon, sensors and schedules on.

Starts an embedded Postgres when SYNCFLOW_DATABASE_URL is unset (SyncFlow's
state in database `postgres`, Dagster's instance in database `dagster`),
both stand-ins on loopback (APISmith serving generated data, or your own
folder with --source-dir), the monitoring API, and `dagster dev -w
workspace.yaml` with SYNCFLOW_AUTOMATION=running and the code location's
variables set. Its data lives in --home (default .syncflow-dev): the embedded
Postgres, DAGSTER_HOME and ScheduleHub's records (<home>/schedulehub), so a
restart on the same --home keeps SyncFlow's state and ScheduleHub's contents
together.

On start it prints where everything is (UI, API and its token, database) and
writes the same as `export` lines to <home>/env, so `source <home>/env` lets
`syncflow status` and the other commands reach it from another shell.

Ctrl-C (or SIGTERM, or SIGHUP) stops `dagster dev` and every process it started (its
webserver, daemon, code servers and run workers, found by session and by
parentage, since some leave the process group), the stand-ins and Postgres.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit, urlunsplit

import psutil
import typer
from rich.console import Console

from syncflow_dagster.cli import process_groups

if TYPE_CHECKING:
    from fastapi import FastAPI

    from syncflow_dagster.catalog import Catalog

console = Console()
REPO_ROOT = Path(__file__).resolve().parents[2]
STOP_TIMEOUT_S = 30
# The op pools of the fetch and deliver stages (defs/assets.py) and their limit here.
POOLS = ("apismith", "schedulehub")
POOL_LIMIT = 2
# ScheduleHub's records under --home: kept with SyncFlow's state, which says what was delivered.
SCHEDULEHUB_DIR = "schedulehub"
# What `source <home>/env` sets: where dev's services are, for the other commands.
ENV_FILE = "env"
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
    home: Path,
    *,
    rows: int,
    seed: int,
    client_secrets: dict[str, str],
    catalog: Catalog | None = None,
    source_dir: Path | None = None,
) -> tuple[FastAPI, FastAPI]:
    """The APISmith and ScheduleHub stand-ins of a dev session on `home`.

    APISmith's data is generated from `rows`, `seed` and the instant pinned in
    <home>/apismith_as_of, the same on every start (change sets applied with
    `syncflow simulate changes` are not kept). ScheduleHub keeps its records
    in <home>/schedulehub: a restart on the same --home finds what SyncFlow's
    state (also under --home) says it delivered, so unchanged parents skipped
    by the next sync are still there for their children (an empty stand-in
    made every child fail parent_missing). With `source_dir` APISmith serves
    that folder instead of generated data.
    """
    from syncflow_dagster.simulators import apismith, schedulehub

    api_app = apismith.create_app(
        catalog=catalog,
        rows=rows,
        seed=seed,
        source_dir=source_dir,
        clients={"syncflow": client_secrets["apismith"]},
        as_of=_pinned_as_of(home),
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
    api_port: Annotated[
        int,
        typer.Option(
            min=0, max=65535, help="Port of SyncFlow's monitoring & sync API (as `syncflow serve`)."
        ),
    ] = 8080,
    rows: Annotated[
        int, typer.Option(min=10, help="Rows of the largest entity in the APISmith stand-in.")
    ] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the stand-in's dataset.")] = 0,
    source_dir: Annotated[
        Path | None,
        typer.Option(
            help="Serve this folder of <source>.csv/.parquet files from the APISmith stand-in "
            "instead of generated data (files for some entities only are fine)."
        ),
    ] = None,
    catalog: Annotated[
        Path | None,
        typer.Option(
            help="Catalog YAML for the code location and the stand-in (default: SYNCFLOW_CATALOG_PATH)."
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="DEBUG logs from Dagster's services (default: INFO).")
    ] = False,
) -> None:
    """Stand-ins, Postgres if needed, the API and `dagster dev` (webserver + daemon) with automation on."""
    from pydantic import SecretStr

    from syncflow_dagster.catalog.loader import CATALOG_PATH_ENV, load_catalog
    from syncflow_dagster.service.app import create_app as create_service
    from syncflow_dagster.service.settings import ServiceSettings
    from syncflow_dagster.simulators.serve import start_server
    from syncflow_dagster.store.database import dagster_postgres_url
    from syncflow_dagster.store.embedded import start_embedded_postgres
    from syncflow_dagster.store.migrate import upgrade

    workspace = _repo_file("workspace.yaml")
    instance_yaml = _repo_file("dagster.yaml")
    home = home.resolve()
    catalog_path = catalog.resolve() if catalog is not None else None
    if catalog_path is None and os.environ.get(CATALOG_PATH_ENV):
        catalog_path = Path(os.environ[CATALOG_PATH_ENV]).resolve()
    # A wrong catalog or source folder is one line now, not a stack trace from a server thread.
    entity_catalog = load_catalog(catalog_path)
    _stop_on_signals()
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
        api_app, hub_app = stand_in_apps(
            home,
            rows=rows,
            seed=seed,
            client_secrets=client_secrets,
            catalog=entity_catalog,
            source_dir=source_dir.resolve() if source_dir is not None else None,
        )
        api = start_server(api_app, port=apismith_port)
        stack.callback(api.stop)
        hub = start_server(hub_app, port=schedulehub_port)
        stack.callback(hub.stop)
        ui_url = f"http://127.0.0.1:{port}"
        api_token = secrets.token_urlsafe(24)
        service_settings = ServiceSettings(
            database_url=SecretStr(database_url),
            api_token=SecretStr(api_token),
            dagster_graphql_url=ui_url,
            apismith_base_url=api.url,
            schedulehub_base_url=hub.url,
        )
        service = start_server(create_service(service_settings, catalog=entity_catalog), port=api_port)
        stack.callback(service.stop)

        dagster_home = home / "dagster_home"
        dagster_home.mkdir(parents=True, exist_ok=True)
        write_instance_yaml(instance_yaml, dagster_home / "dagster.yaml", verbose=verbose)
        reach = {
            "SYNCFLOW_DATABASE_URL": database_url,
            "SYNCFLOW_DAGSTER_URL": ui_url,
            "SYNCFLOW_API_URL": service.url,
            "SYNCFLOW_API_TOKEN": api_token,
            "APISMITH_BASE_URL": api.url,
            "APISMITH_CLIENT_ID": "syncflow",
            "APISMITH_CLIENT_SECRET": client_secrets["apismith"],
            "SCHEDULEHUB_BASE_URL": hub.url,
            "SCHEDULEHUB_CLIENT_ID": "syncflow",
            "SCHEDULEHUB_CLIENT_SECRET": client_secrets["schedulehub"],
            "DAGSTER_HOME": str(dagster_home),
            **({CATALOG_PATH_ENV: str(catalog_path)} if catalog_path is not None else {}),
        }
        env = {
            **os.environ,
            **reach,
            "DAGSTER_POSTGRES_URL": dagster_postgres_url(dagster_url),
            "SYNCFLOW_AUTOMATION": "running",
        }
        env_file = write_env_file(home / ENV_FILE, reach)
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
        level = "debug" if verbose else "info"
        command = [
            str(dagster_bin),
            "dev",
            "-w",
            str(workspace),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "--log-level",
            level,
            "--code-server-log-level",
            level,
        ]
        data = f"folder {source_dir}" if source_dir is not None else f"generated, {rows} rows, seed {seed}"
        console.print(f"Dagster UI           {ui_url}   (Ctrl-C stops everything)", highlight=False)
        console.print(f"SyncFlow API         {service.url}   token {api_token}", highlight=False)
        console.print(f"Database             {database_url}", highlight=False, soft_wrap=True)
        console.print(f"APISmith stand-in    {api.url}   ({data})", highlight=False)
        console.print(
            f"ScheduleHub stand-in {hub.url}   (records in {home / SCHEDULEHUB_DIR})", highlight=False
        )
        console.print(
            f"Other shells: source {env_file}   (then syncflow status, syncflow sync ...)",
            highlight=False,
            soft_wrap=True,
        )
        proc = subprocess.Popen(command, cwd=workspace.parent, env=env, start_new_session=True)
        stack.callback(stop_dagster_dev, proc)
        stopping: float | None = None
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            stopping = time.monotonic()
            console.print("stopping ...")
            code = 0
    if stopping is not None:
        console.print(f"stopped in {time.monotonic() - stopping:.1f} s")
    if code:
        raise typer.Exit(code)


def write_instance_yaml(source: Path, target: Path, *, verbose: bool) -> None:
    """The repo's dagster.yaml with the runs' log level: INFO, or DEBUG with --verbose.

    Without it a run worker prints every Dagster event at DEBUG (about fifty lines a
    run) to dev's terminal. Events are stored in the event log whatever the level;
    only the console and `context.log.debug` lines are left out.
    """
    import yaml

    config = yaml.safe_load(source.read_text("utf-8")) or {}
    config.setdefault("python_logs", {})["python_log_level"] = "DEBUG" if verbose else "INFO"
    target.write_text(
        "# Written by `syncflow dev` from the repo's dagster.yaml, with the runs' log level.\n"
        + yaml.safe_dump(config, sort_keys=False),
        "utf-8",
    )


def write_env_file(path: Path, variables: dict[str, str]) -> Path:
    """`export NAME=value` lines for `source`, readable by the owner only (it holds the dev secrets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# Written by `syncflow dev` at each start: `source` this file to reach it.\n"
    text += "".join(f"export {name}={shlex.quote(value)}\n" for name, value in variables.items())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(path, 0o600)
    return path


def _stop_on_signals() -> None:
    """Ctrl-C (SIGINT), SIGTERM and SIGHUP (the terminal closed) end dev and what it started:
    `dagster dev` runs in a session of its own, which none of them reaches.

    SIGINT is handled even when dev was started with it ignored, as a shell script's `syncflow dev &`
    (or any background job without job control) starts it: an ignored SIGINT is inherited across
    exec, so `kill -INT` would otherwise do nothing, and `dagster dev` would inherit it too.
    """

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)


def _started_by(proc: subprocess.Popen[bytes]) -> set[psutil.Process]:
    """Every live process `dagster dev` started: its session (and group) and its descendants.

    Code servers and run workers are its descendants; a process that left the
    session is still a descendant, and one whose parent is gone is still in the session.
    Once `dagster dev` has been reaped its pid may be another process's, so neither
    is looked up by it then unless it is still held by the session (`process_groups`).
    """
    found = process_groups.descendants(proc) | process_groups.session_members(proc)
    return {p for p in found if p.pid != os.getpid()}


def _alive(processes: set[psutil.Process]) -> set[psutil.Process]:
    """Those of `processes` still running as the same process (not a zombie, pid not handed on)."""
    alive = set()
    for process in processes:
        with suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.add(process)
    return alive


def _signal_all(processes: set[psutil.Process], sig: signal.Signals) -> None:
    """`sig` to each of `processes`; psutil does not signal a pid that has been handed to another process."""
    for process in processes:
        with suppress(psutil.NoSuchProcess):
            process.send_signal(sig)


def stop_dagster_dev(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT to `dagster dev` (it shuts its webserver and daemon down), then whatever is left.

    `dagster dev` stops only the two processes it started itself: code servers
    and run workers may outlive it. So the processes it started are noted first;
    those still alive once it has exited get SIGTERM, then SIGKILL.
    """
    started = _started_by(proc)
    if proc.poll() is None:
        try:
            process_groups.signal_group(proc, signal.SIGINT)
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            console.print(f"dagster dev did not stop within {STOP_TIMEOUT_S} s of SIGINT: killed")
            process_groups.signal_group(proc, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT_S)
    left = _alive(started | _started_by(proc))
    if not left:
        return
    pids = sorted(p.pid for p in left)
    console.print(f"ending {len(left)} process(es) dagster dev left running: {pids}")
    _signal_all(left, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S / 3
    while (left := _alive(left)) and time.monotonic() < deadline:
        time.sleep(0.2)
    _signal_all(left, signal.SIGKILL)
