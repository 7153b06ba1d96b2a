"""History benchmark: one entity's year of changes loaded through the history path on the daemon.

`python -m benchmarks history --rows N --json PATH [--days 365] [--database-url URL] [--keep-source DIR]`

- A source folder is written first (`syncflow simulate history-source`'s code:
  N work orders whose changes spread over `--days` days ending today, a share
  of them older than the first partition day, and their ancestors), and the
  APISmith stand-in serves it from disk (`--source-dir`, Parquet read with
  predicate pushdown). ScheduleHub keeps its records on disk (`--data-dir`).
- Dagster runs as in production (daemon_stack of benchmarks/daemon.py:
  `dagster-webserver` + `dagster-daemon`, the repository's dagster.yaml, the
  configured executor), SYNCFLOW_PARTITIONS_START the first day of the history.
- Phases: `parents` (every ancestor, `history: true`, parents first), `history`
  (work orders, `history: true`: one run over [first day .. today]), then a
  change set on today and `incremental` (work orders, today). Every run is
  queued -> success. While a run goes, its run worker's kernel peak (VmHWM)
  is read every 0.5 s (the worker's pid from the run's "Started process"
  event; its children's resident memory added) and each stand-in's VmHWM is
  read, so `peak_rss_mb` says what the run worker and each stand-in needed.
- ScheduleHub's work orders are compared with the source after the history
  and after the incremental (benchmarks/e2e.py's check; it reads both sides
  whole in this process, after the peaks were taken).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.daemon import Stack, _phase, apply_changes, daemon_stack, run_figures
from benchmarks.e2e import ENTITY, ancestors_of, peak_rss_mb, reset_peak_rss
from benchmarks.e2e import check_target_equals_source as check_work_orders

TARGETS = {
    "history_seconds": 600.0,
    "history_run_worker_peak_rss_mb": 1536.0,
    "standin_peak_rss_mb": 2048.0,
    "history_runs": 1,
}
SAMPLE_S = 0.5
INCREMENTAL_PCT = {"updated_pct": 0.2, "inserted_pct": 0.1, "deleted_pct": 0.05}


class WorkerMemory:
    """The highest resident memory of a run's worker (its VmHWM, plus its children's RSS), sampled while it runs."""

    def __init__(self, instance: Any, run_id: str) -> None:
        self.instance = instance
        self.run_id = run_id
        self.peak_mb = 0.0
        self.pid: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name=f"rss {run_id[:8]}", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        from syncflow_dagster.deploy.run_launcher import run_worker_pid

        process: psutil.Process | None = None
        while not self._stop.wait(SAMPLE_S):
            if process is None:
                found = run_worker_pid(self.instance, self.run_id)
                if found is None:
                    continue
                self.pid = found[0]
                try:
                    process = psutil.Process(self.pid)
                except psutil.NoSuchProcess:
                    return
            try:
                children = sum(child.memory_info().rss for child in process.children(recursive=True))
                # The worker's own peak is the kernel's high-water mark, so a spike
                # between two samples still counts; its children's is their RSS now.
                own = peak_rss_mb(process.pid)
                if own is None:
                    own = process.memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                return
            self.peak_mb = max(self.peak_mb, round(own + children / 2**20, 1))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.peak_mb


def history_phase(stack: Stack, name: str, entities: list[str], **request: Any) -> dict[str, Any]:
    """Launch (parents first), sample every run worker's memory, wait; the phase's figures."""
    started = time.perf_counter()
    for process in (stack.stand_ins.apismith, stack.stand_ins.schedulehub):
        reset_peak_rss(process.pid)
    runs: list[dict[str, Any]] = []
    for _, run_id in stack.launch(entities, **request):
        memory = WorkerMemory(stack.instance, run_id)
        record = stack.wait(run_id)
        figures = run_figures(stack.instance, record)
        figures["run_worker_peak_rss_mb"] = memory.stop()
        runs.append(figures)
    failed = [r for r in runs if r["status"] != "SUCCESS"]
    if failed:
        raise RuntimeError(f"{name}: runs did not succeed: {failed}")
    return _phase(
        name,
        runs,
        time.perf_counter() - started,
        run_worker_peak_rss_mb=max((r["run_worker_peak_rss_mb"] for r in runs), default=None),
        apismith_peak_rss_mb=peak_rss_mb(stack.stand_ins.apismith.pid),
        schedulehub_peak_rss_mb=peak_rss_mb(stack.stand_ins.schedulehub.pid),
    )


def run(
    rows: int, days: int, seed: int, server_url: str | None, executor: str, keep_source: Path | None
) -> dict[str, Any]:
    from syncflow_dagster.catalog import default_catalog
    from syncflow_dagster.simulators.history_source import write_history_source

    today = dt.datetime.now(dt.UTC).date()
    first_day = today - dt.timedelta(days=days - 1)
    phases: dict[str, dict[str, Any]] = {}
    checks: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="syncflow-history-bench-") as scratch:
        source = keep_source or Path(scratch) / "source"
        written_at = time.perf_counter()
        if not (source.exists() and any(source.iterdir())):
            write_history_source(default_catalog(), source, rows=rows, start=first_day, days=days, seed=seed)
        source_seconds = round(time.perf_counter() - written_at, 1)
        # The launcher (this process) validates dates against the same first day as the code location.
        os.environ["SYNCFLOW_PARTITIONS_START"] = first_day.isoformat()
        with daemon_stack(
            rows,
            seed,
            server_url,
            executor,
            "--source-dir",
            str(source),
            schedulehub_args=("--data-dir", str(Path(scratch) / "schedulehub")),
            partitions_start=first_day,
        ) as stack:
            resources = stack.stand_ins.resources()
            phases["parents"] = history_phase(stack, "parents", ancestors_of(ENTITY), history=True)
            phases["history"] = history_phase(stack, "history", [ENTITY], history=True)
            checks["history"] = check_work_orders(stack.stand_ins, resources, stack.state_url)
            applied = apply_changes(stack, seed + 1, entities=[ENTITY], **INCREMENTAL_PCT)
            phases["incremental"] = history_phase(stack, "incremental", [ENTITY])
            phases["incremental"]["change_set"] = applied
            checks["incremental"] = check_work_orders(stack.stand_ins, resources, stack.state_url)
    history = phases["history"]
    standin_peak = max(
        (p[k] or 0.0) for p in phases.values() for k in ("apismith_peak_rss_mb", "schedulehub_peak_rss_mb")
    )
    met = {
        "history_seconds": history["wall_seconds"] <= TARGETS["history_seconds"],
        "history_run_worker_peak_rss_mb": (history["run_worker_peak_rss_mb"] or 0.0)
        <= TARGETS["history_run_worker_peak_rss_mb"],
        "standin_peak_rss_mb": standin_peak <= TARGETS["standin_peak_rss_mb"],
        "history_runs": len(history["runs"]) <= TARGETS["history_runs"],
    }
    return {
        "benchmark": "history",
        "rows": rows,
        "days": days,
        "first_day": first_day.isoformat(),
        "seed": seed,
        "executor": executor,
        "cpu_count": os.cpu_count(),
        "source_written_seconds": source_seconds,
        "phases": phases,
        "checks": checks,
        "targets": TARGETS,
        "targets_met": met,
    }


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| rows | days | phase | runs | queued → end s | run worker peak RSS MB | APISmith MB | ScheduleHub MB "
        "| load (1 min) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for result in results:
        for phase in result["phases"].values():
            seconds = max((r["seconds"] for r in phase["runs"]), default=0.0)
            lines.append(
                f"| {result['rows']:,} | {result['days']} | {phase['phase']} | {len(phase['runs'])} | "
                f"{seconds:.1f} | {phase['run_worker_peak_rss_mb']} | {phase['apismith_peak_rss_mb']} | "
                f"{phase['schedulehub_peak_rss_mb']} | {phase['load_average'][0]} |"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks history", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="work orders in the history")
    parser.add_argument("--days", type=int, default=365, help="days the changes spread over, ending today")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--database-url", help="Postgres server (default $SYNCFLOW_DATABASE_URL, else embedded)"
    )
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--executor", choices=("in_process", "multiprocess"), default="in_process")
    parser.add_argument(
        "--keep-source", type=Path, help="write the source folder here (or reuse it if it holds one)"
    )
    parser.add_argument(
        "--table", type=Path, nargs="+", metavar="JSON", help="print the docs' table and stop"
    )
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table([json.loads(path.read_text()) for path in args.table]))
        return 0
    if args.rows < 1000 or args.days < 2:
        parser.error("--rows must be at least 1000 and --days at least 2")
    from benchmarks.e2e import E2EBenchSettings

    configured = E2EBenchSettings().database_url
    server = args.database_url or (configured.get_secret_value() if configured else None)
    result = run(args.rows, args.days, args.seed, server, args.executor, args.keep_source)
    print(markdown_table([result]))
    for name, ok in result["targets_met"].items():
        print(f"target {name} {result['targets'][name]}: {'met' if ok else 'MISSED'}")
    print("checks:", json.dumps(result["checks"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
