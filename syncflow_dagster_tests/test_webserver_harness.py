"""The deployment harness (webserver.py) fails at once when its daemon or webserver has gone.

Run 5 of the 2026-12-07 series lost its backfill daemon mid-test, and two tests
then waited 15 minutes each for backfills no daemon would finish. Every GraphQL
call of a deployment now checks its processes first.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from syncflow_dagster_tests.webserver import DagsterDeployment, DeploymentError


def test_a_graphql_call_after_the_daemon_exited_names_it_with_its_log(tmp_path: Path) -> None:
    logs = {"webserver": tmp_path / "webserver.log", "daemon": tmp_path / "daemon.log"}
    logs["webserver"].write_text("")
    with logs["daemon"].open("wb") as log:
        daemon = subprocess.Popen(
            ["sh", "-c", "echo 'Received interrupt, shutting down daemon threads...'; exit 0"], stdout=log
        )
    daemon.wait(30)
    # Port 9 (discard) on loopback: nothing is called, the check comes first.
    deployment = DagsterDeployment("127.0.0.1", 9, tmp_path, "postgresql:///unused", logs, {"daemon": daemon})
    with pytest.raises(DeploymentError, match=r"dagster-daemon exited with code 0") as raised:
        deployment.graphql("{ version }")
    assert "Received interrupt" in str(raised.value)


def test_a_running_deployment_passes_the_check(tmp_path: Path) -> None:
    logs = {"daemon": tmp_path / "daemon.log"}
    daemon = subprocess.Popen(["sleep", "60"])
    try:
        DagsterDeployment(
            "127.0.0.1", 9, tmp_path, "postgresql:///unused", logs, {"daemon": daemon}
        ).assert_running()
    finally:
        daemon.kill()
        daemon.wait(30)
