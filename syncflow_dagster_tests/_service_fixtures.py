"""Helpers shared by the service tests: a Dagster webserver, and rows written the way the sync writes them."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from syncflow_dagster.store.schema import failed_records, pending_children, sync_batches
from syncflow_dagster_tests import loopback_http
from syncflow_dagster_tests.isolation import free_port
from syncflow_dagster_tests.processes import stop_process_group
from syncflow_dagster_tests.waiting import wait_until

__all__ = ["free_port"]


def insert_batch(
    conn: sa.Connection,
    entity: str,
    counts: dict[str, int],
    *,
    run_id: str | None = None,
    status: str = "succeeded",
    stage_seconds: dict[str, float] | None = None,
    seconds: float = 2.5,
    kind: str = "sync",
    started_days_ago: int = 0,
) -> uuid.UUID:
    started = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds, days=started_days_ago)
    batch_id = uuid.uuid4()
    conn.execute(
        sa.insert(sync_batches).values(
            id=batch_id,
            entity=entity,
            partition_date=started.date(),
            run_id=run_id or f"run-{uuid.uuid4().hex[:8]}",
            status=status,
            started_at=started,
            finished_at=None if status == "running" else started + dt.timedelta(seconds=seconds),
            counts=counts,
            stage_seconds=stage_seconds or {"fetch": 1.0, "deliver": 0.5},
            kind=kind,
            failed_closes=1 if status == "failed" else 0,
        )
    )
    return batch_id


def insert_failure(conn: sa.Connection, entity: str, bk: str, reason: str, **extra: Any) -> None:
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "entity": entity,
        "bk_hash": uuid.uuid4(),
        "bk": bk,
        "reason_code": reason,
        "reason_class": "retryable",
        "detail": f"{reason} for {bk}",
        "payload": {"secret_looking": "payloads are never listed"},
    }
    conn.execute(sa.insert(failed_records).values({**values, **extra}))


def insert_pending(conn: sa.Connection, entity: str, bk: str, parent: str, parent_bk: str) -> None:
    conn.execute(
        sa.insert(pending_children).values(
            id=uuid.uuid4(),
            entity=entity,
            bk_hash=uuid.uuid4(),
            bk=bk,
            missing_parent_entity=parent,
            missing_parent_bk=parent_bk,
            missing_parent_bk_hash=uuid.uuid4(),
        )
    )


REPO = Path(__file__).resolve().parents[1]
WEBSERVER_START_S = 180.0
RUN_FINISH_S = 240.0
TERMINAL = frozenset({"SUCCESS", "FAILURE", "CANCELED"})


def _dagster_answers(url: str, proc: subprocess.Popen[bytes], log: Path) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"dagster-webserver exited: {log.read_text()[-3000:]}")
    try:
        body = loopback_http.post(f"{url}/graphql", json={"query": "{ version }"}, timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return False
    return bool(body.get("data", {}).get("version"))


@contextmanager
def dagster_webserver(home: Path, env: Mapping[str, str]) -> Iterator[str]:
    """`dagster-webserver` for the repo's workspace.yaml on a free loopback port; yields its URL.

    DAGSTER_HOME is `home` (its log goes to home/webserver.log). Dagster 1.13
    queues runs by default (the daemon dequeues them); the default coordinator
    launches them at once, so no daemon is needed. The process group is always ended.
    """
    (home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\n"
        "run_coordinator:\n  module: dagster.core.run_coordinator\n  class: DefaultRunCoordinator\n"
    )
    port = free_port()
    log = home / "webserver.log"
    bin_dir = Path(sys.executable).parent
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(bin_dir / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"],
            cwd=REPO,
            env={**env, "DAGSTER_HOME": str(home)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: _dagster_answers(url, proc, log),
            "dagster-webserver to answer GraphQL",
            timeout_s=WEBSERVER_START_S,
            interval_s=0.5,
            describe=lambda: log.read_text()[-3000:],
        )
        yield url
    finally:
        stop_process_group(proc)


def poll_run(
    api_url: str,
    headers: Mapping[str, str],
    run_id: str,
    until: frozenset[str] | set[str] = TERMINAL,
    timeout_s: float = RUN_FINISH_S,
) -> dict[str, Any]:
    """GET /sync/<run_id> of the monitoring API until the run's status is in `until`; returns that body."""
    seen: dict[str, Any] = {}

    def status_reached() -> dict[str, Any] | None:
        response = loopback_http.get(f"{api_url}/sync/{run_id}", headers=dict(headers), timeout=60)
        assert response.status_code == 200, response.text
        seen.update(response.json())
        return dict(seen) if seen["status"] in until else None

    return wait_until(
        status_reached,
        f"run {run_id} to reach one of {sorted(until)}",
        timeout_s=timeout_s,
        interval_s=0.5,
        describe=lambda: f"its last status: {seen.get('status')}",
    )
