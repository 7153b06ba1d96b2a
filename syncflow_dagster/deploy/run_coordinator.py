"""The instance's run coordinator: Dagster's run queue, told which entities each run writes.

Dagster's run queue limits runs by their tags, and a tag has one value: a
run's `dagster/partition/entity` (or `syncflow/entity`) names ONE entity. A
single-run backfill of a few days × many entities is one run over several
entities, and a range run carries no entity tag at all, so the
one-run-per-entity limit would not hold for them. `SyncflowRunCoordinator` is
the `QueuedRunCoordinator` with two additions:

* On submit, it reads the entities a run writes from its partition tags (one
  partition, a partition range, or `syncflow/entity`) and stamps one tag per
  entity, `syncflow/writes/<entity>: "true"`, plus `dagster/priority` by the
  entity's depth in the catalog (0 for an entity without parents, -1 for its
  children, ...; a run over several entities takes its shallowest): the queue
  dequeues higher priorities first, so of the runs waiting, parents go first.
  A priority the submitter set is kept.
* Its queue configuration adds a limit of 1 for every `syncflow/writes/<entity>`
  key of the catalog. A run is blocked while any run in flight writes one of
  its entities, and a run over several entities waits until none of them is
  being written: no two runs ever write one entity at once.

The catalog is the one the process loads (`SYNCFLOW_CATALOG_PATH`, as the code
location): restart the daemon after adding an entity, as after any code change.

    run_coordinator:
      module: syncflow_dagster.deploy.run_coordinator
      class: SyncflowRunCoordinator
      config: {...QueuedRunCoordinator's config...}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg
from dagster._core.run_coordinator import QueuedRunCoordinator, SubmitRunContext
from dagster._core.run_coordinator.queued_run_coordinator import RunQueueConfig
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
    PRIORITY_TAG,
)

from syncflow_dagster.catalog import Catalog, default_catalog

WRITES_TAG_PREFIX = "syncflow/writes/"
ENTITY_TAG = "syncflow/entity"
PARTITION_ENTITY_TAG = "dagster/partition/entity"


def writes_tag(entity: str) -> str:
    """The tag key a run writing `entity` carries (the queue allows one such run at a time)."""
    return f"{WRITES_TAG_PREFIX}{entity}"


def _entity_of_key(key: str) -> str:
    # A multi-partition key as text holds its values in the order of the dimension names: "date|entity".
    return key.rpartition("|")[2]


def entities_of_run(tags: Mapping[str, str], catalog: Catalog) -> list[str]:
    """The catalog entities a run with these tags writes, in topological order (empty: none known).

    A range `<date>|<first>` .. `<date>|<last>` covers the entities from first
    to last in the entity dimension's order, which is the catalog's
    topological order (defs/partitions.py).
    """
    order = list(catalog.topological_order)
    found: set[str] = set()
    for key in (ENTITY_TAG, PARTITION_ENTITY_TAG):
        if tags.get(key) in catalog.by_name:
            found.add(tags[key])
    if PARTITION_NAME_TAG in tags and _entity_of_key(tags[PARTITION_NAME_TAG]) in catalog.by_name:
        found.add(_entity_of_key(tags[PARTITION_NAME_TAG]))
    first = _entity_of_key(tags.get(ASSET_PARTITION_RANGE_START_TAG, ""))
    last = _entity_of_key(tags.get(ASSET_PARTITION_RANGE_END_TAG, ""))
    if first in catalog.by_name and last in catalog.by_name:
        low, high = sorted((order.index(first), order.index(last)))
        found.update(order[low : high + 1])
    return [name for name in order if name in found]


def depths(catalog: Catalog) -> dict[str, int]:
    """Each entity's depth: 0 without parents, else one more than its deepest parent."""
    depth: dict[str, int] = {}
    for name in catalog.topological_order:
        parents = [p for p in catalog.entity(name).parent_entities if p != name]
        depth[name] = 1 + max(depth[p] for p in parents) if parents else 0
    return depth


def queue_tags(tags: Mapping[str, str], catalog: Catalog) -> dict[str, str]:
    """The tags to add to a run with `tags`: one writes tag per entity and, unless set, its priority."""
    entities = entities_of_run(tags, catalog)
    if not entities:
        return {}
    added = {writes_tag(name): "true" for name in entities}
    if PRIORITY_TAG not in tags:
        depth = depths(catalog)
        added[PRIORITY_TAG] = str(-min(depth[name] for name in entities))
    return {key: value for key, value in added.items() if tags.get(key) != value}


def entity_write_limits(catalog: Catalog) -> list[dict[str, Any]]:
    """One run at a time per entity written: a limit of 1 on each entity's writes tag."""
    return [{"key": writes_tag(name), "limit": 1} for name in catalog.topological_order]


class SyncflowRunCoordinator(QueuedRunCoordinator):
    """QueuedRunCoordinator that tags runs with the entities they write (see the module's docstring)."""

    def _catalog(self) -> Catalog:
        return default_catalog()

    def submit_run(self, context: SubmitRunContext) -> dg.DagsterRun:
        run = context.dagster_run
        added = queue_tags(run.tags, self._catalog())
        if added:
            self._instance.add_run_tags(run.run_id, added)
            context = context._replace(dagster_run=run.with_tags({**run.tags, **added}))
        return super().submit_run(context)

    def get_run_queue_config(self) -> RunQueueConfig:
        config = super().get_run_queue_config()
        limits = [*config.tag_concurrency_limits, *entity_write_limits(self._catalog())]
        return config._replace(tag_concurrency_limits=limits)
