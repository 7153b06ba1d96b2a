"""A run worker for the process-kill tests: one run of the code location's `sync` job in this process.

It plays the part of the process a Dagster run launcher starts for a run: it
executes the run against the instance in DAGSTER_HOME, and the executor the
environment picks (SYNCFLOW_EXECUTOR=multiprocess in the step-kill tests)
starts one OS process per step. The code location's multiprocess executor
forks the steps from a forkserver that preloaded the code location
(deploy/executor.py), so a step does not import Dagster, pyarrow and the
definitions again; a step is still a process of its own, which is what the
tests kill.

    python -m syncflow_dagster_tests.run_worker sync <entity> <YYYY-MM-DD> <marker> <batch_rows>
    python -m syncflow_dagster_tests.run_worker reexecute <failed_run_id>

The last line printed is JSON: {"run_id": ..., "success": ...}.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import dagster as dg

MARKER_TAG = "syncflow/test_run"


def sync_job() -> dg.JobDefinition:
    """The code location's `sync` job, resolved as the webserver resolves it.

    Module-level, so that `dg.reconstructable` can point each step's process at it.
    """
    from syncflow_dagster.definitions import defs

    return defs.resolve_job_def("sync")


SYNC_JOB = dg.reconstructable(sync_job)


def sync_run_config(batch_rows: int) -> dict[str, Any]:
    return {
        # Smaller delivery batches than production's, so that a delivery is several calls;
        # the other fields as the code location sets them (env references, never values).
        "resources": {
            "schedulehub": {
                "config": {
                    "batch_size": batch_rows,
                    "base_url": {"env": "SCHEDULEHUB_BASE_URL"},
                    "client_id": {"env": "SCHEDULEHUB_CLIENT_ID"},
                    "client_secret": {"env": "SCHEDULEHUB_CLIENT_SECRET"},
                }
            }
        },
        "loggers": {"console": {"config": {"log_level": "WARNING"}}},
    }


def sync_tags(entity: str, day: str, marker: str) -> dict[str, str]:
    return {
        "dagster/partition": f"{day}|{entity}",
        "dagster/partition/date": day,
        "dagster/partition/entity": entity,
        "syncflow/entity": entity,
        MARKER_TAG: marker,
    }


def main(argv: list[str]) -> int:
    with dg.DagsterInstance.get() as instance:
        if argv[0] == "sync":
            entity, day, marker, batch_rows = argv[1:5]
            result = dg.execute_job(
                SYNC_JOB,
                instance=instance,
                run_config=sync_run_config(int(batch_rows)),
                tags=sync_tags(entity, day, marker),
            )
        elif argv[0] == "reexecute":
            parent = instance.get_run_by_id(argv[1])
            if parent is None:
                raise SystemExit(f"no run {argv[1]!r} in the instance")
            # The Python API does not carry the parent's tags over as the UI and the daemon's
            # run retries do; without the partition tags the re-execution is not partitioned.
            result = dg.execute_job(
                SYNC_JOB,
                instance=instance,
                tags=parent.tags,
                reexecution_options=dg.ReexecutionOptions.from_failure(parent.run_id, instance),
            )
        else:
            raise SystemExit(f"unknown command {argv[0]!r}: sync or reexecute")
        print(json.dumps({"run_id": result.run_id, "success": result.success}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
