"""`syncflow simulate ...`: the stand-ins as a user runs them (real subprocesses on free loopback ports,
terminated at the end: marked `subprocess`), the one-shot commands and refusals in process (cli_runner)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from syncflow_dagster_tests import loopback_http
from syncflow_dagster_tests.cli_runner import CliResult, run_syncflow
from syncflow_dagster_tests.isolation import free_port
from syncflow_dagster_tests.waiting import wait_until

SECRET = "cli-simulate-test-secret"
STARTUP_TIMEOUT_S = 120.0


def syncflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "syncflow_dagster.cli.main", *args]


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("APISMITH_", "SCHEDULEHUB_"))}
    return {**base, **extra}


def in_process(*args: str, **extra: str) -> CliResult:
    """`syncflow ARGS` in this process with `env(**extra)`'s stand-in variables."""
    return run_syncflow(*args, env=extra, drop_prefixes=("APISMITH_", "SCHEDULEHUB_"))


@contextmanager
def running(command: list[str], url: str, health_path: str, environment: dict[str, str]) -> Iterator[None]:
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def answers() -> bool:
        if process.poll() is not None:
            _, err = process.communicate(timeout=10)
            raise AssertionError(f"{command[3:5]} exited {process.returncode}: {err.decode()[-2000:]}")
        try:
            return loopback_http.get(url + health_path, timeout=2.0).status_code in (200, 401)
        except httpx.HTTPError:
            return False

    try:
        wait_until(answers, f"{command[3:5]} to answer on {url}", timeout_s=STARTUP_TIMEOUT_S)
        yield
    finally:
        process.terminate()
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate(timeout=30)


def token(url: str, client_id: str) -> str:
    response = loopback_http.post(
        f"{url}/oauth/token",
        data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": SECRET},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


@pytest.mark.subprocess
def test_simulate_apismith_serves_and_simulate_changes_changes_it() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    environment = env(APISMITH_CLIENT_ID="cli", APISMITH_CLIENT_SECRET=SECRET)
    command = syncflow(
        "simulate", "apismith", "--port", str(port), "--rows", "400", "--seed", "3", "--history-days", "2"
    )
    with running(command, url, "/health", environment):
        headers = {"Authorization": f"Bearer {token(url, 'cli')}"}
        before = loopback_http.get(f"{url}/v1/entities/ProductionOrders/watermark", headers=headers).json()
        assert before["row_count"] == 400
        result = in_process(
            "simulate",
            "changes",
            "--url",
            url,
            "--updated",
            "1",
            "--inserted",
            "0.5",
            "--deleted",
            "0.2",
            APISMITH_CLIENT_ID="cli",
            APISMITH_CLIENT_SECRET=SECRET,
        )
        assert result.returncode == 0, result.stderr
        assert "ProductionOrders" in result.stdout
        after = loopback_http.get(f"{url}/v1/entities/ProductionOrders/watermark", headers=headers).json()
        assert after["max_rowversion"] > before["max_rowversion"]
        assert (
            after["row_count"] == 400 + 2 - 1
        )  # 0.5% inserted, 0.2% deleted (no parent small enough to cascade)
        tombstones = loopback_http.get(
            f"{url}/v1/entities/ProductionOrders/tombstones", headers=headers
        ).json()
        assert len(tombstones["records"]) >= 1


@pytest.mark.subprocess
def test_simulate_schedulehub_serves() -> None:
    pytest.importorskip("syncflow_dagster.simulators.schedulehub")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    environment = env(SCHEDULEHUB_CLIENT_ID="hub-cli", SCHEDULEHUB_CLIENT_SECRET=SECRET)
    with running(syncflow("simulate", "schedulehub", "--port", str(port)), url, "/v1/resources", environment):
        listed = loopback_http.get(
            f"{url}/v1/resources", headers={"Authorization": f"Bearer {token(url, 'hub-cli')}"}
        )
        assert listed.status_code == 200


@pytest.mark.subprocess
def test_simulate_schedulehub_keeps_its_records_in_its_data_dir_across_a_restart(tmp_path: Path) -> None:
    environment = env(SCHEDULEHUB_CLIENT_ID="hub-cli", SCHEDULEHUB_CLIENT_SECRET=SECRET)
    data_dir = tmp_path / "hub"
    records = [{"external_key": f"S{i}", "attributes": {"n": i}} for i in range(25)]
    held: list[dict[str, object]] = []
    for attempt in range(2):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = syncflow("simulate", "schedulehub", "--port", str(port), "--data-dir", str(data_dir))
        with running(command, url, "/v1/resources", environment):
            headers = {"Authorization": f"Bearer {token(url, 'hub-cli')}"}
            if attempt == 0:
                answer = loopback_http.put(
                    f"{url}/v1/resources/sites/records:batch-upsert",
                    json={"records": records},
                    headers=headers,
                )
                assert answer.status_code == 200
                # A second stand-in on the same directory is refused with a reason.
                refused = in_process(
                    "simulate",
                    "schedulehub",
                    "--port",
                    str(free_port()),
                    "--data-dir",
                    str(data_dir),
                    SCHEDULEHUB_CLIENT_ID="hub-cli",
                    SCHEDULEHUB_CLIENT_SECRET=SECRET,
                )
                assert refused.returncode == 2
                assert "in use by another stand-in" in " ".join(refused.stderr.split())
            page = loopback_http.get(
                f"{url}/v1/resources/sites/records", params={"limit": 100}, headers=headers
            ).json()
            held.append(page)
    assert held[1] == held[0]
    assert [r["external_key"] for r in held[1]["records"]] == [f"S{i}" for i in range(25)]


@pytest.mark.subprocess
def test_simulate_history_source_writes_a_folder_apismith_serves(tmp_path: Path) -> None:
    folder = tmp_path / "history"
    written = in_process(
        "simulate", "history-source", "--rows", "3000", "--out", str(folder), "--start", "2025-01-01"
    )
    assert written.returncode == 0, written.stderr
    assert "ProductionOrders" in written.stdout
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    environment = env(APISMITH_CLIENT_ID="cli", APISMITH_CLIENT_SECRET=SECRET)
    command = syncflow("simulate", "apismith", "--port", str(port), "--source-dir", str(folder))
    with running(command, url, "/health", environment):
        headers = {"Authorization": f"Bearer {token(url, 'cli')}"}
        mark = loopback_http.get(f"{url}/v1/entities/ProductionOrders/watermark", headers=headers).json()
        assert mark["row_count"] == 3000
        assert mark["max_changed_at"].startswith("2025-")
    again = in_process("simulate", "history-source", "--rows", "10", "--out", str(folder))
    assert again.returncode == 2
    assert "is not empty" in " ".join(again.stderr.split())


@pytest.mark.subprocess
def test_servers_on_loopback_default_their_secret_and_elsewhere_refuse_without_one() -> None:
    from syncflow_dagster.cli.simulate import DEV_CLIENT_SECRET

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running(
        syncflow("simulate", "apismith", "--port", str(port), "--rows", "10"), url, "/health", env()
    ):
        response = loopback_http.post(
            f"{url}/oauth/token",
            data={
                "grant_type": "client_credentials",
                "client_id": "syncflow",
                "client_secret": DEV_CLIENT_SECRET,
            },
        )
        assert response.status_code == 200, response.text
        wrong = loopback_http.post(
            f"{url}/oauth/token",
            data={"grant_type": "client_credentials", "client_id": "syncflow", "client_secret": SECRET},
        )
        assert wrong.status_code == 401
    result = in_process(
        "simulate", "apismith", "--port", str(free_port()), "--rows", "10", "--host", "0.0.0.0"
    )
    assert result.returncode == 2
    assert "APISMITH_CLIENT_SECRET is not set" in result.stderr
    no_url = in_process("simulate", "changes")
    assert no_url.returncode == 2
    assert "APISMITH_BASE_URL" in no_url.stderr
