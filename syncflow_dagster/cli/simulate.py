"""`syncflow simulate ...`: run the APISmith and ScheduleHub stand-ins and apply change sets.

- `simulate apismith --port P --rows N --seed S [--source-dir D] [--history-days K]`
  serves the seeded dataset (or a folder of <source>.parquet/.csv) on 127.0.0.1.
  It accepts the client APISMITH_CLIENT_ID (default syncflow) with the secret
  APISMITH_CLIENT_SECRET (the same variables the client reads); on loopback an
  unset secret is DEV_CLIENT_SECRET, on any other interface it must be set.
- `simulate schedulehub --port P [--data-dir D]` serves ScheduleHub for
  SCHEDULEHUB_CLIENT_ID / SCHEDULEHUB_CLIENT_SECRET, its records kept in D
  (a restart on the same D keeps them) or in a temporary directory removed at exit.
- `simulate changes --url U --updated 1 --inserted 0.5 --deleted 0.2` applies a
  generated change set (percentages of live records) through APISmith's admin API.
- `simulate history-source --rows N --out D` writes a source folder of N work
  orders whose changes spread over a year (and their parents), which
  `simulate apismith --source-dir D` serves from disk.
"""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.table import Table

simulate_app = typer.Typer(help="Run the partner stand-ins and change their data.", no_args_is_help=True)
console = Console(stderr=True)

Host = Annotated[str, typer.Option(help="Interface to bind; keep 127.0.0.1 unless you mean to expose it.")]


# The client secret a stand-in on loopback accepts when none is set: a published dev value, no secret
# at all, so that `syncflow simulate ...` works as the docs show it. A stand-in bound to any other
# interface needs a real one.
DEV_CLIENT_SECRET = "syncflow-dev-secret"  # noqa: S105 (published dev value, loopback only)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _secret(prefix: str, host: str) -> tuple[str, str]:
    client_id = os.environ.get(f"{prefix}_CLIENT_ID") or "syncflow"
    secret = os.environ.get(f"{prefix}_CLIENT_SECRET")
    if secret:
        return client_id, secret
    if host in LOOPBACK:
        console.print(
            f"{prefix}_CLIENT_SECRET is not set: on loopback the stand-in accepts client {client_id!r} "
            f"with the dev secret {DEV_CLIENT_SECRET!r} (give the SyncFlow client the same values)."
        )
        return client_id, DEV_CLIENT_SECRET
    console.print(
        f"[red]{prefix}_CLIENT_SECRET is not set.[/red] A stand-in on {host} (not loopback) needs one: "
        f"set {prefix}_CLIENT_ID (default syncflow) and {prefix}_CLIENT_SECRET, and give the "
        "SyncFlow client the same values."
    )
    raise typer.Exit(2)


@simulate_app.command("apismith")
def simulate_apismith(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8001,
    rows: Annotated[int, typer.Option(help="Rows of the largest entity (work orders).")] = 10_000,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic dataset.")] = 0,
    source_dir: Annotated[
        Path | None, typer.Option(help="Serve this folder of <source>.parquet/.csv files instead.")
    ] = None,
    history_days: Annotated[int, typer.Option(help="Spread change times over this many past days.")] = 0,
    catalog: Annotated[
        Path | None, typer.Option(help="Catalog YAML (default: SYNCFLOW_CATALOG_PATH).")
    ] = None,
    host: Host = "127.0.0.1",
) -> None:
    """Serve the APISmith stand-in (blocks until interrupted)."""
    from syncflow_dagster.catalog.loader import CatalogError, load_catalog
    from syncflow_dagster.simulators.apismith import create_app
    from syncflow_dagster.simulators.serve import run_server

    client_id, secret = _secret("APISMITH", host)
    try:
        app = create_app(
            catalog=load_catalog(catalog),
            rows=rows,
            seed=seed,
            source_dir=source_dir,
            history_days=history_days,
            clients={client_id: secret},
        )
    except (CatalogError, ValueError) as exc:
        console.print(f"[red]cannot start APISmith:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"APISmith stand-in on http://{host}:{port} (client {client_id!r})")
    run_server(app, host, port)


@simulate_app.command("schedulehub")
def simulate_schedulehub(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8002,
    rate_limit: Annotated[
        float | None, typer.Option(help="Requests per second before 429 (default: no limit).")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Keep the records in this directory (created if missing); a restart on it keeps them. "
            "Default: a temporary directory removed when the stand-in stops."
        ),
    ] = None,
    host: Host = "127.0.0.1",
) -> None:
    """Serve the ScheduleHub stand-in (blocks until interrupted)."""
    from syncflow_dagster.simulators.hub_store import DataDirInUseError, HubStore
    from syncflow_dagster.simulators.schedulehub import create_app
    from syncflow_dagster.simulators.serve import run_server

    client_id, secret = _secret("SCHEDULEHUB", host)
    if data_dir is not None:
        try:
            # Refuse a directory another stand-in holds now, not after uvicorn has started.
            HubStore(data_dir).open().close()
        except (DataDirInUseError, OSError) as exc:
            console.print(f"[red]cannot start ScheduleHub:[/red] {exc}")
            raise typer.Exit(2) from None
    app = create_app(clients={client_id: secret}, rate_limit_per_s=rate_limit, data_dir=data_dir)
    where = f"records in {data_dir}" if data_dir is not None else "records in a temporary directory"
    console.print(f"ScheduleHub stand-in on http://{host}:{port} (client {client_id!r}, {where})")
    run_server(app, host, port)


@simulate_app.command("changes")
def simulate_changes(
    url: Annotated[
        str | None, typer.Option(help="APISmith stand-in base URL (default: APISMITH_BASE_URL).")
    ] = None,
    updated: Annotated[float, typer.Option(help="Percent of live records updated.")] = 1.0,
    inserted: Annotated[float, typer.Option(help="Percent of live records inserted.")] = 0.5,
    deleted: Annotated[float, typer.Option(help="Percent of live records deleted (cascading).")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the change set.")] = 0,
    entity: Annotated[
        list[str] | None, typer.Option(help="Limit to this entity or source (repeatable).")
    ] = None,
) -> None:
    """Apply a generated change set to a running APISmith stand-in and print what changed."""
    base = url or os.environ.get("APISMITH_BASE_URL")
    if not base:
        console.print("[red]no APISmith URL:[/red] pass --url or set APISMITH_BASE_URL")
        raise typer.Exit(2)
    body = {
        "updated_pct": updated,
        "inserted_pct": inserted,
        "deleted_pct": deleted,
        "seed": seed,
        "entities": entity or None,
    }
    try:
        response = httpx.post(f"{base.rstrip('/')}/admin/changesets", json=body, timeout=120.0)
    except httpx.HTTPError as exc:
        console.print(f"[red]APISmith at {base} unreachable:[/red] {type(exc).__name__}")
        raise typer.Exit(1) from None
    if response.status_code != 200:
        console.print(f"[red]change set refused (HTTP {response.status_code}):[/red] {response.text[:500]}")
        raise typer.Exit(1)
    summary = response.json()
    table = Table(title=f"change set applied (rowversion now {summary['current_rowversion']})")
    for column in ("source", "updated", "inserted", "deleted", "cascaded", "not found"):
        table.add_column(column, justify="left" if column == "source" else "right")
    for source, counts in summary["applied"].items():
        table.add_row(
            source,
            str(counts["updated"]),
            str(counts["inserted"]),
            str(counts["deleted"]),
            str(counts.get("cascaded_deletes", 0)),
            str(counts["delete_not_found"]),
        )
    Console().print(table)


@simulate_app.command("history-source")
def simulate_history_source(
    out: Annotated[Path, typer.Option(help="New folder to write (must be empty or absent).")],
    rows: Annotated[int, typer.Option(min=1, help="Work orders to write.")] = 1_000_000,
    start: Annotated[
        str | None,
        typer.Option(
            help="First partition day, YYYY-MM-DD (default: SYNCFLOW_PARTITIONS_START, 2025-01-01)."
        ),
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="Days from START over which the changes spread.")] = 365,
    before_share: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of work orders changed before START.")
    ] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed of the data.")] = 0,
    catalog: Annotated[
        Path | None, typer.Option(help="Catalog YAML (default: SYNCFLOW_CATALOG_PATH).")
    ] = None,
) -> None:
    """Write a source folder of ROWS work orders whose changes spread over DAYS days (for the history benchmark)."""
    from syncflow_dagster.catalog.loader import CatalogError, load_catalog
    from syncflow_dagster.simulators.datagen import DatagenError
    from syncflow_dagster.simulators.history_source import write_history_source

    first = start or os.environ.get("SYNCFLOW_PARTITIONS_START") or "2025-01-01"
    try:
        day = date.fromisoformat(first)
    except ValueError:
        console.print(f"[red]--start {first!r} is not a date (YYYY-MM-DD)[/red]")
        raise typer.Exit(2) from None
    try:
        written = write_history_source(
            load_catalog(catalog), out, rows=rows, start=day, days=days, before_share=before_share, seed=seed
        )
    except (CatalogError, DatagenError) as exc:
        console.print(f"[red]cannot write the history source:[/red] {exc}")
        raise typer.Exit(2) from None
    table = Table(title=f"history source in {written.folder}")
    table.add_column("source")
    table.add_column("rows", justify="right")
    for source, count in written.rows.items():
        table.add_row(source, str(count))
    Console().print(table)
    console.print(
        f"work orders changed {written.first_changed_at:%Y-%m-%d} .. {written.last_changed_at:%Y-%m-%d}; "
        f"serve it with: syncflow simulate apismith --source-dir {written.folder}"
    )
