"""The Celery profile end to end: two Celery workers on loopback execute a multi-entity sync's steps.

Everything is a separate process, as in production: two `celery worker`
processes (w1, w2) consuming a queue of this test run's own on the machine's
RabbitMQ (results in Redis), `dagster-daemon` dequeuing runs under the
shipped deploy/dagster-celery.yaml (Postgres instance, one run per entity,
a global cap, pools), and the runs' own processes handing every step to
Celery. The test submits two days × three root entities at once and checks,
from the instance's event log and the partner systems:

- steps ran on both workers (dagster-celery records the worker's hostname in
  the engine event that opens each step);
- ScheduleHub holds exactly APISmith's keys of every entity synced;
- no two runs of one entity overlapped, and no two steps of one pool did.

Every wait is bounded; workers and daemon are killed as process groups.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import subprocess
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pytest
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import WorkspaceFileTarget
from dagster_graphql.test.utils import execute_dagster_graphql
from kombu import Connection, Exchange, Queue

from syncflow_dagster.catalog import default_catalog
from syncflow_dagster.deploy.executor import DEFAULT_CELERY_BACKEND, DEFAULT_CELERY_BROKER
from syncflow_dagster.engine import columns as c
from syncflow_dagster.engine.identity import add_identity
from syncflow_dagster.engine.normalize import normalize
from syncflow_dagster.simulators.datagen import generate_dataset
from syncflow_dagster_tests.processes import log_tail, stop_process_group, venv_bin
from syncflow_dagster_tests.sync_harness import Deployment, deployment
from syncflow_dagster_tests.waiting import wait_until
from syncflow_dagster_tests.webserver import dagster_postgres_url, scratch_database

pytestmark = [pytest.mark.celery, pytest.mark.slow, pytest.mark.timeout(600)]

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTANCE_YAML = REPO_ROOT / "deploy" / "dagster-celery.yaml"
WORKSPACE_YAML = REPO_ROOT / "workspace.yaml"
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"
CODE_LOCATION = "syncflow"

# Entities with no parent: runs of different entities may then finish in any
# order and ScheduleHub must still end up exact.
ENTITIES = ("sites", "items", "customers")
SOURCE_ROWS = 2_000
POOL_LIMIT = 1

WORKER_START_TIMEOUT_S = 180.0
RUNS_TIMEOUT_S = 420.0
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 1.0
TERMINAL = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}

LAUNCH_RUN = """
mutation LaunchRun($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""


@contextlib.contextmanager
def _process(args: list[str], env: Mapping[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, cwd=REPO_ROOT, env=dict(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        # SIGTERM the group (a worker's pool children, the daemon's code server), then SIGKILL the rest.
        stop_process_group(process, timeout_s=STOP_TIMEOUT_S)


def _wait_for_log(process: subprocess.Popen[bytes], log: Path, marker: str, what: str) -> None:
    def logged() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with code {process.returncode}:\n{log_tail(log, 30)}")
        return marker in log.read_text(errors="replace")

    wait_until(
        logged,
        f"{what} to log {marker!r}",
        timeout_s=WORKER_START_TIMEOUT_S,
        interval_s=POLL_INTERVAL_S,
        describe=lambda: log_tail(log, 30),
    )


def _delete_queue(queue: str) -> None:
    """Remove this run's queue and exchange from RabbitMQ (best effort: the broker may be gone)."""
    with contextlib.suppress(Exception), Connection(DEFAULT_CELERY_BROKER, connect_timeout=5) as conn:
        channel = conn.channel()
        Queue(queue, Exchange(queue, type="topic"), channel=channel).delete()
        Exchange(queue, type="topic", channel=channel).delete()


def _broker_answers() -> None:
    try:
        with Connection(DEFAULT_CELERY_BROKER, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as error:
        raise AssertionError(
            f"RabbitMQ is not answering at 127.0.0.1:5672 ({type(error).__name__}); the Celery test needs it"
        ) from None


def _launch_runs(instance: dg.DagsterInstance, days: list[str]) -> list[str]:
    """Submit one sync run per day × entity through the instance's run queue, as the webserver would."""
    run_ids = []
    target = WorkspaceFileTarget(paths=[str(WORKSPACE_YAML)])
    with WorkspaceProcessContext(instance, target) as workspace:
        context = workspace.create_request_context()
        errors = context.get_code_location_error(CODE_LOCATION)
        assert errors is None, f"code location failed to load: {errors}"
        for day, entity in itertools.product(days, ENTITIES):
            tags = {
                "dagster/partition": f"{day}|{entity}",
                "dagster/partition/date": day,
                "dagster/partition/entity": entity,
            }
            params = {
                "selector": {
                    "repositoryLocationName": CODE_LOCATION,
                    "repositoryName": "__repository__",
                    "jobName": "sync",
                },
                "runConfigData": {},
                "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
            }
            result = execute_dagster_graphql(context, LAUNCH_RUN, {"executionParams": params})
            assert not result.errors, result.errors
            launched = result.data["launchRun"]
            assert launched["__typename"] == "LaunchRunSuccess", launched
            run_ids.append(launched["run"]["runId"])
    return run_ids


def _wait_for_runs(instance: dg.DagsterInstance, run_ids: list[str], daemon_log: Path) -> list[dg.DagsterRun]:
    def finished() -> list[dg.DagsterRun] | None:
        runs = instance.get_runs(filters=dg.RunsFilter(run_ids=run_ids))
        done = len(runs) == len(run_ids) and all(r.status in TERMINAL for r in runs)
        return list(runs) if done else None

    def states() -> str:
        runs = instance.get_runs(filters=dg.RunsFilter(run_ids=run_ids))
        listed = sorted(f"{r.tags.get('dagster/partition')}: {r.status.value}" for r in runs)
        return f"{listed}\ndaemon log:\n{log_tail(daemon_log, 30)}"

    return wait_until(
        finished, "the runs to finish", timeout_s=RUNS_TIMEOUT_S, interval_s=POLL_INTERVAL_S, describe=states
    )


def _step_failures(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [
        f"{e.step_key}: {e.dagster_event.step_failure_data.error.message.strip()[:600]}"
        for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
        if e.dagster_event is not None and e.dagster_event.step_failure_data.error is not None
    ]


def _workers_by_step(instance: dg.DagsterInstance, run_id: str) -> dict[str, str]:
    """step key → the Celery worker that executed it, from dagster-celery's engine events."""
    workers = {}
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        event = record.dagster_event
        if event is None or record.step_key is None:
            continue
        worker = event.engine_event_data.metadata.get("Celery worker")
        if worker is not None:
            workers[record.step_key] = str(worker.value)
    return workers


def _step_spans(instance: dg.DagsterInstance, run_id: str, step_key: str) -> list[tuple[float, float]]:
    """(start, end) of each attempt of a step: STEP_START to the following success or failure."""
    events = [
        e
        for e in instance.all_logs(run_id)
        if e.step_key == step_key
        and e.dagster_event_type
        in {
            dg.DagsterEventType.STEP_START,
            dg.DagsterEventType.STEP_SUCCESS,
            dg.DagsterEventType.STEP_FAILURE,
            dg.DagsterEventType.STEP_UP_FOR_RETRY,
        }
    ]
    spans, started = [], None
    for e in sorted(events, key=lambda e: e.timestamp):
        if e.dagster_event_type == dg.DagsterEventType.STEP_START:
            started = e.timestamp
        elif started is not None:
            spans.append((started, e.timestamp))
            started = None
    assert started is None, f"run {run_id} step {step_key} started and never ended"
    return spans


def _assert_disjoint(spans: list[tuple[float, float]], what: str) -> None:
    ordered = sorted(spans)
    for (_, earlier_end), (later_start, _) in itertools.pairwise(ordered):
        assert later_start >= earlier_end, f"{what} overlapped: {ordered}"


def _record_profile(
    instance: dg.DagsterInstance, runs: list[dg.DagsterRun], records: Any, held_rows: int
) -> None:
    """Keep what this run measured (steps per worker, step seconds, wall time) for docs/scaling.md.

    A record of one run on a shared machine, not an assertion: speed is never tested here.
    """
    steps: Counter[str] = Counter()
    step_seconds: defaultdict[str, float] = defaultdict(float)
    for run in runs:
        for step_key, worker in _workers_by_step(instance, run.run_id).items():
            steps[worker] += 1
            step_seconds[worker] += sum(
                end - start for start, end in _step_spans(instance, run.run_id, step_key)
            )
    wall = max(r.end_time for r in records) - min(r.start_time for r in records)
    lines = [
        f"celery profile: {len(runs)} runs, {sum(steps.values())} steps, {held_rows} rows held by ScheduleHub",
        f"wall from first run start to last run end: {wall:.1f} s",
        *(f"{w}: {steps[w]} steps, {step_seconds[w]:.1f} s inside steps" for w in sorted(steps)),
    ]
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    (ARTIFACTS_DIR / "celery-profile.txt").write_text("\n".join(lines) + "\n")


def _source_bks(env: Deployment, entity: str) -> set[str]:
    """APISmith's live records of an entity (its verification snapshot), as ScheduleHub external keys."""
    spec = default_catalog().entity(entity)
    records = env.admin(env.apismith_url, "GET", f"/admin/snapshot/{spec.source}")["records"]
    normalized = normalize(spec, pa.Table.from_pylist(records))
    assert normalized.rejected.num_rows == 0, normalized.rejected.to_pylist()[:5]
    return {str(k) for k in add_identity(spec, normalized.rows)[c.BK].to_pylist()}


def _worker_command(name: str) -> list[str]:
    """A Celery worker of SyncFlow's app, as docs/scaling.md starts one: one step at a time."""
    return [
        venv_bin("celery"),
        "-A",
        "syncflow_dagster.deploy.celery_app",
        "worker",
        "-n",
        f"{name}@%h",
        "--concurrency",
        "1",
        "--loglevel",
        "INFO",
        # Gossip and mingle are chatter between workers that dagster-celery does not use.
        "--without-gossip",
        "--without-mingle",
    ]


def _environment(
    dagster_home: Path, instance_url: str, env: Deployment, queue: str, today: dt.date
) -> dict[str, str]:
    """The variables every process of the deployment sees: instance, code location, Celery profile."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "SYNCFLOW_", "APISMITH_"))}
    base = {k: v for k, v in base.items() if not k.startswith("SCHEDULEHUB_")}
    base.update(
        {
            "DAGSTER_HOME": str(dagster_home),
            "DAGSTER_POSTGRES_URL": dagster_postgres_url(instance_url),
            **env.environment(),
            "SYNCFLOW_PARTITIONS_START": (today - dt.timedelta(days=7)).isoformat(),
            # Sensors and schedules stay stopped: the test counts exactly the runs it launched.
            "SYNCFLOW_AUTOMATION": "stopped",
            "SYNCFLOW_EXECUTOR": "celery",
            "SYNCFLOW_CELERY_BROKER": DEFAULT_CELERY_BROKER,
            "SYNCFLOW_CELERY_BACKEND": DEFAULT_CELERY_BACKEND,
            "SYNCFLOW_CELERY_QUEUE": queue,
            "PYTHONUNBUFFERED": "1",
        }
    )
    return base


def test_two_celery_workers_sync_three_entities_over_two_days(
    fresh_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _broker_answers()
    today = dt.datetime.now(dt.UTC).date()
    days = [(today - dt.timedelta(days=1)).isoformat(), today.isoformat()]
    # No malformed source rows: every APISmith key must arrive, so "exact" means equal sets.
    dataset = generate_dataset(default_catalog(), SOURCE_ROWS, 29, history_days=1, bad_row_fraction=0.0)
    run_tag = uuid.uuid4().hex[:10]
    queue = f"syncflow_test_{run_tag}"
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    # The shipped instance file, unchanged: the test runs the profile operators run.
    (dagster_home / "dagster.yaml").write_text(INSTANCE_YAML.read_text())

    with (
        deployment(fresh_database_url, dataset=dataset) as env,
        scratch_database(fresh_database_url, "dagster_celery") as instance_url,
    ):
        environment = _environment(dagster_home, instance_url, env, queue, today)
        for key in [k for k in os.environ if k not in environment]:
            monkeypatch.delenv(key)
        for key, value in environment.items():
            monkeypatch.setenv(key, value)

        # The pool limits, set the way docs/scaling.md tells operators to.
        for pool in ("apismith", "schedulehub"):
            subprocess.run(
                [venv_bin("dagster"), "instance", "concurrency", "set", pool, str(POOL_LIMIT)],
                cwd=REPO_ROOT,
                env=environment,
                check=True,
                capture_output=True,
                timeout=120,
            )

        logs = {name: tmp_path / f"{name}.log" for name in ("w1", "w2", "daemon")}
        names = {"w1": f"w1-{run_tag}", "w2": f"w2-{run_tag}"}
        try:
            with contextlib.ExitStack() as stack:
                workers = {
                    key: stack.enter_context(_process(_worker_command(name), environment, logs[key]))
                    for key, name in names.items()
                }
                # The daemon starts with the workers (each loads for a while); runs are launched
                # once both workers are ready, so each can take steps from the first one on.
                daemon = stack.enter_context(
                    _process(
                        [venv_bin("dagster-daemon"), "run", "-w", str(WORKSPACE_YAML)],
                        environment,
                        logs["daemon"],
                    )
                )
                for key, worker in workers.items():
                    _wait_for_log(worker, logs[key], f"{names[key]}@", f"Celery worker {names[key]}")
                    _wait_for_log(worker, logs[key], " ready.", f"Celery worker {names[key]}")
                with dg.DagsterInstance.get() as instance:
                    run_ids = _launch_runs(instance, days)
                    runs = _wait_for_runs(instance, run_ids, logs["daemon"])
                    assert daemon.poll() is None, f"daemon died:\n{log_tail(logs['daemon'], 30)}"
                    _check_runs(instance, env, runs, set(names.values()))
        finally:
            _delete_queue(queue)


def _check_runs(
    instance: dg.DagsterInstance, env: Deployment, runs: list[dg.DagsterRun], worker_names: set[str]
) -> None:
    failed = {
        r.run_id: _step_failures(instance, r.run_id) for r in runs if r.status != dg.DagsterRunStatus.SUCCESS
    }
    assert not failed, f"runs did not succeed: {failed}"

    # Steps ran on both workers, and every step of every run ran on one of them.
    workers_seen: set[str] = set()
    for run in runs:
        by_step = _workers_by_step(instance, run.run_id)
        started = {
            e.step_key
            for e in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)
            if e.step_key
        }
        assert started, f"run {run.run_id} started no step"
        assert started <= set(by_step), f"steps without a Celery worker: {started - set(by_step)}"
        workers_seen |= {name.split("@")[0] for name in by_step.values()}
    assert workers_seen == worker_names, f"workers that executed steps: {sorted(workers_seen)}"

    # ScheduleHub holds exactly APISmith's keys, each once.
    held_rows = 0
    for entity in ENTITIES:
        held = env.schedulehub_records(default_catalog().entity(entity).resource)
        held_keys = [str(k) for k in held["external_key"].to_pylist()]
        assert len(held_keys) == len(set(held_keys)), f"{entity}: duplicate keys in ScheduleHub"
        source = _source_bks(env, entity)
        assert source, f"{entity}: APISmith has no keys"
        held_rows += len(held_keys)
        assert set(held_keys) == source, (
            f"{entity}: missing {sorted(source - set(held_keys))[:5]}, extra {sorted(set(held_keys) - source)[:5]}"
        )

    # Per-entity serialisation: both runs of an entity ran, one after the other.
    records = instance.get_run_records(filters=dg.RunsFilter(run_ids=[r.run_id for r in runs]))
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for record in records:
        entity = record.dagster_run.tags["dagster/partition/entity"]
        assert record.start_time is not None, record.dagster_run.run_id
        assert record.end_time is not None, record.dagster_run.run_id
        spans[entity].append((record.start_time, record.end_time))
    assert {e: len(s) for e, s in spans.items()} == dict.fromkeys(ENTITIES, 2)
    for entity, entity_spans in spans.items():
        _assert_disjoint(entity_spans, f"runs of {entity}")

    _record_profile(instance, runs, records, held_rows)

    # Pools with limit 1: no two fetch steps (apismith) and no two deliver steps (schedulehub) at once.
    for step_key, pool in (("extracted", "apismith"), ("delivered", "schedulehub")):
        pool_spans = [s for r in runs for s in _step_spans(instance, r.run_id, step_key)]
        assert len(pool_spans) >= len(runs), f"{step_key}: {pool_spans}"
        _assert_disjoint(pool_spans, f"{step_key} steps of pool {pool}")
