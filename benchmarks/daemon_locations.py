"""Code locations the daemon benchmark compares against the configured one (`--executor multiprocess_spawn`).

`spawn` is the SyncFlow code location with Dagster's multiprocess executor at
its defaults (start method `spawn`: every step a fresh Python that imports
Dagster and the definitions): the executor SyncFlow used before in_process,
kept only so that the benchmark can measure what the change gave.
"""

from __future__ import annotations

import dagster as dg

from syncflow_dagster.definitions import defs as _configured

spawn = dg.Definitions(
    assets=_configured.assets,
    asset_checks=_configured.asset_checks,
    jobs=_configured.jobs,
    sensors=_configured.sensors,
    schedules=_configured.schedules,
    resources=_configured.resources,
    executor=dg.multiprocess_executor,
)
