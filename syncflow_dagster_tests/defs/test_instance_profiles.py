"""The Celery profile's instance (deploy/dagster-celery.yaml) runs the queue as dagster.yaml does.

The two files are copied by hand into $DAGSTER_HOME; what keeps runs safe (one
writing run per entity, the launch plans' order, run monitoring, run retries,
the run launcher and coordinator) must not drift between them. What may differ
is listed here with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
# Sized by the Celery workers rather than by this machine's cores (see the file's comment).
MAY_DIFFER = {("concurrency", "runs", "max_concurrent_runs")}


def _instance(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


def _without(config: dict[str, Any], paths: set[tuple[str, ...]]) -> dict[str, Any]:
    copy = yaml.safe_load(yaml.safe_dump(config))
    for path in paths:
        node = copy
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    return copy


def test_the_celery_profile_keeps_the_run_queue_monitoring_and_retries_of_dagster_yaml() -> None:
    main = _instance(REPO_ROOT / "dagster.yaml")
    celery = _instance(REPO_ROOT / "deploy" / "dagster-celery.yaml")
    for section in ("run_coordinator", "run_launcher", "run_monitoring", "run_retries", "storage"):
        assert celery.get(section) == main.get(section), f"deploy/dagster-celery.yaml differs in {section}"
    main_runs = _without(main, MAY_DIFFER)["concurrency"]["runs"]
    celery_runs = _without(celery, MAY_DIFFER)["concurrency"]["runs"]
    assert celery_runs == main_runs, "deploy/dagster-celery.yaml's run limits differ from dagster.yaml's"
