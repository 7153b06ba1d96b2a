"""`syncflow sync`: its refusals in process, and as a user runs it (a subprocess) against a real
dagster-webserver + dagster-daemon.

The deployment is the one operators run (webserver.py): the repository's
dagster.yaml (queued run coordinator, per-entity and per-plan run limits, run
monitoring, SyncflowRunLauncher), a Postgres instance, the configured executor
(in_process by default), both stand-ins over HTTP and SyncFlow's state in a
Postgres database of its own. The acceptance: `syncflow sync --all --history
--wait` on the demo catalog exits 0 and leaves ScheduleHub equal to the source,
with the plan's runs one after another, parents first.
"""

from __future__ import annotations

import datetime as dt
import itertools
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from syncflow_dagster.catalog import default_catalog
from syncflow_dagster_tests.cli_runner import CliResult, run_launch_command
from syncflow_dagster_tests.processes import syncflow_launch_command
from syncflow_dagster_tests.sync_harness import Deployment, deployment
from syncflow_dagster_tests.verify import verify_deployment
from syncflow_dagster_tests.webserver import STAGE_POOL_LIMITS, DagsterDeployment, dagster_deployment

ORDER = list(default_catalog().topological_order)
TODAY = dt.datetime.now(dt.UTC).date()
# The partitions start today, so the history is one date: a single-partition run per entity.
# (A history of several dates is one range run per entity: test_cli_sync_history.py.)
PARTITIONS_START = TODAY
SYNC_TIMEOUT_S = 20 * 60.0

RUNS_OF_PLAN = """
query RunsOfPlan($value: String!) {
  runsOrError(filter: {tags: [{key: "syncflow/plan", value: $value}]}) {
    ... on Runs { results { runId status startTime endTime tags { key value } } }
  }
}
"""


def syncflow(*args: str, dagster_url: str = "http://127.0.0.1:9") -> CliResult:
    """`syncflow sync ARGS` in process (cli_runner): what the command answers before and without Dagster."""
    return run_launch_command(
        "sync", *args, dagster_url=dagster_url, partitions_start=PARTITIONS_START.isoformat()
    )


def syncflow_process(*args: str, dagster_url: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`syncflow sync ARGS` as a user runs it, a subprocess: the walks through the daemon."""
    return syncflow_launch_command(
        "sync", *args, dagster_url=dagster_url, partitions_start=PARTITIONS_START.isoformat(), timeout=timeout
    )


def test_a_date_outside_the_partitions_is_refused_in_one_line_before_dagster_is_asked() -> None:
    # SYNCFLOW_DAGSTER_URL points nowhere: the refusal comes first.
    for day in (PARTITIONS_START - dt.timedelta(days=1), TODAY + dt.timedelta(days=1)):
        result = syncflow("sites", "--date", day.isoformat())
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        assert result.stderr.strip() == (
            f"error: date {day.isoformat()} is outside the partitions: valid dates are "
            f"{PARTITIONS_START.isoformat()} (SYNCFLOW_PARTITIONS_START) to {TODAY.isoformat()} (today, UTC)"
        )
    both = syncflow("sites", "--date", TODAY.isoformat(), "--history")
    assert both.returncode == 2
    assert "give one of --date, --dates or --history" in both.stderr


def test_dagster_unreachable_exits_3_naming_every_run_not_launched() -> None:
    result = syncflow("sites", "work_centers")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "not launched sites" in result.stdout
    assert "not launched work_centers" in result.stdout
    assert "0 launched, 2 not" in result.stdout


@dataclass
class Stack:
    env: Deployment
    dagster: DagsterDeployment


@pytest.fixture(scope="module")
def stack(pg_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from syncflow_dagster_tests.conftest import scratch_database

    with scratch_database(pg_server_url) as state_url, deployment(state_url, rows=300, seed=17) as env:
        code_location_env = {
            **env.environment(),
            "SYNCFLOW_PARTITIONS_START": PARTITIONS_START.isoformat(),
        }
        with dagster_deployment(
            server_database_url=pg_server_url,
            dagster_home=tmp_path_factory.mktemp("dagster_home_cli_sync"),
            code_location_env=code_location_env,
            with_daemon=True,
            pool_limits=STAGE_POOL_LIMITS,
        ) as dagster:
            try:
                yield Stack(env, dagster)
            finally:
                _keep_logs(dagster, tmp_path_factory.getbasetemp())


def _keep_logs(dagster: DagsterDeployment, where: Path) -> None:
    for name, path in dagster.logs.items():
        if path.exists():
            (where / f"cli-sync-{name}.log").write_bytes(path.read_bytes())


def _tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["tags"]}


def _resync(*args: str, dagster_url: str) -> subprocess.CompletedProcess[str]:
    return syncflow_launch_command(
        "resync",
        *args,
        dagster_url=dagster_url,
        partitions_start=PARTITIONS_START.isoformat(),
        timeout=SYNC_TIMEOUT_S,
    )


# One test, two walks: the resync needs a ScheduleHub the history sync filled (its state says every
# record is synced, so a plain sync would send nothing). As two tests, the resync's ran the whole
# history sync again: the suite's longest test, for nothing the first had not shown.
@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.timeout(1800)
def test_sync_all_history_then_resync_all_refills_a_schedulehub_that_lost_everything(stack: Stack) -> None:
    result = syncflow_process(
        "--all", "--history", "--wait", dagster_url=stack.dagster.url, timeout=SYNC_TIMEOUT_S
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output + f"\n(logs: {stack.dagster.logs})"
    launched = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("launched ")]
    assert launched == ORDER, output
    assert "8 launched, 0 not" in result.stdout
    assert result.stdout.count("SUCCESS") >= len(ORDER)
    assert "final counts per entity" in result.stdout

    verification = verify_deployment(stack.env)
    assert verification.equal, verification.describe()
    assert all(v.matched > 0 for v in verification.verdicts.values()), verification.describe()

    # The plan's runs ran one after another in the order launched: parents first.
    plan = next(
        line.split()[1].rstrip(":") for line in result.stdout.splitlines() if line.startswith("plan ")
    )
    runs = stack.dagster.graphql(RUNS_OF_PLAN, {"value": plan})["runsOrError"]["results"]
    runs = [r for r in runs if "dagster/parent_run_id" not in _tags(r)]
    runs.sort(key=lambda r: r["startTime"])
    assert [_tags(r)["syncflow/entity"] for r in runs] == ORDER
    assert {_tags(r)["syncflow/trigger"] for r in runs} == {"cli"}
    for earlier, later in itertools.pairwise(runs):
        assert later["startTime"] >= earlier["endTime"], (earlier, later)

    # ScheduleHub loses every record; `syncflow resync --all` sends them all again.
    stack.env.admin(stack.env.schedulehub_url, "POST", "/admin/reset")
    assert stack.env.schedulehub_records("sites").num_rows == 0

    resynced = _resync("--all", "--wait", dagster_url=stack.dagster.url)
    output = resynced.stdout + resynced.stderr
    assert resynced.returncode == 0, output + f"\n(logs: {stack.dagster.logs})"
    assert "8 launched, 0 not" in resynced.stdout
    # One plan, parents first, one run at a time: no child reaches ScheduleHub before its parent.
    assert stack.env.resources["database"].failures().count() == 0
    verification = verify_deployment(stack.env)
    assert verification.equal, verification.describe()
    assert all(v.matched > 0 for v in verification.verdicts.values()), verification.describe()
