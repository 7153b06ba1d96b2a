"""Daemon-path benchmark: syncs as users run them, through a real dagster-daemon + dagster-webserver.

`python -m benchmarks daemon --rows N --json PATH [--executor in_process|multiprocess|multiprocess_spawn]
[--worker-start forkserver|spawn] [--small-runs 10] [--backfill-rows 2000] [--database-url URL]`

- The stand-ins run in subprocesses (`syncflow simulate apismith|schedulehub`).
- Dagster runs as in production: `dagster-webserver` and `dagster-daemon`
  subprocesses, the repository's dagster.yaml (queued run coordinator, run
  limits, run monitoring, SyncflowRunLauncher), a Postgres instance database,
  and the executor configured by SYNCFLOW_EXECUTOR (default in_process).
  `multiprocess_spawn` loads benchmarks/daemon_locations.py:spawn instead: the
  multiprocess executor at Dagster's defaults, SyncFlow's executor before.
- Runs are launched by the one launcher (service/launch.py) through the
  webserver's GraphQL API, as `POST /sync` and `syncflow sync` launch them.
- Every figure is queued -> success of a run, from the instance's run records,
  split by the run's own events into: waiting in the queue, launching (the
  code server starts the run worker, which imports the code location), the
  worker's set-up, and execution (of which the stages' own work is the part
  the sync_report counts).

Phases: `parents` (the ancestors of work_orders, one plan), `initial`
(work_orders, N rows), `incremental` (after a change set of 1 % updated,
0.5 % inserted, 0.2 % deleted work orders), `small` (one entity-day with 100
changed work orders, `--small-runs` times: the median is the figure), and
`backfill` (a separate deployment whose source changed over 3 days: a Dagster
asset backfill of 3 days x every entity, as the UI launches it; runs counted,
parent-first checked, rows parked at the end counted). ScheduleHub's work
orders must equal the source after each phase.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from benchmarks.databases import private_database
from benchmarks.e2e import CHANGE_SET, CLIENT_ID, ENTITY, E2EBenchSettings, StandIns, ancestors_of
from benchmarks.e2e import check_target_equals_source as check_work_orders
from syncflow_dagster.deploy.warm_workers import START_ENV, WorkerStart, worker_start
from syncflow_dagster.engine import stage_table as st

TARGETS = {
    "small_run_median_seconds": 4.0,
    "initial_seconds": 60.0,
    "incremental_seconds": 8.0,
    "backfill_runs": 8,
}
EXECUTORS = ("in_process", "multiprocess", "multiprocess_spawn")
REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 3600.0
BACKFILL_TIMEOUT_S = 3600.0
POLL_S = 0.25
SMALL_CHANGED_ROWS = 100
BACKFILL_DAYS = 3

LAUNCH_BACKFILL = """
mutation LaunchBackfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}
"""
BACKFILL_STATUS = """
query BackfillStatus($id: String!) {
  partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { status } }
}
"""


@dataclass
class Stack:
    """Stand-ins, SyncFlow's database, a webserver + daemon, and the instance they share."""

    stand_ins: StandIns
    state_url: str
    dagster_url: str
    instance: Any  # dagster.DagsterInstance

    def launch(self, entities: list[str], **request: Any) -> list[tuple[str, str]]:
        """(entity, run id) of every run launched for `entities`, parents first; raises if one was not."""
        from syncflow_dagster.catalog import default_catalog
        from syncflow_dagster.service import launch
        from syncflow_dagster.service.dagster_gateway import DagsterGateway

        gateway = DagsterGateway(self.dagster_url, timeout_s=300)
        outcome = launch.plan_and_launch(
            gateway,
            default_catalog(),
            launch.SyncRequest(entities=entities, trigger="benchmark", **request),
        )
        if outcome.not_launched:
            raise RuntimeError(f"runs not launched: {outcome.not_launched}")
        return [(r.entity, r.run_id) for r in outcome.launched]

    def wait(self, run_id: str) -> Any:
        """The run's record once it ended (following the daemon's automatic retries)."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            record = self.instance.get_run_record_by_id(run_id)
            if record is not None and record.dagster_run.is_finished:
                retry = record.dagster_run.tags.get("dagster/auto_retry_run_id")
                if record.dagster_run.tags.get("dagster/will_retry") == "true" and not retry:
                    time.sleep(POLL_S)
                    continue
                if retry:
                    raise RuntimeError(f"run {run_id} failed and was retried as {retry}: see the daemon log")
                return record
            time.sleep(POLL_S)
        raise RuntimeError(f"run {run_id} still going after {RUN_TIMEOUT_S:.0f}s")


def run_figures(instance: Any, record: Any) -> dict[str, Any]:
    """queued -> end of one run and where its seconds went, from its record and events."""
    import dagster as dg

    run = record.dagster_run
    created = record.create_timestamp.timestamp()
    marks: dict[str, float] = {}
    stage_seconds: dict[str, float] = {}
    for event in instance.all_logs(run.run_id):
        kind = event.dagster_event_type
        if kind in (dg.DagsterEventType.RUN_DEQUEUED, dg.DagsterEventType.RUN_STARTING):
            # The daemon's dequeue reports RUN_STARTING: the run leaves the queue and is being launched.
            marks.setdefault("dequeued", event.timestamp)
        elif kind == dg.DagsterEventType.RUN_START:
            marks.setdefault("started", event.timestamp)
        elif kind == dg.DagsterEventType.ENGINE_EVENT and event.message.startswith("Started process for run"):
            marks.setdefault("worker_up", event.timestamp)
        elif kind == dg.DagsterEventType.ASSET_MATERIALIZATION and event.step_key == st.REPORT.asset:
            materialization = event.asset_materialization
            if materialization is not None and "stage_seconds" in materialization.metadata:
                stage_seconds = dict(materialization.metadata["stage_seconds"].value)
    end = record.end_time or time.time()
    dequeued = marks.get("dequeued", created)
    worker_up = marks.get("worker_up", dequeued)
    started = marks.get("started", worker_up)
    return {
        "run_id": run.run_id,
        # A backfill's runs carry Dagster's partition tags, the launcher's also syncflow/entity.
        "entity": run.tags.get("syncflow/entity") or run.tags.get("dagster/partition/entity"),
        "status": run.status.value,
        "seconds": round(end - created, 3),
        "queued_s": round(dequeued - created, 3),
        "launch_s": round(worker_up - dequeued, 3),
        "worker_setup_s": round(started - worker_up, 3),
        "execute_s": round(end - started, 3),
        "stage_work_s": round(sum(float(v) for v in stage_seconds.values()), 3),
        "stage_seconds": {k: round(float(v), 3) for k, v in stage_seconds.items()},
    }


def _phase(name: str, runs: list[dict[str, Any]], wall: float, **extra: Any) -> dict[str, Any]:
    return {
        "phase": name,
        "runs": runs,
        "wall_seconds": round(wall, 3),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        **extra,
    }


def sync_phase(stack: Stack, name: str, entities: list[str]) -> dict[str, Any]:
    started = time.perf_counter()
    launched = stack.launch(entities)
    records = [stack.wait(run_id) for _, run_id in launched]
    runs = [run_figures(stack.instance, r) for r in records]
    failed = [r for r in runs if r["status"] != "SUCCESS"]
    if failed:
        raise RuntimeError(f"{name}: runs did not succeed: {failed}")
    return _phase(name, runs, time.perf_counter() - started)


def apply_changes(stack: Stack, seed: int, **shape: Any) -> dict[str, Any]:
    response = httpx.post(
        f"{stack.stand_ins.apismith_url}/admin/changesets", json={**shape, "seed": seed}, timeout=600
    )
    response.raise_for_status()
    applied: dict[str, Any] = response.json()["applied"]
    return applied


def parked_rows(state_url: str) -> dict[str, int]:
    """Children parked at the end: all of them, and those whose parent IS delivered (none should be).

    A child whose parent the source holds but SyncFlow refused (a row the
    normaliser rejected: the generated data has some) waits by design until
    the parent is fixed; a child whose parent is in ScheduleHub and still
    waits is one its own backfill should have delivered.
    """
    engine = sa.create_engine(sa.make_url(state_url).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            total = int(conn.execute(sa.text("SELECT count(*) FROM syncflow.pending_children")).scalar_one())
            releasable = int(
                conn.execute(
                    sa.text(
                        "SELECT count(*) FROM syncflow.pending_children p JOIN syncflow.entity_state s"
                        " ON s.entity = p.missing_parent_entity AND s.bk_hash = p.missing_parent_bk_hash"
                    )
                ).scalar_one()
            )
            refused = int(
                conn.execute(
                    sa.text(
                        "SELECT count(*) FROM syncflow.pending_children p WHERE EXISTS (SELECT 1 FROM"
                        " syncflow.failed_records f WHERE f.entity = p.missing_parent_entity"
                        " AND f.bk = p.missing_parent_bk AND f.resolved_at IS NULL)"
                    )
                ).scalar_one()
            )
            return {"total": total, "parent_delivered": releasable, "parent_refused": refused}
    finally:
        engine.dispose()


@contextlib.contextmanager
def daemon_stack(
    rows: int,
    seed: int,
    server_url: str | None,
    executor: str,
    *apismith_args: str,
    schedulehub_args: tuple[str, ...] = (),
    partitions_start: dt.date | None = None,
) -> Iterator[Stack]:
    import dagster as dg

    from syncflow_dagster.store.database import libpq_url
    from syncflow_dagster_tests.webserver import (
        STAGE_POOL_LIMITS,
        WORKSPACE_YAML,
        dagster_deployment,
        dagster_postgres_url,
    )

    with (
        private_database(server_url, "syncflow_bench_daemon") as state_url,
        tempfile.TemporaryDirectory(prefix="syncflow-daemon-bench-") as home,
    ):
        stand_ins = StandIns(rows, seed, state_url, *apismith_args, schedulehub_args=schedulehub_args)
        try:
            stand_ins.wait()
            code_location_env = {
                "SYNCFLOW_DATABASE_URL": state_url,
                "APISMITH_BASE_URL": stand_ins.apismith_url,
                "APISMITH_CLIENT_ID": CLIENT_ID,
                "APISMITH_CLIENT_SECRET": stand_ins.secret,
                "SCHEDULEHUB_BASE_URL": stand_ins.schedulehub_url,
                "SCHEDULEHUB_CLIENT_ID": CLIENT_ID,
                "SCHEDULEHUB_CLIENT_SECRET": stand_ins.secret,
                "SYNCFLOW_PARTITIONS_START": (
                    partitions_start or dt.datetime.now(dt.UTC).date() - dt.timedelta(days=7)
                ).isoformat(),
                "SYNCFLOW_EXECUTOR": "multiprocess" if executor == "multiprocess" else "in_process",
                START_ENV: worker_start(os.environ).value,
            }
            workspace = WORKSPACE_YAML
            if executor == "multiprocess_spawn":
                workspace = Path(home) / "workspace.yaml"
                workspace.write_text(
                    "load_from:\n  - python_module:\n      module_name: benchmarks.daemon_locations\n"
                    f"      attribute: spawn\n      location_name: syncflow\n      working_directory: {REPO_ROOT}\n"
                )
            server = libpq_url(
                sa.make_url(state_url).set(database="postgres").render_as_string(hide_password=False)
            )
            with dagster_deployment(
                server_database_url=server,
                dagster_home=Path(home) / "dagster",
                code_location_env=code_location_env,
                with_daemon=True,
                pool_limits=STAGE_POOL_LIMITS,
                workspace=workspace,
            ) as dagster:
                os.environ["DAGSTER_POSTGRES_URL"] = dagster_postgres_url(dagster.instance_database_url)
                try:
                    with dg.DagsterInstance.from_config(str(dagster.dagster_home)) as instance:
                        yield Stack(stand_ins, state_url, dagster.url, instance)
                finally:
                    os.environ.pop("DAGSTER_POSTGRES_URL", None)
                    _keep_logs(dagster.logs, f"{executor}-{worker_start(os.environ).value}")
        finally:
            stand_ins.stop()


def _keep_logs(logs: dict[str, Path], executor: str) -> None:
    where = REPO_ROOT / "test-artifacts"
    where.mkdir(exist_ok=True)
    for name, path in logs.items():
        if path.exists():
            (where / f"bench-daemon-{executor}-{name}.log").write_bytes(path.read_bytes())


def backfill_phase(stack: Stack) -> dict[str, Any]:
    """A Dagster asset backfill of 3 days x every entity, as the UI's "Materialize all" launches it."""
    from syncflow_dagster.catalog import default_catalog
    from syncflow_dagster.defs.assets import STAGE_ASSETS
    from syncflow_dagster.defs.run_tags import partition_key

    catalog = default_catalog()
    today = dt.datetime.now(dt.UTC).date()
    days = [today - dt.timedelta(days=back) for back in range(BACKFILL_DAYS - 1, -1, -1)]
    partitions = [partition_key(entity, day) for day in days for entity in catalog.topological_order]
    started = time.perf_counter()
    response = httpx.post(
        f"{stack.dagster_url}/graphql",
        json={
            "query": LAUNCH_BACKFILL,
            "variables": {
                "params": {
                    "assetSelection": [{"path": [a.key.to_user_string()]} for a in STAGE_ASSETS],
                    "partitionNames": partitions,
                    "title": "daemon benchmark: 3 days x every entity",
                }
            },
        },
        timeout=300,
    ).json()["data"]["launchPartitionBackfill"]
    if response["__typename"] != "LaunchBackfillSuccess":
        raise RuntimeError(f"backfill not launched: {response}")
    backfill_id = response["backfillId"]
    deadline = time.monotonic() + BACKFILL_TIMEOUT_S
    status = ""
    while time.monotonic() < deadline:
        status = httpx.post(
            f"{stack.dagster_url}/graphql",
            json={"query": BACKFILL_STATUS, "variables": {"id": backfill_id}},
            timeout=60,
        ).json()["data"]["partitionBackfillOrError"]["status"]
        if status in {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}:
            break
        time.sleep(1.0)
    wall = time.perf_counter() - started
    import dagster as dg

    records = stack.instance.get_run_records(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
    first_attempts = [r for r in records if "dagster/parent_run_id" not in r.dagster_run.tags]
    runs = [run_figures(stack.instance, r) for r in first_attempts]
    spans: dict[str, list[tuple[float, float]]] = {}
    for record in first_attempts:
        entity = record.dagster_run.tags.get("dagster/partition/entity") or record.dagster_run.tags.get(
            "syncflow/entity", "?"
        )
        spans.setdefault(entity, []).append((record.start_time or 0.0, record.end_time or 0.0))
    # Parent-first: every run of an entity started after every run of its parents ended.
    parent_first = all(
        min(start for start, _ in spans.get(name, [(0.0, 0.0)]))
        >= max(
            (end for parent in catalog.entity(name).parent_entities for _, end in spans.get(parent, [])),
            default=0.0,
        )
        for name in catalog.topological_order
    )
    return _phase(
        "backfill",
        runs,
        wall,
        backfill_status=status,
        run_count=len(first_attempts),
        retries=len(records) - len(first_attempts),
        parent_first=parent_first,
        parked_rows=parked_rows(stack.state_url),
    )


def run(
    rows: int, seed: int, server_url: str | None, executor: str, small_runs: int, backfill_rows: int
) -> dict[str, Any]:
    phases: dict[str, dict[str, Any]] = {}
    checks: dict[str, Any] = {}
    with daemon_stack(rows, seed, server_url, executor) as stack:
        resources = stack.stand_ins.resources()
        phases["parents"] = sync_phase(stack, "parents", ancestors_of(ENTITY))
        phases["initial"] = sync_phase(stack, "initial", [ENTITY])
        checks["initial"] = check_work_orders(stack.stand_ins, resources, stack.state_url)
        applied = apply_changes(stack, seed + 1, **CHANGE_SET)
        phases["incremental"] = sync_phase(stack, "incremental", [ENTITY])
        phases["incremental"]["change_set"] = applied
        checks["incremental"] = check_work_orders(stack.stand_ins, resources, stack.state_url)
        small: list[dict[str, Any]] = []
        started = time.perf_counter()
        for index in range(small_runs):
            pct = min(100.0, SMALL_CHANGED_ROWS * 100.0 / rows)
            apply_changes(
                stack,
                seed + 100 + index,
                updated_pct=pct,
                inserted_pct=0.0,
                deleted_pct=0.0,
                entities=[ENTITY],
            )
            small.extend(sync_phase(stack, "small", [ENTITY])["runs"])
        phases["small"] = _phase(
            "small",
            small,
            time.perf_counter() - started,
            median_seconds=round(statistics.median(r["seconds"] for r in small), 3) if small else None,
        )
        checks["small"] = check_work_orders(stack.stand_ins, resources, stack.state_url)
    if backfill_rows:
        with daemon_stack(
            backfill_rows, seed + 7, server_url, executor, "--history-days", str(BACKFILL_DAYS - 1)
        ) as stack:
            phases["backfill"] = backfill_phase(stack)
            checks["backfill"] = check_work_orders(
                stack.stand_ins, stack.stand_ins.resources(), stack.state_url
            )
    met: dict[str, bool | None] = {
        "small_run_median_seconds": _at_most(
            phases["small"].get("median_seconds"), "small_run_median_seconds"
        ),
        "initial_seconds": _at_most(_seconds(phases["initial"]), "initial_seconds"),
        "incremental_seconds": _at_most(_seconds(phases["incremental"]), "incremental_seconds"),
    }
    if "backfill" in phases:
        backfill = phases["backfill"]
        met["backfill_runs"] = backfill["run_count"] <= TARGETS["backfill_runs"]
        met["backfill_parent_first"] = bool(backfill["parent_first"])
        # Parked although the parent is delivered: what a parent-first backfill must leave at 0.
        met["backfill_parked_rows"] = backfill["parked_rows"]["parent_delivered"] == 0
    return {
        "benchmark": "daemon",
        "rows": rows,
        "seed": seed,
        "executor": f"{executor}, workers {worker_start(os.environ).value}",
        "cpu_count": os.cpu_count(),
        "phases": phases,
        "checks": checks,
        "targets": {**TARGETS, "backfill_parent_first": True, "backfill_parked_rows": 0},
        "targets_met": met,
    }


def _parked_text(parked: Any) -> str:
    if isinstance(parked, dict):
        return (
            f"{parked['total']}: parent delivered {parked['parent_delivered']}, "
            f"parent refused {parked['parent_refused']}"
        )
    return str(parked)  # figures recorded before the split


def _seconds(phase: dict[str, Any]) -> float | None:
    return float(phase["runs"][-1]["seconds"]) if phase["runs"] else None


def _at_most(value: float | None, target: str) -> bool | None:
    return None if value is None else value <= TARGETS[target]


def print_table(result: dict[str, Any]) -> None:
    print(f"daemon path, executor {result['executor']}, {result['rows']:,} work orders")
    header = f"{'phase':<12}{'entity':<18}{'queued→end':>11}{'queue':>7}{'launch':>8}{'setup':>7}{'execute':>9}{'stages':>8}"
    print(header)
    for phase in result["phases"].values():
        for run in phase["runs"]:
            print(
                f"{phase['phase']:<12}{run['entity'] or '?':<18}{run['seconds']:>11.2f}{run['queued_s']:>7.2f}"
                f"{run['launch_s']:>8.2f}{run['worker_setup_s']:>7.2f}{run['execute_s']:>9.2f}{run['stage_work_s']:>8.2f}"
            )
        extra = {k: v for k, v in phase.items() if k not in {"runs", "phase"}}
        print(f"{'':<12}{json.dumps(extra, default=str)}")
    for name, ok in result["targets_met"].items():
        verdict = "n/a" if ok is None else ("met" if ok else "MISSED")
        print(f"target {name} {result['targets'].get(name)}: {verdict}")


def _median(runs: list[dict[str, Any]], field: str) -> float:
    return round(statistics.median(float(r[field]) for r in runs), 2) if runs else float("nan")


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The docs' table: per result and phase, medians of queued -> end and of its parts, and the load."""
    lines = [
        "| executor | rows | phase | runs | queued → end s (median) | in queue | launch | worker set-up "
        "| execute | of which stage work | load (1 min) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for result in results:
        for phase in result["phases"].values():
            runs = phase["runs"]
            if phase["phase"] == "parents":
                continue  # waits on one another by design (one run per plan at a time)
            load = phase["load_average"][0]
            extra = ""
            if phase["phase"] == "backfill":
                extra = f" ({phase['run_count']} runs, parent-first {phase['parent_first']}, parked {_parked_text(phase['parked_rows'])})"
            lines.append(
                f"| {result['executor']} | {result['rows']:,} | {phase['phase']}{extra} | {len(runs)} "
                f"| {_median(runs, 'seconds')} | {_median(runs, 'queued_s')} | {_median(runs, 'launch_s')} "
                f"| {_median(runs, 'worker_setup_s')} | {_median(runs, 'execute_s')} | {_median(runs, 'stage_work_s')} "
                f"| {load:.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks daemon", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="work orders in the APISmith stand-in")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--database-url", help="Postgres server (default $SYNCFLOW_DATABASE_URL, else embedded)"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--worker-start",
        choices=[s.value for s in WorkerStart],
        help=f"how the code server starts run workers (sets {START_ENV}; default: its value, else forkserver)",
    )
    parser.add_argument("--executor", choices=EXECUTORS, default="in_process")
    parser.add_argument(
        "--small-runs", type=int, default=10, help="runs of one entity-day with 100 changed rows"
    )
    parser.add_argument(
        "--backfill-rows",
        type=int,
        default=2000,
        help="work orders of the backfill phase's source (0: skip it)",
    )
    parser.add_argument(
        "--table",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="print the docs' markdown table of earlier runs and stop",
    )
    args = parser.parse_args(argv)
    if args.worker_start:
        os.environ[START_ENV] = args.worker_start
    if args.table:
        print(markdown_table([json.loads(path.read_text()) for path in args.table]))
        return 0
    if args.rows < 1000:
        parser.error("--rows must be at least 1000 (the change set is a share of it)")
    configured = E2EBenchSettings().database_url
    server = args.database_url or (configured.get_secret_value() if configured else None)
    result = run(args.rows, args.seed, server, args.executor, args.small_runs, args.backfill_rows)
    print_table(result)
    print(markdown_table([result]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
