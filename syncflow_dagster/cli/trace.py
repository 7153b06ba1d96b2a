"""`syncflow trace ENTITY KEY...`: one record's history, from SyncFlow's tables and the stage frames still kept.

KEY is the business key: one argument per part of a composite key (in the
catalog's key order), or one argument with the parts joined by ␟. Read-only;
needs SYNCFLOW_DATABASE_URL.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

import typer

from syncflow_dagster.catalog.models import KEY_SEPARATOR
from syncflow_dagster.cli.ops import _engine, _known_entity, _settings


def trace(
    entity: Annotated[str, typer.Argument(help="Catalog entity, e.g. operations.")],
    key: Annotated[
        list[str], typer.Argument(help="The business key: its parts in key order, or joined by ␟.")
    ],
    date: Annotated[
        list[dt.datetime] | None,
        typer.Option(
            formats=["%Y-%m-%d"], help="Look into the stage frames of this partition date (repeatable)."
        ),
    ] = None,
    frames: Annotated[
        bool, typer.Option("--frames/--no-frames", help="Look into the stage frames still kept.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """One record's history: its delivered state, every delivery (run, batch, answer), failures, waits, frames."""
    from syncflow_dagster.catalog import default_catalog
    from syncflow_dagster.cli.tables import print_json, stored_key
    from syncflow_dagster.service.trace import record_trace

    _known_entity(entity)
    spec = default_catalog().entity(entity)
    parts = stored_key(key).split(KEY_SEPARATOR)
    if len(parts) != len(spec.business_key):
        raise ValueError(
            f"entity {entity!r}: the key has {len(parts)} part(s), the catalog's business key "
            f"{list(spec.business_key)} has {len(spec.business_key)}"
        )
    bk = stored_key(parts)
    engine = _engine()
    try:
        document = record_trace(
            engine,
            spec,
            bk,
            frames_url=_settings().database_url.get_secret_value() if frames else None,
            dates=[d.date() for d in date or []] or None,
        )
    finally:
        engine.dispose()
    if as_json:
        print_json(document)
        return
    _print(document)


def _short_hash(value: str | None) -> str:
    return "-" if value is None else value[:12] + "…"


def _print(document: dict[str, Any]) -> None:
    from syncflow_dagster.cli.tables import console, shown_key, table, when
    from syncflow_dagster.service.trace import TRACE_STAGES

    out = console()
    out.print(
        f"[bold]{document['entity']}[/bold] {shown_key(document['bk'])}  (key hash {_short_hash(document['bk_hash'])})"
    )
    state = document["state"]
    if state is None:
        out.print("state: not delivered (SyncFlow holds no state for this key)")
    else:
        out.print(
            f"state: rowversion {state['rowversion']}, data hash {_short_hash(state['data_hash'])}, "
            f"ScheduleHub id {state['schedulehub_id'] or '-'}"
        )
        out.print(
            f"  first seen {when(state['first_seen_at'])}, last synced {when(state['last_synced_at'])} "
            f"(batch {str(state['last_batch_id'])[:8]}…)"
        )
    deliveries = document["deliveries"]
    if deliveries:
        grid = table(
            "when (UTC)", "run", "kind", "date", "action", "answer", "rowversion", title="deliveries"
        )
        for d in deliveries:
            grid.add_row(
                when(d["at"], seconds=True),
                (d["run_id"] or "-")[:8],
                d["kind"] or "-",
                "-" if d["partition_date"] is None else d["partition_date"].isoformat(),
                d["action"],
                d["outcome"] or d["status"],
                "-" if d["rowversion"] is None else str(d["rowversion"]),
            )
        out.print(grid)
    else:
        out.print("deliveries: none logged")
    for failure in document["failures"]:
        closed = (
            f"; {failure['state']} by {failure['state_by']} {when(failure['state_at'])}"
            f"{': ' + failure['state_reason'] if failure['state_reason'] else ''}"
            if failure["state"] != "open"
            else ""
        )
        out.print(
            f"failed: {failure['reason_code']} ({failure['reason_class']}, {failure['state']}), "
            f"{failure['attempts']} attempt(s) {when(failure['first_failed_at'])} .. "
            f"{when(failure['last_failed_at'])}{closed}",
            soft_wrap=True,
        )
        if failure["detail"]:
            out.print(f"  {failure['detail']}", soft_wrap=True, markup=False)
    waiting = document["waiting_for"]
    if waiting is not None:
        out.print(
            f"waiting for its parent {waiting['parent_entity']} {shown_key(waiting['parent_bk'])} "
            f"since {when(waiting['since'])}"
        )
    for seen in document["frames"]:
        parts = []
        for stage in TRACE_STAGES:
            row = seen.get(stage)
            if isinstance(row, dict):
                detail = ", ".join(f"{k.lstrip('_')} {_brief(v)}" for k, v in row.items())
                parts.append(f"{stage}: {detail}")
            else:
                parts.append(f"{stage}: {row or 'not kept'}")
        out.print(f"frames of {seen['date']}: " + "; ".join(parts), soft_wrap=True, markup=False)


def _brief(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, str) and len(value) == 64:
        return value[:12] + "…"
    return str(value)
