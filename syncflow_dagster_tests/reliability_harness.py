"""Helpers of the reliability tests: faults on the stand-ins, and a sync without Dagster's per-step cost.

`sync_stages` runs the nine stage functions of `defs/stages.py` in the order
and with the bookkeeping the assets in `defs/assets.py` use (fetch → normalize
with rejected rows recorded → identity → rowversion → delta → parent-child →
deliver → persist → batch closed). The soak test uses it for its 30
iterations because an in-process Dagster run costs seconds of step overhead
per entity on a loaded 2-core machine; the fault tests and the soak's final
runs go through Dagster itself (`materialize_sync`, `retry_job`, `reconcile_job`).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import dagster as dg
import httpx

from syncflow_dagster.defs import bookkeeping, stages
from syncflow_dagster.defs.assets import CATALOG
from syncflow_dagster.defs.jobs import reconcile_job, retry_job
from syncflow_dagster_tests.waiting import wait_until

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, poll_s: float = 0.1) -> T:
    """Poll `probe` until it returns something truthy (a pid, a non-empty list, True); fail after `timeout` s."""
    found = wait_until(probe, what, timeout_s=timeout, interval_s=poll_s)
    assert found is not None
    return found


def put_faults(base_url: str, **config: Any) -> dict[str, Any]:
    """Replace a stand-in's fault configuration (`FaultConfig` fields); returns the new state."""
    response = httpx.put(f"{base_url}/admin/faults", json=config, timeout=30)
    response.raise_for_status()
    state: dict[str, Any] = response.json()
    return state


def faults_served(base_url: str) -> dict[str, int]:
    response = httpx.get(f"{base_url}/admin/faults", timeout=30)
    response.raise_for_status()
    served: dict[str, int] = response.json()["faults_served"]
    return served


def clear_faults(*base_urls: str) -> None:
    for base in base_urls:
        httpx.delete(f"{base}/admin/faults", timeout=30).raise_for_status()


def revoke_tokens(base_url: str) -> None:
    httpx.post(f"{base_url}/admin/tokens:revoke", timeout=30).raise_for_status()


def sync_stages(resources: dict[str, Any], entity_name: str, day: dt.date) -> dict[str, int]:
    """One entity × day through the nine stages, as the assets chain them; returns the merged counts."""
    database = resources["database"]
    entity = CATALOG.entity(entity_name)
    dates = (day,)
    batch = bookkeeping.batch_for_run(database, entity.name, day, f"stages-{uuid.uuid4()}")
    fetched = stages.fetch_stage(resources["apismith"].client(), entity, dates)
    normalized, rejected = stages.normalize_stage(entity, fetched.frame)
    if rejected.num_rows:
        bookkeeping.record_rejected(database, entity, batch, rejected)
    identified = stages.identity_stage(entity, normalized.frame)
    fresh = stages.rowversion_stage(database.state(), entity, identified.frame)
    delta = stages.delta_stage(fresh.frame)
    resolved = stages.parent_child_stage(CATALOG, entity, database, delta.frame, batch)
    delivered = stages.deliver_stage(resources["schedulehub"].client(), entity, resolved.frame)
    persisted = stages.persist_stage(database, entity, delivered.frame, batch)
    counts = stages.merged_counts(
        fetched.counts,
        normalized.counts,
        fresh.counts,
        delta.counts,
        resolved.counts,
        delivered.counts,
        persisted.counts,
    )
    database.batches().finish_batch(batch, "succeeded", counts, {})
    return counts


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
