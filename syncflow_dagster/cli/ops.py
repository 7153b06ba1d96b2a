"""Operator commands: `syncflow status`, `failed list|retry`, `pending list`, `db upgrade`, `serve`.

They read SYNCFLOW_DATABASE_URL (and SYNCFLOW_DAGSTER_URL to launch the retry
job) through `ServiceSettings`, the same settings the HTTP API uses, so the
command and the API always look at the same place.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    import sqlalchemy as sa

    from syncflow_dagster.service.settings import ServiceSettings

console = Console()

failed_app = typer.Typer(help="Records ScheduleHub refused: list them, retry them.", no_args_is_help=True)
pending_app = typer.Typer(help="Children waiting for their parent.", no_args_is_help=True)
db_app = typer.Typer(help="SyncFlow's Postgres schema.", no_args_is_help=True)

Limit = Annotated[int, typer.Option(min=1, max=10_000, help="Rows to show.")]
Offset = Annotated[int, typer.Option(min=0, help="Rows to skip.")]
EntityFilter = Annotated[str | None, typer.Option(help="Only this entity.")]


def _settings() -> ServiceSettings:
    # Imported lazily: keeps `syncflow --help` fast.
    from syncflow_dagster.service.settings import ServiceSettings

    return ServiceSettings()  # type: ignore[call-arg]


def _engine() -> sa.Engine:
    from syncflow_dagster.store.database import make_engine

    return make_engine(_settings().database_url.get_secret_value(), connect_args={"connect_timeout": 10})


def _when(value: dt.datetime | None) -> str:
    return "-" if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _known_entity(entity: str | None) -> None:
    from syncflow_dagster.catalog import default_catalog

    catalog = default_catalog()
    if entity is not None and entity not in catalog.by_name:
        raise ValueError(f"unknown entity {entity!r}; the catalog has {', '.join(catalog.topological_order)}")


def status() -> None:
    """Per entity: the last sync, its counts, pending children and open failed records."""
    from syncflow_dagster.catalog import default_catalog
    from syncflow_dagster.service.store_views import entity_stats

    engine = _engine()
    try:
        with engine.connect() as conn:
            stats = entity_stats(conn, list(default_catalog().topological_order))
    finally:
        engine.dispose()
    table = Table(title="SyncFlow status (times UTC)")
    columns = ("entity", "last sync", "status", "fetched", "ins", "upd", "del", "skip", "delivered", "failed")
    for name in (*columns, "pending", "open failures", "last success"):
        table.add_column(name, justify="left" if name in ("entity", "last sync", "status") else "right")
    for view in stats.values():
        last = view.last_batch
        counts = last.counts if last else {}
        table.add_row(
            view.entity,
            _when(last.started_at if last else None),
            last.status if last else "never",
            *(
                str(counts.get(k, 0))
                for k in ("fetched", "inserted", "updated", "deleted", "skipped", "delivered", "failed")
            ),
            str(view.pending_children),
            str(view.open_failures),
            _when(view.last_success_at),
        )
    console.print(table)


@failed_app.command("list")
def failed_list(
    entity: EntityFilter = None,
    reason: Annotated[str | None, typer.Option(help="Only this reason code.")] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> None:
    """Open failed records, newest first."""
    from syncflow_dagster.service.store_views import failed_records_page

    _known_entity(entity)
    engine = _engine()
    try:
        with engine.connect() as conn:
            page = failed_records_page(conn, entity=entity, reason=reason, limit=limit, offset=offset)
    finally:
        engine.dispose()
    table = Table(title=f"failed records: {len(page.items)} of {page.total} (offset {offset})")
    for name in (
        "entity",
        "business key",
        "reason",
        "class",
        "attempts",
        "last failed",
        "next retry",
        "detail",
    ):
        table.add_column(name, justify="right" if name == "attempts" else "left", overflow="fold")
    for item in page.items:
        table.add_row(
            item["entity"],
            item["bk"],
            item["reason_code"],
            item["reason_class"],
            str(item["attempts"]),
            _when(item["last_failed_at"]),
            _when(item["next_retry_at"]),
            (item["detail"] or "")[:80],
        )
    console.print(table)


@failed_app.command("retry")
def failed_retry(
    entity: Annotated[
        list[str] | None, typer.Option(help="Entity to retry (repeatable); default all.")
    ] = None,
    include_permanent: Annotated[
        bool, typer.Option("--include-permanent", help="Also retry open permanent failures.")
    ] = False,
    include_dead: Annotated[
        bool, typer.Option("--include-dead", help="Also retry failures that gave up (dead).")
    ] = False,
) -> None:
    """Launch the Dagster `retry` job, one run per entity with something to retry (via SYNCFLOW_DAGSTER_URL)."""
    from syncflow_dagster.catalog import default_catalog
    from syncflow_dagster.service.dagster_gateway import DagsterGateway, DagsterRefused, DagsterUnavailable
    from syncflow_dagster.service.store_views import entities_with_retry_work

    for name in entity or []:
        _known_entity(name)
    names = [n for n in default_catalog().topological_order if not entity or n in entity]
    engine = _engine()
    try:
        with_work = entities_with_retry_work(
            engine, include_permanent=include_permanent, include_dead=include_dead
        )
    finally:
        engine.dispose()
    settings = _settings()
    gateway = DagsterGateway(settings.dagster_graphql_url, settings.dagster_location)
    launched, refused = gateway.submit_each(
        [n for n in names if n in with_work],
        lambda name: gateway.submit_retry(
            name, include_permanent=include_permanent, include_dead=include_dead, trigger="cli"
        ),
    )
    if refused and not launched:
        why = "; ".join(f"{r.entity}: {r.detail}" for r in refused)
        raise DagsterUnavailable(why) if refused[0].unavailable else DagsterRefused("retry", why)
    for run in launched:
        console.print(f"retry run of {run.entity} launched: {gateway.base_url}/runs/{run.run_id}")
    for refusal in refused:
        console.print(f"[red]retry of {refusal.entity} not launched:[/red] {refusal.detail}")
    idle = [n for n in names if n not in with_work]
    if idle:
        console.print(f"nothing to retry for: {', '.join(idle)}")


@pending_app.command("list")
def pending_list(entity: EntityFilter = None, limit: Limit = 50, offset: Offset = 0) -> None:
    """Children waiting for a parent, longest-waiting first."""
    from syncflow_dagster.service.store_views import pending_children_page

    _known_entity(entity)
    engine = _engine()
    try:
        with engine.connect() as conn:
            page = pending_children_page(conn, entity=entity, limit=limit, offset=offset)
    finally:
        engine.dispose()
    table = Table(title=f"pending children: {len(page.items)} of {page.total} (offset {offset})")
    for name in ("entity", "business key", "waits for", "parent key", "since"):
        table.add_column(name, overflow="fold")
    for item in page.items:
        table.add_row(
            item["entity"],
            item["bk"],
            item["missing_parent_entity"],
            item["missing_parent_bk"],
            _when(item["since"]),
        )
    console.print(table)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Migrate schema `syncflow` to the newest revision (idempotent, safe to run concurrently)."""
    from syncflow_dagster.store.migrate import current_revision, head_revision, upgrade

    engine = _engine()
    try:
        before = current_revision(engine)
        upgrade(engine)
        after = current_revision(engine)
    finally:
        engine.dispose()
    if before == after:
        console.print(f"schema syncflow already at {after} (head {head_revision()})")
    else:
        console.print(f"schema syncflow upgraded: {before or 'empty'} -> {after}")


def serve(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8080,
    host: Annotated[
        str, typer.Option(help="Interface; keep 127.0.0.1 unless a proxy fronts it.")
    ] = "127.0.0.1",
) -> None:
    """Serve the monitoring & sync HTTP API (OpenAPI at /docs and /redoc)."""
    import uvicorn

    from syncflow_dagster.service.app import create_app

    settings = _settings()
    if settings.api_token is None:
        console.print("[yellow]SYNCFLOW_API_TOKEN is not set: protected routes will answer 503[/yellow]")
    console.print(f"SyncFlow API on http://{host}:{port} (docs at /docs)")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", access_log=False)


def register(app: typer.Typer) -> None:
    """Mount the operator commands on the `syncflow` app."""
    app.command("status")(status)
    app.command("serve")(serve)
    app.add_typer(failed_app, name="failed")
    app.add_typer(pending_app, name="pending")
    app.add_typer(db_app, name="db")
