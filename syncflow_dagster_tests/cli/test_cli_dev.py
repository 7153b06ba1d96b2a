"""`syncflow dev` brings up the stand-ins, Postgres and Dagster (webserver + daemon), and Ctrl-C stops all of it."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from syncflow_dagster_tests.defs.test_definitions import STAGES as STAGE_NAMES

ROOT = Path(__file__).resolve().parents[2]
STAGES = set(STAGE_NAMES)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


@pytest.mark.slow
def test_syncflow_dev_serves_the_ui_with_automation_on_and_stops_cleanly(
    tmp_path: Path, pg_server_url: str
) -> None:
    from syncflow_dagster_tests.conftest import scratch_database

    port, apismith_port, schedulehub_port = _free_port(), _free_port(), _free_port()
    with scratch_database(pg_server_url) as state_url, scratch_database(pg_server_url) as dagster_url:
        env = {**os.environ, "SYNCFLOW_DATABASE_URL": state_url, "DAGSTER_POSTGRES_URL": dagster_url}
        syncflow = Path(sys.executable).with_name("syncflow")
        proc = subprocess.Popen(
            [
                str(syncflow),
                "dev",
                "--home",
                str(tmp_path / "dev"),
                "--port",
                str(port),
                "--apismith-port",
                str(apismith_port),
                "--schedulehub-port",
                str(schedulehub_port),
                "--rows",
                "50",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 240
            query = (
                "{ assetNodes { assetKey { path } } repositoriesOrError { ... on RepositoryConnection"
                " { nodes { sensors { name sensorState { status } } } } } }"
            )
            data = None
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    response = httpx.post(
                        f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=10
                    )
                    if response.status_code == 200 and response.json().get("data", {}).get("assetNodes"):
                        data = response.json()["data"]
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(2)
            if data is None:
                output = (
                    proc.stdout.read().decode(errors="replace")
                    if proc.poll() is not None and proc.stdout
                    else ""
                )
                pytest.fail(
                    f"the Dagster UI did not come up within 240 s (exit {proc.poll()}): {output[-2000:]}"
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
            assert httpx.get(f"http://127.0.0.1:{apismith_port}/health", timeout=10).status_code == 200
        finally:
            spawned = _descendants(proc.pid)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        time.sleep(2)
        alive = {pid for pid in spawned if Path(f"/proc/{pid}").exists()}
        assert alive == set(), f"processes left running after Ctrl-C: {alive}"
