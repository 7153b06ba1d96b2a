"""The run coordinator: which entities a run writes, its priority, and the queue limits that follow.

The queue's decisions are Dagster's own (`TagConcurrencyLimitsCounter`, what
the daemon's dequeue pass uses), fed with the limits of the repository's
dagster.yaml plus the per-entity write limits the coordinator adds. That
submitting stamps the tags is shown through the daemon
(ui/test_graphql_backfill.py reads them off the backfill's runs).
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import yaml
from dagster._utils.tags import TagConcurrencyLimitsCounter

from syncflow_dagster.catalog import default_catalog
from syncflow_dagster.deploy.run_coordinator import (
    SyncflowRunCoordinator,
    depths,
    entities_of_run,
    queue_tags,
    writes_tag,
)

CATALOG = default_catalog()
ORDER = list(CATALOG.topological_order)
REPO = Path(__file__).resolve().parents[2]
DAY = "2026-12-01"


def _range(first: str, last: str, day: str = DAY) -> dict[str, str]:
    return {
        "dagster/asset_partition_range_start": f"{day}|{first}",
        "dagster/asset_partition_range_end": f"{day}|{last}",
    }


def test_entities_of_a_run_come_from_its_partition_tags() -> None:
    assert entities_of_run(
        {"dagster/partition": f"{DAY}|items", "dagster/partition/entity": "items"}, CATALOG
    ) == ["items"]
    assert entities_of_run({"syncflow/entity": "operations"}, CATALOG) == ["operations"]
    # A backfill's range run over every entity of a day, and one over one entity's dates.
    assert entities_of_run(_range(ORDER[0], ORDER[-1]), CATALOG) == ORDER
    assert entities_of_run(
        {
            "dagster/asset_partition_range_start": f"2026-11-01|{ORDER[2]}",
            "dagster/asset_partition_range_end": f"2026-11-30|{ORDER[2]}",
        },
        CATALOG,
    ) == [ORDER[2]]
    assert entities_of_run(_range(ORDER[1], ORDER[3]), CATALOG) == ORDER[1:4]
    # Runs of no sync partition (maintenance, an unknown name) write no entity the queue knows.
    assert entities_of_run({}, CATALOG) == []
    assert entities_of_run({"syncflow/entity": "nonesuch"}, CATALOG) == []


def test_priority_follows_the_depth_in_the_catalog() -> None:
    depth = depths(CATALOG)
    assert depth["sites"] == 0
    assert depth["work_centers"] == 1
    for name in ORDER:
        for parent in CATALOG.entity(name).parent_entities:
            assert depth[parent] < depth[name], (parent, name)
    assert queue_tags({"syncflow/entity": "sites"}, CATALOG) == {
        writes_tag("sites"): "true",
        "dagster/priority": "0",
    }
    child = queue_tags({"syncflow/entity": "operations"}, CATALOG)
    assert child["dagster/priority"] == str(-depth["operations"])
    # A run over several entities takes its shallowest entity's priority.
    wide = queue_tags(_range(ORDER[0], ORDER[-1]), CATALOG)
    assert wide["dagster/priority"] == "0"
    assert {k for k in wide if k.startswith("syncflow/writes/")} == {writes_tag(n) for n in ORDER}
    # A priority the submitter chose is kept; tags already there are not added again.
    assert "dagster/priority" not in queue_tags(
        {"syncflow/entity": "items", "dagster/priority": "5"}, CATALOG
    )
    assert (
        queue_tags({"syncflow/entity": "sites", **queue_tags({"syncflow/entity": "sites"}, CATALOG)}, CATALOG)
        == {}
    )


def _queue_limits() -> list[dict]:
    """The queue limits the daemon sees with the repository's dagster.yaml run coordinator."""
    config = yaml.safe_load((REPO / "dagster.yaml").read_text())
    section = config["run_coordinator"]
    assert section["class"] == "SyncflowRunCoordinator"
    with dg.instance_for_test(
        overrides={"run_coordinator": section, "concurrency": config["concurrency"]}
    ) as instance:
        assert isinstance(instance.run_coordinator, SyncflowRunCoordinator)
        run_queue = instance.get_concurrency_config().run_queue_config
        assert run_queue is not None
        assert run_queue.max_concurrent_runs == config["concurrency"]["runs"]["max_concurrent_runs"]
        return list(run_queue.tag_concurrency_limits)


class _Run:
    """What the counter reads of a run: its tags."""

    def __init__(self, tags: dict[str, str]) -> None:
        self.tags = tags


def _stamped(tags: dict[str, str]) -> _Run:
    return _Run({**tags, **queue_tags(tags, CATALOG)})


def test_no_two_runs_write_one_entity_at_once() -> None:
    limits = _queue_limits()
    assert {"key": writes_tag("operations"), "limit": 1} in limits
    assert any(limit["key"] == "dagster/backfill" for limit in limits)

    wide = _stamped({**_range(ORDER[0], ORDER[3]), "dagster/backfill": "b1"})
    inside = _stamped({"dagster/partition": f"{DAY}|{ORDER[1]}", "dagster/partition/entity": ORDER[1]})
    outside = _stamped({"syncflow/entity": ORDER[-1]})
    other = _stamped({"syncflow/entity": ORDER[-2]})

    # A run over several entities in flight blocks a run of any of them, not of the others.
    counter = TagConcurrencyLimitsCounter(limits, [wide])  # type: ignore[list-item]
    assert counter.is_blocked(inside)  # type: ignore[arg-type]
    assert not counter.is_blocked(outside)  # type: ignore[arg-type]
    # And it waits while any of its entities is being written.
    assert TagConcurrencyLimitsCounter(limits, [inside]).is_blocked(wide)  # type: ignore[arg-type, list-item]
    assert not TagConcurrencyLimitsCounter(limits, [outside]).is_blocked(wide)  # type: ignore[arg-type, list-item]
    # Runs of different entities go side by side.
    assert not TagConcurrencyLimitsCounter(limits, [outside]).is_blocked(other)  # type: ignore[arg-type, list-item]
    # The runs of one backfill go one at a time, even over disjoint entities.
    later = _stamped({**_range(ORDER[4], ORDER[-1]), "dagster/backfill": "b1"})
    assert TagConcurrencyLimitsCounter(limits, [wide]).is_blocked(later)  # type: ignore[arg-type, list-item]
