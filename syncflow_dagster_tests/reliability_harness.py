"""Helpers of the reliability tests: faults on the stand-ins, and syncs, retries and reconciles in process.

`sync_entity` materialises the nine stage assets for one entity × day in this
process (`defs/runner.materialize_sync`), the code users run, and returns the
counts its batch's stage events recorded; the retry and reconcile jobs run
with `execute_in_process`.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import dagster as dg

from syncflow_dagster.defs.jobs import reconcile_job, retry_job
from syncflow_dagster.defs.runner import materialize_sync, report_of
from syncflow_dagster.store.events import stage_totals
from syncflow_dagster_tests import loopback_http
from syncflow_dagster_tests.waiting import wait_until

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, poll_s: float = 0.1) -> T:
    """Poll `probe` until it returns something truthy (a pid, a non-empty list, True); fail after `timeout` s."""
    found = wait_until(probe, what, timeout_s=timeout, interval_s=poll_s)
    assert found is not None
    return found


def put_faults(base_url: str, **config: Any) -> dict[str, Any]:
    """Replace a stand-in's fault configuration (`FaultConfig` fields); returns the new state."""
    response = loopback_http.put(f"{base_url}/admin/faults", json=config, timeout=30)
    response.raise_for_status()
    state: dict[str, Any] = response.json()
    return state


def faults_served(base_url: str) -> dict[str, int]:
    response = loopback_http.get(f"{base_url}/admin/faults", timeout=30)
    response.raise_for_status()
    served: dict[str, int] = response.json()["faults_served"]
    return served


def clear_faults(*base_urls: str) -> None:
    for base in base_urls:
        loopback_http.delete(f"{base}/admin/faults", timeout=30).raise_for_status()


def revoke_tokens(base_url: str) -> None:
    loopback_http.post(f"{base_url}/admin/tokens:revoke", timeout=30).raise_for_status()


def sync_entity(resources: dict[str, Any], entity_name: str, day: dt.date) -> dict[str, int]:
    """One entity × day through the Dagster assets, in process; the batch's counts (every stage's).

    A run that fails raises, as the stage functions did: the soak counts it
    and syncs the entity again later, as Dagster's run retry would.
    """
    result = materialize_sync(entity_name, day, resources=resources, log_level="WARNING")
    batch = report_of(result)["batch_id"]
    events = resources["database"].events().for_batch(uuid.UUID(str(batch)))
    return dict(stage_totals(events).counts)


def run_retry_job(resources: dict[str, Any], entities: list[str] | None = None) -> dg.ExecuteInProcessResult:
    """The retry job (failed records that are due, released children), in process."""
    return retry_job.execute_in_process(
        resources=resources,
        run_config={"ops": {"retry_failed_and_pending": {"config": {"entities": entities or []}}}},
    )


def run_reconcile_job(resources: dict[str, Any], entities: list[str]) -> dg.ExecuteInProcessResult:
    return reconcile_job.execute_in_process(
        resources=resources,
        run_config={"ops": {"reconcile_entities": {"config": {"entities": entities}}}},
    )


def observations(result: dg.ExecuteInProcessResult) -> list[dict[str, Any]]:
    """The metadata of the AssetObservations a maintenance run logged (one per entity)."""
    out = []
    for event in result.all_events:
        if event.event_type_value == "ASSET_OBSERVATION":
            observation = event.event_specific_data.asset_observation  # type: ignore[union-attr]
            out.append({k: v.value for k, v in observation.metadata.items()})
    return out
