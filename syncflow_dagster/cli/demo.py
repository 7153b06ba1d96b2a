"""`syncflow demo`: an end-to-end sync on a machine with nothing but Python, then cleaned up.

It starts an embedded Postgres (unless SYNCFLOW_DATABASE_URL is set) and both
stand-ins on loopback, runs the initial sync of every entity through Dagster
(parents first), applies a change set through APISmith's admin API, runs the
incremental sync, and prints one table per phase. Everything it started is
stopped on success, on error and on Ctrl-C (an ExitStack unwinds in reverse).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

# Piped or in CI, rich would assume 80 columns and abbreviate the summary's
# headers; 120 fits the table whole.
console = Console(width=None if sys.stdout.isatty() else 120)

SUMMARY_COLUMNS = ("fetched", "insert", "update", "delete", "skip", "pending", "failed", "delivered")
CHANGE_SET = {"updated_pct": 5.0, "inserted_pct": 2.0, "deleted_pct": 1.0}


class DemoError(Exception):
    """A demo step failed; the message says which and why."""


@dataclass(frozen=True)
class EntityOutcome:
    entity: str
    counts: dict[str, int]
    seconds: float


@dataclass
class DemoEnvironment:
    """What the demo started: URLs and credentials of the stand-ins, the database, the Dagster home."""

    database_url: str
    apismith_url: str
    schedulehub_url: str
    client_secrets: dict[str, str]
    dagster_home: Path
    workdir: Path

    def resources(self) -> dict[str, Any]:
        """The code location's resources pointed at what the demo started (the shell's tunables apply)."""
        from syncflow_dagster.defs.configuration import build_resources, deployment_environment

        started = deployment_environment(
            database_url=self.database_url,
            apismith_url=self.apismith_url,
            apismith_secret=self.client_secrets["apismith"],
            schedulehub_url=self.schedulehub_url,
            schedulehub_secret=self.client_secrets["schedulehub"],
        )
        return build_resources({**os.environ, **started})


def start_environment(stack: ExitStack, rows: int, seed: int, keep: bool) -> DemoEnvironment:
    """Start Postgres (embedded if needed) and both stand-ins; register their shutdown on `stack`."""
    from syncflow_dagster.simulators import apismith, schedulehub
    from syncflow_dagster.simulators.serve import start_server
    from syncflow_dagster.store.embedded import start_embedded_postgres

    if keep:
        workdir = Path(tempfile.mkdtemp(prefix="syncflow-demo-"))
    else:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="syncflow-demo-")))
    database_url = os.environ.get("SYNCFLOW_DATABASE_URL")
    if not database_url:
        server = start_embedded_postgres(workdir / "pgdata", keep_data=keep)
        stack.callback(server.stop)
        database_url = server.url
    client_secrets = {"apismith": secrets.token_urlsafe(24), "schedulehub": secrets.token_urlsafe(24)}
    api = start_server(
        apismith.create_app(rows=rows, seed=seed, clients={"syncflow": client_secrets["apismith"]})
    )
    stack.callback(api.stop)
    hub = start_server(schedulehub.create_app(clients={"syncflow": client_secrets["schedulehub"]}))
    stack.callback(hub.stop)
    home = workdir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return DemoEnvironment(database_url, api.url, hub.url, client_secrets, home, workdir)


def outcome_of(entity: str, report: Mapping[str, Any], seconds: float) -> EntityOutcome:
    """Counts of one entity's sync in the summary's vocabulary, from the sync_report metadata."""
    from syncflow_dagster.service.store_views import normalise_counts

    numeric = {k: v for k, v in report.items() if isinstance(v, int) and not isinstance(v, bool)}
    return EntityOutcome(entity, normalise_counts(numeric), round(seconds, 2))


def sync_every_entity(
    env: DemoEnvironment, day: dt.date, instance: Any, on_entity: Callable[[str, bool], None]
) -> list[EntityOutcome]:
    """One sync run per entity for `day`, parents before children, through Dagster."""
    from syncflow_dagster.catalog import default_catalog
    from syncflow_dagster.defs import runner

    resources = env.resources()
    outcomes = []
    for entity in default_catalog().topological_order:
        on_entity(entity, False)
        started = time.perf_counter()
        # Dagster's run logger writes every event to stderr at DEBUG; keep it in a
        # file so the progress bars stay readable (--keep keeps the file).
        with (env.workdir / "dagster-runs.log").open("a") as log, contextlib.redirect_stderr(log):
            result = runner.materialize_sync(
                entity, day, resources=resources, instance=instance, raise_on_error=False, log_level="WARNING"
            )
        if not result.success:
            raise DemoError(f"the sync of {entity} for {day} failed: {_first_failure(result)}")
        outcomes.append(outcome_of(entity, runner.report_of(result), time.perf_counter() - started))
        on_entity(entity, True)
    return outcomes


def _first_failure(result: Any) -> str:
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data.error is not None:
            error = event.step_failure_data.error
            # Retries wrap the real error; the innermost cause says what went wrong.
            while error.cause is not None:
                error = error.cause
            return f"step {event.step_key}: {error.message.strip()[:300]}"
    return "see the Dagster run's events"


def apply_change_set(apismith_url: str, seed: int) -> dict[str, Any]:
    response = httpx.post(f"{apismith_url}/admin/changesets", json={**CHANGE_SET, "seed": seed}, timeout=120)
    if response.status_code != 200:
        raise DemoError(
            f"APISmith refused the change set (HTTP {response.status_code}): {response.text[:300]}"
        )
    body: dict[str, Any] = response.json()
    return body


def summary_table(title: str, outcomes: list[EntityOutcome]) -> Table:
    table = Table(title=title)
    table.add_column("entity", no_wrap=True, min_width=17)
    for name in (*SUMMARY_COLUMNS, "seconds"):
        table.add_column(name, justify="right")
    totals = dict.fromkeys(SUMMARY_COLUMNS, 0)
    for outcome in outcomes:
        for name in SUMMARY_COLUMNS:
            totals[name] += outcome.counts.get(name, 0)
        table.add_row(
            outcome.entity,
            *(str(outcome.counts.get(n, 0)) for n in SUMMARY_COLUMNS),
            f"{outcome.seconds:.2f}",
        )
    table.add_row(
        "[bold]total[/bold]",
        *(f"[bold]{totals[n]}[/bold]" for n in SUMMARY_COLUMNS),
        f"[bold]{sum(o.seconds for o in outcomes):.2f}[/bold]",
    )
    return table


def run_demo(rows: int, seed: int, keep: bool) -> tuple[list[EntityOutcome], list[EntityOutcome]]:
    """Both phases; returns (initial, incremental) outcomes. Everything started is stopped on return."""
    import dagster as dg

    day = dt.datetime.now(dt.UTC).date()
    with ExitStack() as stack:
        progress = stack.enter_context(
            Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                console=console,
                transient=False,
            )
        )
        setup = progress.add_task("starting Postgres and the stand-ins", total=1)
        env = start_environment(stack, rows, seed, keep)
        progress.update(setup, completed=1, description="Postgres and stand-ins up")
        instance = stack.enter_context(dg.DagsterInstance.local_temp(tempdir=str(env.dagster_home)))

        from syncflow_dagster.catalog import default_catalog

        total = len(default_catalog().topological_order)
        phases: list[list[EntityOutcome]] = []
        for phase in ("initial sync", "incremental sync"):
            if phase == "incremental sync":
                applied = apply_change_set(env.apismith_url, seed)
                progress.console.print(
                    f"change set applied; APISmith at rowversion {applied['current_rowversion']}"
                )
            task = progress.add_task(phase, total=total)

            def on_entity(entity: str, done: bool, task: Any = task, phase: str = phase) -> None:
                progress.update(task, description=f"{phase}: {entity}", advance=1 if done else 0)

            outcomes = sync_every_entity(env, day, instance, on_entity)
            progress.update(task, description=f"{phase}: done")
            phases.append(outcomes)
        if keep:
            console.print(
                f"kept: {env.workdir} (Dagster home {env.dagster_home}); "
                + ("embedded Postgres data in pgdata/" if not os.environ.get("SYNCFLOW_DATABASE_URL") else "")
            )
        return phases[0], phases[1]


def demo(
    rows: Annotated[int, typer.Option(min=10, max=5_000_000, help="Rows of the largest entity.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the dataset and of the change set.")] = 0,
    keep: Annotated[
        bool, typer.Option(help="Keep the temp directory (Dagster home, embedded data).")
    ] = False,
) -> None:
    """Initial and incremental sync of every entity on embedded defaults, with a summary per entity."""
    try:
        initial, incremental = run_demo(rows, seed, keep)
    except DemoError as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        raise typer.Exit(1) from None
    console.print(summary_table("initial sync", initial))
    console.print(summary_table("incremental sync (after the change set)", incremental))
    console.print(
        "Next: [bold]syncflow dev[/bold] for the Dagster UI with sensors and schedules on, "
        "[bold]syncflow serve[/bold] for the monitoring API, docs/operations.md for production."
    )
