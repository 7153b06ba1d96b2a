"""Operator commands: `syncflow status`, `failed list|retry|resolve|dismiss`, `pending list`, `db upgrade`, `serve`.

They read SYNCFLOW_DATABASE_URL (and SYNCFLOW_DAGSTER_URL to launch the retry
job) through `ServiceSettings`, the same settings the HTTP API uses, so the
command and the API always look at the same place.
"""

from __future__ import annotations

import datetime as dt
import textwrap
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    import sqlalchemy as sa

    from syncflow_dagster.service.settings import ServiceSettings

console = Console()

failed_app = typer.Typer(
    help="Records that could not be delivered: list, retry, resolve or dismiss them.", no_args_is_help=True
)
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


def _known_entity(entity: str | None) -> None:
    from syncflow_dagster.catalog import default_catalog

    catalog = default_catalog()
    if entity is not None and entity not in catalog.by_name:
        raise ValueError(f"unknown entity {entity!r}; the catalog has {', '.join(catalog.topological_order)}")


def _since(value: str | None) -> dt.datetime:
    """The window's start: a UTC date (its midnight) or an ISO datetime; default today 00:00 UTC."""
    if value is None:
        return dt.datetime.combine(dt.datetime.now(dt.UTC).date(), dt.time(), tzinfo=dt.UTC)
    try:
        if len(value) == 10:
            return dt.datetime.combine(dt.date.fromisoformat(value), dt.time(), tzinfo=dt.UTC)
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"--since {value!r}: give a date (YYYY-MM-DD) or an ISO datetime") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


# What `syncflow status` shows per entity at 80 columns (--json has every count).
_STATUS_COUNTS = (
    ("fetch", "fetched"),  # a column heading: the count `fetched`, shortened
    ("ins", "insert"),
    ("upd", "update"),
    ("del", "delete"),
    ("sent", "delivered"),
    ("fail", "failed"),
)


def _status_document(views: dict[str, Any], since: dt.datetime, until: dt.datetime) -> dict[str, Any]:
    entities = []
    for view in views.values():
        last = view.last_batch
        entities.append(
            {
                "entity": view.entity,
                "batches": view.batches,
                "statuses": view.statuses,
                "counts": view.counts,
                "seconds": view.seconds,
                "failed_records_open": view.held_failures,
                "failed_records_dead": view.dead_failures,
                "pending_children": view.pending_children,
                "last_success_at": view.last_success_at,
                "last_batch": None
                if last is None
                else {
                    "batch_id": last.id,
                    "run_id": last.run_id,
                    "kind": last.kind,
                    "status": last.status,
                    "started_at": last.started_at,
                },
            }
        )
    return {"since": since, "until": until, "entities": entities}


def _status_table(document: dict[str, Any]) -> Table:
    from syncflow_dagster.cli.tables import short, table, when

    rows = document["entities"]
    runs: dict[str, int] = {}
    for row in rows:
        for kind, n in row["batches"].items():
            runs[kind] = runs.get(kind, 0) + n
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(runs.items())) or "none"
    title = f"SyncFlow {when(document['since'])} to {when(document['until'])} UTC; batches: {kinds}"
    counts = [label for label, _ in _STATUS_COUNTS]
    grid = table(
        "entity",
        "runs",
        *counts,
        "held",
        "wait",
        "last ok",
        title=title,
        right=("runs", *counts, "held", "wait"),
    )
    for row in rows:
        statuses = row["statuses"]
        bad = statuses.get("failed", 0) + statuses.get("cancelled", 0)
        runs_cell = short(sum(row["batches"].values())) + (f" {bad}✗" if bad else "")
        if statuses.get("running"):
            runs_cell += f" {statuses['running']}▶"
        held = row["failed_records_open"] + row["failed_records_dead"]
        last_ok = row["last_success_at"]
        grid.add_row(
            row["entity"],
            runs_cell,
            *(short(row["counts"].get(name, 0)) for _, name in _STATUS_COUNTS),
            short(held),
            short(row["pending_children"]),
            _recent(last_ok, document["until"]),
        )
    return grid


def _recent(moment: dt.datetime | None, now: dt.datetime) -> str:
    """A time in five characters: HH:MM within the last day, else MM-DD (UTC)."""
    if moment is None:
        return "-"
    utc = moment.astimezone(dt.UTC)
    return utc.strftime("%H:%M") if now - utc < dt.timedelta(hours=24) else utc.strftime("%m-%d")


def status(
    since: Annotated[
        str | None,
        typer.Option(help="Window start: YYYY-MM-DD (UTC midnight) or an ISO datetime; default today."),
    ] = None,
    entity: EntityFilter = None,
    watch: Annotated[
        float | None, typer.Option(min=0.2, help="Refresh every this many seconds (Ctrl-C stops).")
    ] = None,
    count: Annotated[
        int | None, typer.Option(min=1, help="With --watch: stop after this many refreshes.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (every count, exact values).")] = False,
) -> None:
    """Per entity, every batch of the window (sync, retry, reconcile) added up; open failures, waiting children.

    Columns: runs (✗ failed or cancelled, ▶ running), rows fetched, insert,
    update, delete, sent (delivered) and failed in the window; held (failed
    records open or dead) and wait (children waiting for a parent) now; last
    ok, when the entity's last batch succeeded (HH:MM today, else MM-DD, UTC).
    """
    from syncflow_dagster.catalog import default_catalog
    from syncflow_dagster.cli.tables import console as make_console
    from syncflow_dagster.cli.tables import print_json
    from syncflow_dagster.service.store_views import window_totals

    # The catalog first: a wrong catalog is reported even with the database down.
    names = list(default_catalog().topological_order)
    _known_entity(entity)
    start = _since(since)
    out = make_console()
    engine = _engine()

    def document() -> dict[str, Any]:
        until = dt.datetime.now(dt.UTC)
        with engine.connect() as conn:
            views = window_totals(conn, start, None, names)
        if entity is not None:
            views = {entity: views[entity]}
        return _status_document(views, start, until)

    try:
        if watch is None:
            shown = document()
            print_json(shown) if as_json else out.print(_status_table(shown))
            return
        refreshes = 0
        if as_json:
            while count is None or refreshes < count:
                print_json(document())
                refreshes += 1
                if count is None or refreshes < count:
                    time.sleep(watch)
            return
        from rich.live import Live

        with Live(_status_table(document()), console=out, auto_refresh=False) as live:
            refreshes = 1
            while count is None or refreshes < count:
                time.sleep(watch)
                live.update(_status_table(document()), refresh=True)
                refreshes += 1
    except KeyboardInterrupt:
        return
    finally:
        engine.dispose()


def _failure_document(item: dict[str, Any]) -> dict[str, Any]:
    from syncflow_dagster.cli.tables import key_parts

    return {**item, "key": key_parts(item.get("bk"))}


@failed_app.command("list")
def failed_list(
    entity: EntityFilter = None,
    reason: Annotated[str | None, typer.Option(help="Only this reason code.")] = None,
    state: Annotated[
        str | None,
        typer.Option(
            help="Only this state: open, dead, delivered, resolved, dismissed (default: open and dead)."
        ),
    ] = None,
    limit: Limit = 50,
    offset: Offset = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (every field).")] = False,
) -> None:
    """Failed records that hold their key (open and dead), newest first; each with its whole detail."""
    from syncflow_dagster.cli.tables import console as make_console
    from syncflow_dagster.cli.tables import print_json, shown_key, when
    from syncflow_dagster.service.store_views import failed_records_page
    from syncflow_dagster.store.schema import FAILURE_STATES

    _known_entity(entity)
    if state is not None and state not in FAILURE_STATES:
        raise ValueError(f"--state {state!r} is not one of {', '.join(FAILURE_STATES)}")
    engine = _engine()
    try:
        with engine.connect() as conn:
            page = failed_records_page(
                conn, entity=entity, reason=reason, limit=limit, offset=offset, state=state
            )
    finally:
        engine.dispose()
    if as_json:
        print_json(
            {
                "total": page.total,
                "limit": limit,
                "offset": offset,
                "items": [_failure_document(i) for i in page.items],
            }
        )
        return
    out = make_console()
    out.print(f"failed records: {len(page.items)} of {page.total} (offset {offset}), newest first; times UTC")
    for item in page.items:
        # One block per record: the detail is whole, wrapped, never cut.
        if item["next_retry_at"]:
            retry = f"next retry {when(item['next_retry_at'])}"
        elif item["state"] == "open":
            retry = "waits for a person (permanent)"
        elif item["state"] == "dead":
            retry = "gave up; retried only on request"
        else:
            retry = "closed"
        out.print(
            f"[bold]{item['entity']}[/bold] {shown_key(item['bk'])}  {item['reason_code']} "
            f"({item['reason_class']}, {item['state']})  attempt {item['attempts']}",
            soft_wrap=False,
        )
        out.print(f"  failed {when(item['last_failed_at'])} (first {when(item['first_failed_at'])}); {retry}")
        notes = []
        if item["state_reason"]:
            notes.append(
                f"{item['state']} by {item['state_by']} {when(item['state_at'])}: {item['state_reason']}"
            )
        if item["detail"]:
            notes.append(item["detail"])
        for note in notes:
            wrapped = textwrap.fill(
                note, width=max(out.width, 40), initial_indent="  ", subsequent_indent="  "
            )
            out.print(wrapped, soft_wrap=True, markup=False)


def _close_failed(
    state: str,
    entity: str | None,
    key: list[str] | None,
    reason_code: str | None,
    record_id: list[str] | None,
    why: str,
    by: str | None,
    as_json: bool,
) -> None:
    import getpass
    import uuid

    from syncflow_dagster.cli.tables import console as make_console
    from syncflow_dagster.cli.tables import print_json, shown_key, stored_key
    from syncflow_dagster.store.failures import FailureRepository

    _known_entity(entity)
    ids = []
    for text in record_id or []:
        try:
            ids.append(uuid.UUID(text))
        except ValueError:
            raise ValueError(f"--id {text!r} is not a failed record id") from None
    engine = _engine()
    try:
        closed = FailureRepository(engine).close_by_person(
            state,
            by=by or getpass.getuser(),
            reason=why,
            ids=ids or None,
            entity=entity,
            bks=[stored_key([k]) for k in key or []] or None,
            reason_code=reason_code,
        )
    finally:
        engine.dispose()
    if as_json:
        print_json({"closed": len(closed), "items": [{**vars(r), "payload": None} for r in closed]})
        return
    out = make_console()
    out.print(f"{state} {len(closed)} failed record(s)")
    for record in closed:
        out.print(f"  {record.entity} {shown_key(record.bk)} ({record.reason_code})")


_CloseEntity = Annotated[str | None, typer.Option(help="The records' entity (with --key or --reason-code).")]
_CloseKey = Annotated[
    list[str] | None,
    typer.Option(help="A business key of --entity, composite parts joined by ␟ (repeatable)."),
]
_CloseCode = Annotated[
    str | None, typer.Option("--reason-code", help="Every held record of --entity with this code.")
]
_CloseId = Annotated[list[str] | None, typer.Option("--id", help="A failed record id (repeatable).")]
_Why = Annotated[str, typer.Option("--reason", help="Why (kept with the record).")]
_By = Annotated[str | None, typer.Option(help="Who (kept with the record); default the OS user.")]
_Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _close_command(verb: str, state: str, doc: str) -> None:
    """Mount `syncflow failed VERB`, which closes held records as `state`."""

    def close(
        why: _Why,
        entity: _CloseEntity = None,
        key: _CloseKey = None,
        reason_code: _CloseCode = None,
        record_id: _CloseId = None,
        by: _By = None,
        as_json: _Json = False,
    ) -> None:
        _close_failed(state, entity, key, reason_code, record_id, why, by, as_json)

    close.__doc__ = doc
    failed_app.command(verb)(close)


_close_command(
    "resolve", "resolved", "Close held failed records as resolved (fixed elsewhere), saying why; not retried."
)
_close_command(
    "dismiss", "dismissed", "Close held failed records as dismissed (not worth delivering), saying why."
)


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
def pending_list(
    entity: EntityFilter = None,
    limit: Limit = 50,
    offset: Offset = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Children waiting for a parent, longest-waiting first."""
    from syncflow_dagster.cli.tables import console as make_console
    from syncflow_dagster.cli.tables import key_parts, print_json, shown_key, table, when
    from syncflow_dagster.service.store_views import pending_children_page

    _known_entity(entity)
    engine = _engine()
    try:
        with engine.connect() as conn:
            page = pending_children_page(conn, entity=entity, limit=limit, offset=offset)
    finally:
        engine.dispose()
    if as_json:
        items = [
            {**i, "key": key_parts(i["bk"]), "missing_parent_key": key_parts(i["missing_parent_bk"])}
            for i in page.items
        ]
        print_json({"total": page.total, "limit": limit, "offset": offset, "items": items})
        return
    grid = table(
        "entity",
        "business key",
        "waits for",
        "parent key",
        "since (UTC)",
        title=f"pending children: {len(page.items)} of {page.total} (offset {offset})",
    )
    for item in page.items:
        grid.add_row(
            item["entity"],
            shown_key(item["bk"]),
            item["missing_parent_entity"],
            shown_key(item["missing_parent_bk"]),
            when(item["since"]),
        )
    make_console().print(grid)


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
