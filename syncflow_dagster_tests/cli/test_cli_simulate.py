"""`syncflow simulate ...` as a user runs it: real subprocesses on free loopback ports, then terminated."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

SECRET = "cli-simulate-test-secret"
STARTUP_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def syncflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "syncflow_dagster.cli.main", *args]


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("APISMITH_", "SCHEDULEHUB_"))}
    return {**base, **extra}


@contextmanager
def running(command: list[str], url: str, health_path: str, environment: dict[str, str]) -> Iterator[None]:
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:  # bounded by the deadline
            if process.poll() is not None:
                _, err = process.communicate(timeout=10)
                raise AssertionError(f"{command[3:5]} exited {process.returncode}: {err.decode()[-2000:]}")
            try:
                if httpx.get(url + health_path, timeout=2.0).status_code in (200, 401):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{command[3:5]} did not answer within {STARTUP_TIMEOUT_S}s")
            time.sleep(0.2)
        yield
    finally:
        process.terminate()
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate(timeout=30)


def token(url: str, client_id: str) -> str:
    response = httpx.post(
        f"{url}/oauth/token",
        data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": SECRET},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def test_simulate_apismith_serves_and_simulate_changes_changes_it() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    environment = env(APISMITH_CLIENT_ID="cli", APISMITH_CLIENT_SECRET=SECRET)
    command = syncflow(
        "simulate", "apismith", "--port", str(port), "--rows", "400", "--seed", "3", "--history-days", "2"
    )
    with running(command, url, "/health", environment):
        headers = {"Authorization": f"Bearer {token(url, 'cli')}"}
        before = httpx.get(f"{url}/v1/entities/ProductionOrders/watermark", headers=headers).json()
        assert before["row_count"] == 400
        result = subprocess.run(
            syncflow(
                "simulate", "changes", "--url", url, "--updated", "1", "--inserted", "0.5", "--deleted", "0.2"
            ),
            env=environment,
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()
        assert "ProductionOrders" in result.stdout.decode()
        after = httpx.get(f"{url}/v1/entities/ProductionOrders/watermark", headers=headers).json()
        assert after["max_rowversion"] > before["max_rowversion"]
        assert (
            after["row_count"] == 400 + 2 - 1
        )  # 0.5% inserted, 0.2% deleted (no parent small enough to cascade)
        tombstones = httpx.get(f"{url}/v1/entities/ProductionOrders/tombstones", headers=headers).json()
        assert len(tombstones["records"]) >= 1


def test_simulate_schedulehub_serves() -> None:
    pytest.importorskip("syncflow_dagster.simulators.schedulehub")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    environment = env(SCHEDULEHUB_CLIENT_ID="hub-cli", SCHEDULEHUB_CLIENT_SECRET=SECRET)
    with running(syncflow("simulate", "schedulehub", "--port", str(port)), url, "/v1/resources", environment):
        listed = httpx.get(
            f"{url}/v1/resources", headers={"Authorization": f"Bearer {token(url, 'hub-cli')}"}
        )
        assert listed.status_code == 200


def test_servers_refuse_to_start_without_their_secret() -> None:
    result = subprocess.run(
        syncflow("simulate", "apismith", "--port", str(free_port()), "--rows", "10"),
        env=env(),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "APISMITH_CLIENT_SECRET is not set" in result.stderr.decode()
    no_url = subprocess.run(
        syncflow("simulate", "changes"), env=env(), capture_output=True, timeout=120, check=False
    )
    assert no_url.returncode == 2
    assert "APISMITH_BASE_URL" in no_url.stderr.decode()
