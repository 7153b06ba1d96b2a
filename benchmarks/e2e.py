"""End-to-end benchmark: the Dagster sync of work_orders at ERP scale, initial then incremental.

`python -m benchmarks e2e --rows N --json PATH [--database-url URL] [--profile-dir DIR]`

- The stand-ins run in SUBPROCESSES (`syncflow simulate apismith --rows N` and
  `syncflow simulate schedulehub`), each with its own GIL, on free loopback ports.
- Postgres is real: --database-url, else SYNCFLOW_DATABASE_URL, else an embedded
  server. The benchmark creates a private database on that server for the run
  (so state starts empty) and drops it at the end.
- Every sync is `materialize_sync` (Dagster `materialize` of the nine stage
  assets) with the real Postgres frame IO manager.

Phases: `parents` (every ancestor of work_orders, parents first, through
`sync_all`), `initial` (work_orders, N rows), then a change set through
`POST /admin/changesets` (1 % updated, 0.5 % inserted, 0.2 % deleted, work
orders only) and `incremental`. Per-stage seconds come from the sync_report's
`stage_seconds`; peak RSS is measured per phase (the kernel's high-water mark
is reset between phases) for this process and for each stand-in.

After the initial and the incremental phase a correctness check compares
ScheduleHub's work orders with APISmith's snapshot normalised through the
engine: the same key set and count, every key the normaliser refuses (or whose
parent is missing) accounted for as a failed record or a pending child, and
the compared attributes equal. Any difference fails the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime as dt
import gc
import json
import os
import resource
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from benchmarks.databases import private_database
from benchmarks.transport import STARTUP_TIMEOUT_S, start_stand_in, stop, wait_until_healthy
from syncflow_dagster.engine import stage_table as st

ENTITY = "work_orders"
CLIENT_ID = "bench"
# Attributes compared value by value (text in both systems, so equal means equal).
COMPARED = ("work_order_no", "item_no", "site_code", "status", "uom")
CHANGE_SET = {"updated_pct": 1.0, "inserted_pct": 0.5, "deleted_pct": 0.2, "entities": [ENTITY]}
TARGETS = {
    "initial_seconds": 90.0,
    "incremental_seconds": 10.0,
    "peak_rss_mb": 2048.0,
    "initial_stage_work_seconds": 9.0,
    "incremental_stage_work_seconds": 1.0,
}
# The stages whose own work the targets bound (the engine plus the state commit).
STAGE_WORK = tuple(stage.name for stage in (st.NORMALIZE, st.IDENTITY, st.ROWVERSION, st.DELTA, st.PERSIST))


class E2EBenchSettings(BaseSettings):
    """Environment of the e2e benchmark: SYNCFLOW_DATABASE_URL (optional)."""

    model_config = SettingsConfigDict(env_prefix="SYNCFLOW_", extra="ignore")

    # The Postgres server to run on; unset means an embedded server for the run.
    database_url: SecretStr | None = None


# -- memory ------------------------------------------------------------------------------------


def peak_rss_mb(pid: int | None = None) -> float | None:
    """VmHWM (peak resident set since start or the last reset) of a process, in MB."""
    try:
        for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    if pid is None:
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return None


def reset_peak_rss(pid: int | None = None) -> None:
    """Reset the kernel's peak-RSS mark (Linux clear_refs 5) so each phase reports its own peak."""
    # Not Linux, or not allowed: peaks are then cumulative.
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid or 'self'}/clear_refs").write_text("5")


# -- database ----------------------------------------------------------------------------------


# -- stand-ins ---------------------------------------------------------------------------------


class StandIns:
    """Both stand-ins in subprocesses, and the Dagster resources pointed at them."""

    def __init__(
        self,
        rows: int,
        seed: int,
        database_url: str,
        *apismith_args: str,
        schedulehub_args: tuple[str, ...] = (),
    ) -> None:
        self.secret = secrets.token_urlsafe(16)
        self.apismith, self.apismith_url = start_stand_in(
            "apismith", CLIENT_ID, self.secret, "--rows", str(rows), "--seed", str(seed), *apismith_args
        )
        self.schedulehub, self.schedulehub_url = start_stand_in(
            "schedulehub", CLIENT_ID, self.secret, *schedulehub_args
        )
        self.database_url = database_url

    def wait(self) -> None:
        wait_until_healthy(self.apismith_url, self.apismith, STARTUP_TIMEOUT_S)
        wait_until_healthy(self.schedulehub_url, self.schedulehub, STARTUP_TIMEOUT_S, path="/v1/resources")

    def stop(self) -> None:
        for process in (self.apismith, self.schedulehub):
            stop(process)

    def resources(self) -> dict[str, Any]:
        """The code location's resources pointed at the stand-ins (the shell's tunables apply)."""
        from syncflow_dagster.defs.configuration import build_resources, deployment_environment

        started = deployment_environment(
            database_url=self.database_url,
            apismith_url=self.apismith_url,
            apismith_secret=self.secret,
            schedulehub_url=self.schedulehub_url,
            schedulehub_secret=self.secret,
            client_id=CLIENT_ID,
        )
        return build_resources({**os.environ, **started})

    def reset_peaks(self) -> None:
        # Give back what the previous phase (and its correctness check) freed but
        # the allocators still hold, so the mark starts from what is really in use.
        gc.collect()
        pa.default_memory_pool().release_unused()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        for pid in (None, self.apismith.pid, self.schedulehub.pid):
            reset_peak_rss(pid)

    def peaks(self) -> dict[str, float | None]:
        return {
            "peak_rss_mb": peak_rss_mb(),
            "apismith_peak_rss_mb": peak_rss_mb(self.apismith.pid),
            "schedulehub_peak_rss_mb": peak_rss_mb(self.schedulehub.pid),
        }


# -- phases ------------------------------------------------------------------------------------


def run_sync(
    entity: str, day: dt.date, resources: dict[str, Any], instance: Any, profile_to: Path | None = None
) -> dict[str, Any]:
    """One Dagster sync of `entity`; with `profile_to`, under pyinstrument, its text report written there."""
    from syncflow_dagster.defs.runner import materialize_sync, report_of

    profiler = None
    if profile_to is not None:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.002)
        profiler.start()
    started = time.perf_counter()
    result = materialize_sync(entity, day, resources=resources, instance=instance)
    seconds = time.perf_counter() - started
    if profiler is not None and profile_to is not None:
        profiler.stop()
        profile_to.write_text(profiler.output_text(unicode=False), encoding="utf-8")
    report = report_of(result)
    if not result.success or not report:
        raise RuntimeError(f"sync of {entity} for {day} did not succeed")
    report["wall_seconds"] = seconds
    return report


def phase_figures(name: str, rows: int, seconds: float, stage_seconds: dict[str, float]) -> dict[str, Any]:
    work = sum(float(stage_seconds.get(s, 0.0)) for s in STAGE_WORK)
    return {
        "phase": name,
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds) if seconds else None,
        "stage_seconds": {k: round(float(v), 3) for k, v in stage_seconds.items()},
        "stage_work_seconds": round(work, 3),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def ancestors_of(entity: str) -> list[str]:
    from syncflow_dagster.defs.assets import CATALOG

    return list(CATALOG.ancestors_of(entity))


# -- correctness -------------------------------------------------------------------------------


def check_target_equals_source(
    stand_ins: StandIns, resources: dict[str, Any], database_url: str
) -> dict[str, int]:
    """ScheduleHub's work orders against APISmith's snapshot through the engine; raises on any difference."""
    from syncflow_dagster.defs.assets import CATALOG
    from syncflow_dagster.engine import columns as c
    from syncflow_dagster.engine.identity import add_identity
    from syncflow_dagster.engine.normalize import normalize

    entity = CATALOG.entity(ENTITY)
    response = httpx.get(
        f"{stand_ins.apismith_url}/admin/snapshot/{entity.source}",
        headers={"Accept": "application/vnd.apache.arrow.stream"},
        timeout=600,
    )
    response.raise_for_status()
    snapshot = pa.ipc.open_stream(response.content).read_all()
    normalized = normalize(entity, snapshot)
    source = add_identity(entity, normalized.rows)
    refused = set(normalized.rejected["business_key"].to_pylist()) if normalized.rejected.num_rows else set()

    async def read_back() -> pa.Table:
        async with resources["schedulehub"].client() as client:
            table: pa.Table = await client.read_all(entity.resource)
            return table

    held = asyncio.run(read_back())
    engine = sa.create_engine(sa.make_url(database_url).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            failed = {
                row[0]
                for row in conn.execute(
                    sa.text(
                        "SELECT bk FROM syncflow.failed_records WHERE entity = :e AND resolved_at IS NULL"
                    ),
                    {"e": ENTITY},
                )
            }
            pending = {
                row[0]
                for row in conn.execute(
                    sa.text("SELECT bk FROM syncflow.pending_children WHERE entity = :e"), {"e": ENTITY}
                )
            }
    finally:
        engine.dispose()

    source_keys = set(source[c.BK].to_pylist())
    held_keys = set(held["external_key"].to_pylist()) if held.num_rows else set()
    problems: list[str] = []
    if len(held_keys) != held.num_rows:
        problems.append(f"ScheduleHub holds {held.num_rows - len(held_keys)} duplicate keys")
    extra = held_keys - source_keys - refused
    if extra:
        problems.append(
            f"{len(extra)} keys in ScheduleHub that APISmith no longer has, e.g. {sorted(map(str, extra))[:3]}"
        )
    missing = source_keys - held_keys
    unaccounted = missing - failed - pending
    if unaccounted:
        problems.append(
            f"{len(unaccounted)} source keys neither in ScheduleHub nor failed nor pending, "
            f"e.g. {sorted(map(str, unaccounted))[:3]}"
        )
    refused_unrecorded = refused - failed - held_keys
    if refused_unrecorded:
        problems.append(f"{len(refused_unrecorded)} refused source keys without a failed record")
    # Values: the rows in both, compared on text attributes.
    both = source.select([c.BK, *COMPARED]).join(
        held.select(["external_key", *COMPARED]).rename_columns([c.BK, *[f"held.{n}" for n in COMPARED]]),
        keys=c.BK,
        join_type="inner",
    )
    for name in COMPARED:
        same = pc.fill_null(
            pc.equal(both[name], both[f"held.{name}"]),
            pc.and_(pc.is_null(both[name]), pc.is_null(both[f"held.{name}"])),
        )
        differing = both.filter(pc.invert(same))
        if differing.num_rows:
            sample = differing.select([c.BK, name, f"held.{name}"]).slice(0, 3).to_pylist()
            problems.append(f"{differing.num_rows} rows differ in {name}, e.g. {sample}")
    if problems:
        raise AssertionError("ScheduleHub does not equal the source: " + "; ".join(problems))
    return {
        "source_keys": len(source_keys),
        "held": held.num_rows,
        "refused_by_normalize": len(refused),
        "failed_records": len(failed),
        "pending_children": len(pending),
        "compared_rows": both.num_rows,
    }


# -- the run -----------------------------------------------------------------------------------


def run(rows: int, seed: int, server_url: str | None, profile_dir: Path | None = None) -> dict[str, Any]:
    import dagster as dg

    from syncflow_dagster.defs.runner import sync_all

    phases: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    with (
        private_database(server_url, "syncflow_bench_e2e") as url,
        tempfile.TemporaryDirectory(prefix="syncflow-e2e-home-") as home,
    ):
        stand_ins = StandIns(rows, seed, url)
        try:
            stand_ins.wait()
            resources = stand_ins.resources()
            # No telemetry banner in the benchmark's output.
            instance = dg.DagsterInstance.local_temp(home, overrides={"telemetry": {"enabled": False}})
            day = dt.datetime.now(dt.UTC).date()

            stand_ins.reset_peaks()
            started = time.perf_counter()
            parent_reports = sync_all(
                day, resources=resources, instance=instance, entities=ancestors_of(ENTITY)
            )
            if not all(r.success for r in parent_reports.values()):
                raise RuntimeError("a parent sync failed")
            from syncflow_dagster.defs.runner import report_of

            parent_rows = sum(int(report_of(r).get("fetched", 0)) for r in parent_reports.values())
            parents = phase_figures("parents", parent_rows, time.perf_counter() - started, {})
            parents["entities"] = list(parent_reports)
            parents.update(stand_ins.peaks())
            phases.append(parents)

            stand_ins.reset_peaks()
            report = run_sync(ENTITY, day, resources, instance, _profile_path(profile_dir, rows, "initial"))
            initial = phase_figures(
                "initial", int(report["fetched"]), report["wall_seconds"], report["stage_seconds"]
            )
            initial["counts"] = {k: v for k, v in report.items() if isinstance(v, int)}
            initial.update(stand_ins.peaks())
            phases.append(initial)
            checks["initial"] = check_target_equals_source(stand_ins, resources, url)

            applied = httpx.post(
                f"{stand_ins.apismith_url}/admin/changesets",
                json={**CHANGE_SET, "seed": seed + 1},
                timeout=600,
            )
            applied.raise_for_status()
            stand_ins.reset_peaks()
            day = dt.datetime.now(dt.UTC).date()
            report = run_sync(
                ENTITY, day, resources, instance, _profile_path(profile_dir, rows, "incremental")
            )
            changed = int(report["fetched"]) + int(report.get("tombstones", 0))
            incremental = phase_figures(
                "incremental", changed, report["wall_seconds"], report["stage_seconds"]
            )
            incremental["counts"] = {k: v for k, v in report.items() if isinstance(v, int)}
            incremental["change_set"] = applied.json()["applied"]
            incremental.update(stand_ins.peaks())
            phases.append(incremental)
            checks["incremental"] = check_target_equals_source(stand_ins, resources, url)
        finally:
            stand_ins.stop()
    by_phase = {p["phase"]: p for p in phases}
    met = {
        "initial_seconds": by_phase["initial"]["seconds"] <= TARGETS["initial_seconds"],
        "incremental_seconds": by_phase["incremental"]["seconds"] <= TARGETS["incremental_seconds"],
        "peak_rss_mb": max(float(p["peak_rss_mb"] or 0) for p in phases) <= TARGETS["peak_rss_mb"],
        "initial_stage_work_seconds": by_phase["initial"]["stage_work_seconds"]
        <= TARGETS["initial_stage_work_seconds"],
        "incremental_stage_work_seconds": by_phase["incremental"]["stage_work_seconds"]
        <= TARGETS["incremental_stage_work_seconds"],
    }
    return {
        "benchmark": "e2e",
        "rows": rows,
        "seed": seed,
        "cpu_count": os.cpu_count(),
        "chunk_size": os.environ.get("SYNCFLOW_CHUNK_SIZE"),
        "phases": by_phase,
        "checks": checks,
        "targets": TARGETS,
        "targets_met": met,
    }


def _profile_path(directory: Path | None, rows: int, phase: str) -> Path | None:
    if directory is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"e2e-{rows}-{phase}.txt"


def print_table(result: dict[str, Any]) -> None:
    header = f"{'phase':<12}{'stage':<14}{'rows':>10}{'seconds':>10}{'rows/s':>12}{'RSS MB':>9}{'APISmith':>10}{'Hub':>8}"
    print(header)
    for phase in result["phases"].values():
        print(
            f"{phase['phase']:<12}{'(total)':<14}{phase['rows']:>10,}{phase['seconds']:>10.2f}"
            f"{phase['rows_per_s'] or 0:>12,}{phase['peak_rss_mb'] or 0:>9.0f}"
            f"{phase['apismith_peak_rss_mb'] or 0:>10.0f}{phase['schedulehub_peak_rss_mb'] or 0:>8.0f}"
        )
        for stage, seconds in phase["stage_seconds"].items():
            rate = round(phase["rows"] / seconds) if seconds else 0
            print(f"{'':<12}{stage:<14}{'':>10}{seconds:>10.2f}{rate:>12,}")
        if phase["stage_seconds"]:
            print(f"{'':<12}{'stage work':<14}{'':>10}{phase['stage_work_seconds']:>10.2f}")
        print(f"{'':<12}load average {phase['load_average']}")
    for name, ok in result["targets_met"].items():
        print(f"target {name} <= {result['targets'][name]}: {'met' if ok else 'MISSED'}")
    print(f"checks: {json.dumps(result['checks'])}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks e2e", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="work orders in the APISmith stand-in")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--database-url", help="Postgres server (default $SYNCFLOW_DATABASE_URL, else embedded)"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--profile-dir",
        type=Path,
        help="profile the initial and incremental syncs with pyinstrument into DIR",
    )
    args = parser.parse_args(argv)
    if args.rows < 1000:
        parser.error("--rows must be at least 1000 (the change set is a share of it)")
    configured = E2EBenchSettings().database_url
    server = args.database_url or (configured.get_secret_value() if configured else None)
    result = run(args.rows, args.seed, server, args.profile_dir)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
