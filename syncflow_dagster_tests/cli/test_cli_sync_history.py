"""A first load through the daemon path: records that changed before the partitions' start reach ScheduleHub.

`syncflow sync ENTITY --history --wait` against a real dagster-webserver +
dagster-daemon (the deployment of test_cli_sync.py), with partitions that
start three days ago and a source whose records changed over the last ten:
one range run per entity ([start .. today], Dagster's range tags), whose
catch-up read takes everything whatever its change time.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from syncflow_dagster.catalog import default_catalog
from syncflow_dagster_tests.cli.test_cli_sync import RUNS_OF_PLAN
from syncflow_dagster_tests.sync_harness import Deployment, deployment
from syncflow_dagster_tests.verify import fetch_snapshot, verify_deployment
from syncflow_dagster_tests.webserver import STAGE_POOL_LIMITS, DagsterDeployment, dagster_deployment

TODAY = dt.datetime.now(dt.UTC).date()
PARTITIONS_START = TODAY - dt.timedelta(days=3)
FAMILY = ["sites", "work_centers"]
SYNC_TIMEOUT_S = 10 * 60.0


@dataclass
class Stack:
    env: Deployment
    dagster: DagsterDeployment


@pytest.fixture(scope="module")
def stack(pg_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from syncflow_dagster_tests.conftest import scratch_database

    with (
        scratch_database(pg_server_url) as state_url,
        deployment(state_url, rows=80, seed=23, history_days=10) as env,
        dagster_deployment(
            server_database_url=pg_server_url,
            dagster_home=tmp_path_factory.mktemp("dagster_home_cli_history"),
            code_location_env={
                **env.environment(),
                "SYNCFLOW_PARTITIONS_START": PARTITIONS_START.isoformat(),
            },
            with_daemon=True,
            pool_limits=STAGE_POOL_LIMITS,
        ) as dagster,
    ):
        yield Stack(env, dagster)


def _changed_days(env: Deployment, entity: str) -> list[dt.date]:
    spec = default_catalog().entity(entity)
    snapshot = fetch_snapshot(env.apismith_url, spec.source)
    return [dt.date.fromisoformat(str(v)[:10]) for v in snapshot[spec.changed_at].to_pylist()]


@pytest.mark.subprocess
@pytest.mark.timeout(1200)
def test_history_load_brings_records_changed_before_the_partitions_start(stack: Stack) -> None:
    before_start = {
        name: sum(d < PARTITIONS_START for d in _changed_days(stack.env, name)) for name in FAMILY
    }
    assert all(before_start.values()), before_start

    environ = {k: v for k, v in os.environ.items() if not k.startswith("SYNCFLOW_")}
    environ.update(
        {
            "COLUMNS": "120",
            "SYNCFLOW_DAGSTER_URL": stack.dagster.url,
            "SYNCFLOW_PARTITIONS_START": PARTITIONS_START.isoformat(),
        }
    )
    result = subprocess.run(
        [sys.executable, "-m", "syncflow_dagster.cli.main", "sync", *FAMILY, "--history", "--wait"],
        capture_output=True,
        text=True,
        env=environ,
        timeout=SYNC_TIMEOUT_S,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output + f"\n(logs: {stack.dagster.logs})"

    # One range run per entity over [partitions start .. today].
    plan = next(
        line.split()[1].rstrip(":") for line in result.stdout.splitlines() if line.startswith("plan ")
    )
    runs = stack.dagster.graphql(RUNS_OF_PLAN, {"value": plan})["runsOrError"]["results"]
    tags = [{t["key"]: t["value"] for t in run["tags"]} for run in runs]
    assert sorted(t["syncflow/entity"] for t in tags if "dagster/parent_run_id" not in t) == sorted(FAMILY)
    for run_tags in tags:
        assert run_tags["dagster/asset_partition_range_start"].startswith(PARTITIONS_START.isoformat())
        assert run_tags["dagster/asset_partition_range_end"].startswith(TODAY.isoformat())

    verification = verify_deployment(stack.env, FAMILY)
    assert verification.equal, verification.describe()
    # Nothing lost: the records older than the partitions' start are in ScheduleHub with the others.
    assert all(v.matched > 0 and not v.lost for v in verification.verdicts.values()), verification.describe()
