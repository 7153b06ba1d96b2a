"""`syncflow resync` launching through Dagster's GraphQL API, run in process (cli_runner).

The webserver is the GraphQL stand-in of the launcher's tests (it records the
tags of each run it is asked to launch); what a resync run then does is shown
end to end in defs/test_repair.py.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest

from syncflow_dagster.simulators.serve import RunningServer, start_server
from syncflow_dagster_tests.cli_runner import CliResult, run_launch_command
from syncflow_dagster_tests.service.test_launch import FakeDagster

TODAY = dt.datetime.now(dt.UTC).date()
START = TODAY - dt.timedelta(days=5)


@pytest.fixture
def fake() -> Iterator[tuple[FakeDagster, RunningServer]]:
    dagster = FakeDagster()
    server = start_server(dagster.app())
    try:
        yield dagster, server
    finally:
        server.stop()


def resync(*args: str, dagster_url: str) -> CliResult:
    return run_launch_command("resync", *args, dagster_url=dagster_url, partitions_start=START.isoformat())


def test_resync_without_dates_covers_the_whole_history_parents_first(
    fake: tuple[FakeDagster, RunningServer],
) -> None:
    dagster, server = fake
    done = resync("work_centers", "sites", dagster_url=server.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [t["syncflow/entity"] for t in dagster.submitted] == ["sites", "work_centers"]
    for tags in dagster.submitted:
        assert tags["syncflow/resync"] == "true"
        assert tags["syncflow/trigger"] == "cli"
        assert tags["dagster/asset_partition_range_start"] == f"{START.isoformat()}|{tags['syncflow/entity']}"
        assert tags["dagster/asset_partition_range_end"] == f"{TODAY.isoformat()}|{tags['syncflow/entity']}"
    assert "launched sites" in done.stdout


def test_resync_of_one_date_and_its_mistakes(fake: tuple[FakeDagster, RunningServer]) -> None:
    dagster, server = fake
    day = (TODAY - dt.timedelta(days=1)).isoformat()
    done = resync("items", "--date", day, dagster_url=server.url)
    assert done.returncode == 0, done.stdout + done.stderr
    (tags,) = dagster.submitted
    assert tags["dagster/partition"] == f"{day}|items"
    assert tags["syncflow/resync"] == "true"
    for args in (("--all", "items"), ("items", "--date", day, "--dates", f"{day}..{day}"), ("nope",)):
        refused = resync(*args, dagster_url=server.url)
        assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
    assert len(dagster.submitted) == 1
