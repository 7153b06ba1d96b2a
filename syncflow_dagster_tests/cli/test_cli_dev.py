"""`syncflow dev` brings up the stand-ins, Postgres, the API and Dagster (webserver + daemon), says how to
reach them (and writes <home>/env), serves your own --source-dir, and Ctrl-C stops all of it."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from syncflow_dagster_tests import loopback_http
from syncflow_dagster_tests.defs.test_definitions import STAGES as STAGE_NAMES
from syncflow_dagster_tests.isolation import free_port
from syncflow_dagster_tests.waiting import WaitTimeout, wait_until

ROOT = Path(__file__).resolve().parents[2]
STOP_BOUND_S = 180
STAGES = set(STAGE_NAMES)


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        child, parent = (int(x) for x in line.split())
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def _started(pids: set[int]) -> dict[int, float]:
    """Each process's start time, so a pid the kernel hands to a new process later is not it."""
    started: dict[int, float] = {}
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            started[pid] = psutil.Process(pid).create_time()
    return started


def _signal_state(pid: int) -> str:
    """The process's ignored, blocked and caught signal masks (from /proc), for a failure message."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as error:
        return f"unreadable ({error})"
    return " ".join(
        line.replace("\t", "")
        for line in status.splitlines()
        if line.startswith(("SigIgn", "SigBlk", "SigCgt"))
    )


def _described(pids: set[int]) -> list[str]:
    """What each process is (command, parent, session, state), for a failure message."""
    out = []
    for pid in sorted(pids):
        try:
            process = psutil.Process(pid)
            command = " ".join(process.cmdline()[:6])
            out.append(f"{pid} ppid={process.ppid()} sid={os.getsid(pid)} {process.status()}: {command}")
        except (psutil.Error, ProcessLookupError) as error:
            out.append(f"{pid}: {type(error).__name__}")
    return out


def _still_running(started: dict[int, float]) -> set[int]:
    """The processes of `started` that are still those processes and have not exited (zombies count as gone)."""
    alive: set[int] = set()
    for pid, at in started.items():
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(pid)
            if process.create_time() == at and process.status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
    return alive


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.daemon
def test_syncflow_dev_serves_the_ui_with_automation_on_and_stops_cleanly(
    tmp_path: Path, pg_server_url: str
) -> None:
    from syncflow_dagster_tests.conftest import scratch_database

    port, apismith_port, schedulehub_port, api_port = free_port(), free_port(), free_port(), free_port()
    # Your own data: a folder with a file for one entity only (the others are served with no records).
    source_dir = tmp_path / "extract"
    source_dir.mkdir()
    (source_dir / "Sites.csv").write_text(
        "SiteCode,SiteName,Country,TimeZone,Active\nBER,Berlin plant,DE,Europe/Berlin,true\n"
        "LYO,Lyon warehouse,FR,Europe/Paris,true\n"
    )
    home = tmp_path / "dev"
    with scratch_database(pg_server_url) as state_url, scratch_database(pg_server_url) as dagster_url:
        env = {**os.environ, "SYNCFLOW_DATABASE_URL": state_url, "DAGSTER_POSTGRES_URL": dagster_url}
        syncflow = Path(sys.executable).with_name("syncflow")
        # A file, not a pipe nobody reads while it runs: a full pipe would block `syncflow dev`.
        log = tmp_path / "dev.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    # Started with SIGINT ignored, as `syncflow dev &` in a script (a background job
                    # without job control) starts it, and as CI may start the whole suite: Ctrl-C
                    # must stop it all the same. bash execs it, so it is the process signalled.
                    "bash",
                    "-c",
                    'trap "" INT; exec "$0" "$@"',
                    str(syncflow),
                    "dev",
                    "--home",
                    str(home),
                    "--port",
                    str(port),
                    "--apismith-port",
                    str(apismith_port),
                    "--schedulehub-port",
                    str(schedulehub_port),
                    "--api-port",
                    str(api_port),
                    "--source-dir",
                    str(source_dir),
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            query = (
                "{ assetNodes { assetKey { path } } repositoriesOrError { ... on RepositoryConnection"
                " { nodes { sensors { name sensorState { status } } } } } }"
            )

            def ui_data() -> dict[str, Any] | None:
                if proc.poll() is not None:
                    output = log.read_text(errors="replace")
                    pytest.fail(f"syncflow dev exited with {proc.returncode}: {output[-2000:]}")
                try:
                    response = loopback_http.post(
                        f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=10
                    )
                    data = response.json().get("data") if response.status_code == 200 else None
                except (httpx.HTTPError, ValueError):
                    return None
                return data if data and data.get("assetNodes") else None

            data = wait_until(
                ui_data, "the Dagster UI of syncflow dev to list the assets", timeout_s=240, interval_s=1
            )
            assets = {node["assetKey"]["path"][-1] for node in data["assetNodes"]}
            assert assets >= STAGES
            sensors = {
                s["name"]: s["sensorState"]["status"]
                for repository in data["repositoriesOrError"]["nodes"]
                for s in repository["sensors"]
            }
            assert sensors == {
                "apismith_change_sensor": "RUNNING",
                "pending_children_sensor": "RUNNING",
                "batch_failure_sensor": "RUNNING",
                "batch_cancel_sensor": "RUNNING",
            }
            assert (
                loopback_http.get(f"http://127.0.0.1:{apismith_port}/health", timeout=10).status_code == 200
            )
            _dev_tells_how_to_reach_it(log.read_text(errors="replace"), home, state_url, port, api_port)
            _dev_serves_the_source_dir(home)
        finally:
            spawned = _started(_descendants(proc.pid))
            signals = _signal_state(proc.pid)
            interrupted = time.monotonic()
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            killed = False
            try:
                # A bound above syncflow dev's own (30 s for dagster dev's SIGINT, 30 s more after
                # its SIGKILL, the stand-ins' stops): killed sooner, it cannot end what it started.
                proc.wait(STOP_BOUND_S)
            except subprocess.TimeoutExpired:
                killed = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
            stop_seconds = round(time.monotonic() - interrupted, 1)

        def still_running() -> set[int]:
            return _still_running(spawned)

        # Exited children are reaped by init a moment after their parent goes.
        with contextlib.suppress(WaitTimeout):
            wait_until(lambda: not still_running(), "the processes syncflow dev started to go", timeout_s=30)
        left = still_running()
        described = _described(left)
        # Whatever outlived Ctrl-C fails the test, and is ended here rather than left running.
        for pid in left | {child for parent in left for child in _descendants(parent)}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert left == set(), (
            f"processes left running after Ctrl-C: {described}; syncflow dev "
            + (
                f"did not end within {STOP_BOUND_S} s and was killed"
                if killed
                else f"exited {proc.returncode}"
            )
            + f" {stop_seconds} s after SIGINT (its signal masks then: {signals}; this worker's SIGINT "
            + f"handler: {signal.getsignal(signal.SIGINT)}); its output ends: {log.read_text(errors='replace')[-3000:]}"
        )
        assert "stopped in" in log.read_text(errors="replace"), "syncflow dev says when it has stopped"


def _env_file(home: Path) -> dict[str, str]:
    """The variables `source <home>/env` sets, read by a shell."""
    script = f"set -a; source {home / 'env'}; env -0"
    out = subprocess.run(["bash", "-c", script], env={}, capture_output=True, check=True, timeout=30).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def _dev_tells_how_to_reach_it(output: str, home: Path, state_url: str, port: int, api_port: int) -> None:
    env_file = home / "env"
    assert env_file.stat().st_mode & 0o077 == 0, "the env file holds dev secrets: owner only"
    values = _env_file(home)
    ui_url, api_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{api_port}"
    assert values["SYNCFLOW_DATABASE_URL"] == state_url
    assert values["SYNCFLOW_DAGSTER_URL"] == ui_url
    assert values["SYNCFLOW_API_URL"] == api_url
    token = values["SYNCFLOW_API_TOKEN"]
    # Printed on start: the UI, the API and its token, the database, and the file.
    for shown in (ui_url, api_url, token, state_url, str(env_file)):
        assert shown in output, f"{shown!r} not in syncflow dev's output: {output[-2000:]}"
    # The API dev started answers with that token and refuses without it.
    assert (
        loopback_http.get(
            f"{api_url}/stats", headers={"Authorization": f"Bearer {token}"}, timeout=30
        ).status_code
        == 200
    )
    assert loopback_http.get(f"{api_url}/stats", timeout=30).status_code == 401
    # From a shell that knows nothing of dev, `source <home>/env` makes `syncflow status` work.
    bare = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SYNCFLOW_", "APISMITH_", "SCHEDULEHUB_", "DAGSTER_"))
    }
    syncflow = Path(sys.executable).with_name("syncflow")
    without = subprocess.run(
        [str(syncflow), "status"], env=bare, capture_output=True, timeout=120, check=False
    )
    assert without.returncode != 0
    status = subprocess.run(
        ["bash", "-c", f"source {env_file} && {syncflow} status --json"],
        env=bare,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert status.returncode == 0, status.stderr.decode()[-2000:]
    from syncflow_dagster.catalog import default_catalog

    listed = {row["entity"] for row in json.loads(status.stdout)["entities"]}
    assert listed == set(default_catalog().topological_order)


def _dev_serves_the_source_dir(home: Path) -> None:
    values = _env_file(home)
    base = values["APISMITH_BASE_URL"]
    token = loopback_http.post(
        f"{base}/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": values["APISMITH_CLIENT_ID"],
            "client_secret": values["APISMITH_CLIENT_SECRET"],
        },
        timeout=30,
    ).json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    sites = loopback_http.get(f"{base}/v1/entities/Sites/watermark", headers=auth, timeout=30).json()
    items = loopback_http.get(f"{base}/v1/entities/Items/watermark", headers=auth, timeout=30).json()
    assert (sites["row_count"], items["row_count"]) == (2, 0)


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.daemon
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_syncflow_dev_stopped_by_sigterm_or_a_closed_terminal_leaves_nothing_running(
    tmp_path: Path, pg_server_url: str, sig: signal.Signals
) -> None:
    """`dagster dev` runs in a session of its own: a signal that ends dev without its cleanup (the default
    action of SIGTERM and SIGHUP) would leave the webserver, daemon and code server running."""
    from syncflow_dagster_tests.conftest import scratch_database

    port = free_port()
    with scratch_database(pg_server_url) as state_url, scratch_database(pg_server_url) as dagster_url:
        env = {**os.environ, "SYNCFLOW_DATABASE_URL": state_url, "DAGSTER_POSTGRES_URL": dagster_url}
        log = tmp_path / "dev.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("syncflow")),
                    "dev",
                    "--home",
                    str(tmp_path / "dev"),
                    "--port",
                    str(port),
                    "--apismith-port",
                    "0",
                    "--schedulehub-port",
                    "0",
                    "--api-port",
                    "0",
                    "--rows",
                    "20",
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        spawned: set[int] = set()
        try:

            def ui_up() -> bool:
                if proc.poll() is not None:
                    pytest.fail(
                        f"syncflow dev exited {proc.returncode}: {log.read_text(errors='replace')[-2000:]}"
                    )
                try:
                    return (
                        loopback_http.get(f"http://127.0.0.1:{port}/server_info", timeout=5).status_code
                        == 200
                    )
                except httpx.HTTPError:
                    return False

            wait_until(ui_up, "the Dagster UI of syncflow dev", timeout_s=240, interval_s=1)
            spawned = _started(_descendants(proc.pid))
            assert len(spawned) >= 3  # dagster dev, its webserver and daemon (and code servers)
            proc.send_signal(sig)
            proc.wait(STOP_BOUND_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)

        def still_running() -> set[int]:
            return _still_running(spawned)

        with contextlib.suppress(WaitTimeout):
            wait_until(lambda: not still_running(), "the processes syncflow dev started to go", timeout_s=30)
        left = still_running()
        for pid in left | {child for parent in left for child in _descendants(parent)}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert left == set(), f"processes left running after {sig.name}: {left}"
