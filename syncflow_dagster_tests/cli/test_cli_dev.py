"""`syncflow dev` brings up the stand-ins, Postgres and Dagster (webserver + daemon), and Ctrl-C stops all of it."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

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


@pytest.mark.slow
@pytest.mark.daemon
def test_syncflow_dev_serves_the_ui_with_automation_on_and_stops_cleanly(
    tmp_path: Path, pg_server_url: str
) -> None:
    from syncflow_dagster_tests.conftest import scratch_database

    port, apismith_port, schedulehub_port = free_port(), free_port(), free_port()
    with scratch_database(pg_server_url) as state_url, scratch_database(pg_server_url) as dagster_url:
        env = {**os.environ, "SYNCFLOW_DATABASE_URL": state_url, "DAGSTER_POSTGRES_URL": dagster_url}
        syncflow = Path(sys.executable).with_name("syncflow")
        # A file, not a pipe nobody reads while it runs: a full pipe would block `syncflow dev`.
        log = tmp_path / "dev.log"
        with log.open("wb") as out:
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
                    response = httpx.post(
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
            assert httpx.get(f"http://127.0.0.1:{apismith_port}/health", timeout=10).status_code == 200
        finally:
            spawned = _descendants(proc.pid)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                # A bound above syncflow dev's own (30 s for dagster dev's SIGINT, 30 s more after
                # its SIGKILL, the stand-ins' stops): killed sooner, it cannot end what it started.
                proc.wait(STOP_BOUND_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)

        def still_running() -> set[int]:
            return {pid for pid in spawned if Path(f"/proc/{pid}").exists()}

        # Exited children are reaped by init a moment after their parent goes.
        with contextlib.suppress(WaitTimeout):
            wait_until(lambda: not still_running(), "the processes syncflow dev started to go", timeout_s=30)
        left = still_running()
        # Whatever outlived Ctrl-C fails the test, and is ended here rather than left running.
        for pid in left | {child for parent in left for child in _descendants(parent)}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert left == set(), f"processes left running after Ctrl-C: {left}"
