"""Verify a sync: ScheduleHub's full contents against the source, key by key and value by value.

The source side is APISmith's `GET /admin/snapshot/<source>` (every live
record), run through the same engine a sync uses: normalize, identity, parent
references and the ScheduleHub wire form. The target side is ScheduleHub's
read-back (`GET /v1/resources/<resource>/records`), whose attribute values are
canonical text. Both sides are compared as canonical strings per attribute.

Every difference is classified. It is *held* when SyncFlow says why: an open
failed record (reason code) or a parked child (the parent it waits for). It is
*explained* when the source itself is the cause: the source's current value is
refused by normalize (an open `invalid_value` failed record must exist), or a
child waits for a parent the source refused or no longer has. Anything else is
a defect: lost, duplicated, different, or extra (still in ScheduleHub after
the source deleted it). A key held twice, both an open failed record and a
parked child, is a defect too: it has two reasons and two retry paths.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import sqlalchemy as sa

from syncflow_dagster.catalog import Catalog, EntitySpec
from syncflow_dagster.clients.schedulehub import to_wire
from syncflow_dagster.defs import parents, stages
from syncflow_dagster.defs.assets import CATALOG
from syncflow_dagster.engine import columns as c
from syncflow_dagster.engine.identity import add_identity
from syncflow_dagster.engine.normalize import normalize
from syncflow_dagster.store.schema import failed_records, pending_children
from syncflow_dagster_tests import loopback_http

ARROW_STREAM = "application/vnd.apache.arrow.stream"
INVALID_VALUE = "invalid_value"
PARENT_MISSING = "parent_missing"
_NULL = "\x00null"


@dataclass(frozen=True)
class SourceView:
    """One entity as the source holds it, in ScheduleHub's canonical form."""

    entity: str
    # the attribute and reference columns ScheduleHub should hold, sorted
    columns: tuple[str, ...]
    # external key -> canonical text of each column, in `columns` order
    values: dict[str, tuple[str, ...]]
    # raw key text of records the engine refuses -> reasons (entity, key, field, value)
    refused: dict[str, str]


@dataclass(frozen=True)
class Holding:
    """Why SyncFlow holds a key back: an open failed record or a parked child."""

    reason: str
    reason_class: str  # retryable, permanent, pending
    parent_entity: str | None = None
    parent_bk: str | None = None


@dataclass
class EntityVerdict:
    """The comparison of one entity; `defects()` is empty when nothing was lost or duplicated."""

    entity: str
    source_rows: int
    refused_rows: int
    hub_rows: int
    matched: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    # Refused by the engine and silently dropped: no failed record says why.
    unrecorded_refusals: list[str] = field(default_factory=list)
    # Both an open failed record and a parked child (held in two places at once).
    doubly_held: list[str] = field(default_factory=list)
    held: dict[str, Holding] = field(default_factory=dict)
    # Held keys whose cause is the source's own data (refused value, parent refused or gone).
    explained: dict[str, str] = field(default_factory=dict)

    @property
    def unexplained_held(self) -> dict[str, Holding]:
        return {k: h for k, h in self.held.items() if k not in self.explained}

    def defects(self) -> list[str]:
        """Differences no failed record or pending child accounts for."""
        out = []
        for name in ("lost", "duplicated", "different", "extra", "unrecorded_refusals", "doubly_held"):
            keys = getattr(self, name)
            if keys:
                out.append(f"{self.entity}: {len(keys)} {name} (e.g. {sorted(keys)[:5]!r})")
        return out

    def summary(self) -> dict[str, int]:
        return {
            "source_rows": self.source_rows,
            "refused_rows": self.refused_rows,
            "hub_rows": self.hub_rows,
            "matched": self.matched,
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "different": len(self.different),
            "extra": len(self.extra),
            "doubly_held": len(self.doubly_held),
            "held": len(self.held),
            "unexplained_held": len(self.unexplained_held),
        }


@dataclass
class Verification:
    verdicts: dict[str, EntityVerdict]

    def defects(self) -> list[str]:
        return [line for verdict in self.verdicts.values() for line in verdict.defects()]

    def unexplained_held(self) -> list[str]:
        return [
            f"{name}: {key!r} held ({holding.reason_class} {holding.reason})"
            for name, verdict in self.verdicts.items()
            for key, holding in sorted(verdict.unexplained_held.items())
        ]

    @property
    def equal(self) -> bool:
        """No defect and nothing held for a reason a retry could still clear."""
        return not self.defects() and not self.unexplained_held()

    def describe(self) -> str:
        lines = [f"{name}: {v.summary()}" for name, v in self.verdicts.items()]
        return "\n".join([*lines, *self.defects(), *self.unexplained_held()[:20]])


# --- the source side -------------------------------------------------------------------------------


def source_view(catalog: Catalog, entity: EntitySpec, snapshot: pa.Table) -> SourceView:
    """The source's live records as ScheduleHub should hold them, plus the ones the engine refuses."""
    raw = stages._as_text(snapshot)
    result = normalize(entity, raw)
    refused: dict[str, list[str]] = {}
    for row in result.rejected.to_pylist():
        refused.setdefault(row["business_key"] or "", []).append(
            f"field {row['field']}: {row['reason']} (value {row['raw_value']!r})"
        )
    rows = add_identity(entity, result.rows)
    rows = parents.add_references(catalog, entity, rows)
    wanted = [c.BK, *entity.targets, *[n for n in rows.column_names if n.startswith(stages.REF_PREFIX)]]
    wire = to_wire(rows.select(wanted))
    return SourceView(
        entity.name,
        tuple(sorted(n for n in wire.column_names if n != "external_key")),
        canonical_rows(wire),
        {key: "; ".join(reasons) for key, reasons in refused.items()},
    )


def canonical_rows(wire: pa.Table) -> dict[str, tuple[str, ...]]:
    """external_key -> the record's attributes and references as canonical strings.

    Columns are taken by name in sorted order, so column order never matters;
    every value is compared as text (ScheduleHub's canonical form), null apart from "".
    """
    keys = [str(key) for key in wire.column("external_key").to_pylist()]
    names = sorted(n for n in wire.column_names if n not in ("external_key", "id"))
    texts = [[_text(v) for v in wire.column(n).to_pylist()] for n in names]
    return {key: tuple(column[i] for column in texts) for i, key in enumerate(keys)}


def _text(value: Any) -> str:
    if value is None:
        return _NULL
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --- the target side -------------------------------------------------------------------------------


def hub_rows(records: pa.Table, like: Iterable[str]) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """ScheduleHub's read-back as canonical strings over the columns the source sends; and duplicate keys."""
    wanted = sorted(set(like))
    columns: dict[str, Any] = {}
    for name in wanted:
        if name in records.column_names:
            columns[name] = records.column(name)
        else:
            columns[name] = pa.nulls(records.num_rows, pa.string())
    keys = [str(key) for key in records.column("external_key").to_pylist()] if records.num_rows else []
    table = pa.table({"external_key": pa.array(keys, pa.string()), **columns})
    duplicated = [key for key, n in Counter(keys).items() if n > 1]
    return canonical_rows(table), duplicated


# --- what SyncFlow holds back -------------------------------------------------------------------


def holdings(engine: sa.Engine, entity: str) -> dict[str, Holding]:
    """Open failed records and parked children of `entity`, by key text."""
    out: dict[str, Holding] = {}
    with engine.connect() as conn:
        failed = conn.execute(
            sa.select(
                failed_records.c.bk,
                failed_records.c.reason_code,
                failed_records.c.reason_class,
                failed_records.c.detail,
            ).where(failed_records.c.entity == entity, failed_records.c.resolved_at.is_(None))
        )
        for bk, code, klass, _detail in failed:
            out[bk] = Holding(code, klass)
        parked = conn.execute(
            sa.select(
                pending_children.c.bk,
                pending_children.c.missing_parent_entity,
                pending_children.c.missing_parent_bk,
            ).where(pending_children.c.entity == entity)
        )
        for bk, parent, parent_bk in parked:
            out[bk] = Holding(f"waits for {parent} {parent_bk!r}", "pending", parent, parent_bk)
    return out


def doubly_held(engine: sa.Engine, entity: str) -> list[str]:
    """Keys of `entity` that are an open failed record and a parked child at once (should be none)."""
    pending, failed = pending_children.alias("p"), failed_records.alias("f")
    query = (
        sa.select(pending.c.bk)
        .join(
            failed,
            sa.and_(
                failed.c.entity == pending.c.entity,
                failed.c.bk_hash == pending.c.bk_hash,
                failed.c.resolved_at.is_(None),
            ),
        )
        .where(pending.c.entity == entity)
        .order_by(pending.c.bk)
    )
    with engine.connect() as conn:
        return [str(bk) for bk in conn.execute(query).scalars()]


def _parent_of_failed(engine: sa.Engine, entity: str, bk: str) -> tuple[str | None, str | None]:
    """A parent_missing failure's parent, from its detail ('parent <entity> <bk> still missing')."""
    with engine.connect() as conn:
        detail = conn.execute(
            sa.select(failed_records.c.detail).where(
                failed_records.c.entity == entity,
                failed_records.c.bk == bk,
                failed_records.c.resolved_at.is_(None),
            )
        ).scalar_one_or_none()
    if not detail or not detail.startswith("parent "):
        return None, None
    parts = detail.split(" ", 2)
    if len(parts) < 3:
        return None, None
    return parts[1], parts[2].removesuffix(" still missing")


# --- the comparison --------------------------------------------------------------------------------


def compare(
    entity: str,
    source: SourceView,
    hub: pa.Table,
    held: Mapping[str, Holding],
) -> EntityVerdict:
    """Classify every key of the source and of ScheduleHub (pure: no I/O)."""
    target, duplicated = hub_rows(hub, source.columns)
    verdict = EntityVerdict(entity, len(source.values), len(source.refused), hub.num_rows)
    verdict.duplicated = duplicated
    for key, text in source.values.items():
        found = target.get(key)
        if found == text:
            verdict.matched += 1
            continue
        if key in held:
            verdict.held[key] = held[key]
        elif found is None:
            verdict.lost.append(key)
        else:
            verdict.different.append(key)
    for key, reasons in source.refused.items():
        holding = held.get(key)
        if holding is None or holding.reason != INVALID_VALUE:
            verdict.unrecorded_refusals.append(key)
            continue
        verdict.held[key] = holding
        verdict.explained[key] = f"source value refused: {reasons}"
    for key in target:
        if key in source.values or key in source.refused:
            continue
        if key in held:
            verdict.held[key] = held[key]
        else:
            verdict.extra.append(key)
    return verdict


def _explain_parents(
    verdicts: Mapping[str, EntityVerdict],
    views: Mapping[str, SourceView],
    engine: sa.Engine,
) -> None:
    """A child held for a parent the source refused or no longer has is explained by the source."""
    for name, verdict in verdicts.items():
        for key, holding in verdict.held.items():
            if key in verdict.explained:
                continue
            parent, parent_bk = holding.parent_entity, holding.parent_bk
            if parent is None and holding.reason == PARENT_MISSING:
                parent, parent_bk = _parent_of_failed(engine, name, key)
            if parent is None or parent_bk is None or parent not in views:
                continue
            parent_view = views[parent]
            parent_verdict = verdicts.get(parent)
            if parent_bk not in parent_view.values:
                verdict.explained[key] = f"parent {parent} {parent_bk!r} refused or gone at the source"
            elif parent_verdict is not None and parent_bk in parent_verdict.explained:
                verdict.explained[key] = f"parent {parent} {parent_bk!r} held: source value refused"


def fetch_snapshot(apismith_url: str, source: str) -> pa.Table:
    response = loopback_http.get(
        f"{apismith_url}/admin/snapshot/{source}", headers={"Accept": ARROW_STREAM}, timeout=60
    )
    response.raise_for_status()
    return pa.ipc.open_stream(response.content).read_all()


def verify_sync(
    apismith_url: str,
    schedulehub: Any,
    engine: sa.Engine,
    entities: Iterable[str] | None = None,
    catalog: Catalog = CATALOG,
) -> Verification:
    """Compare ScheduleHub with the source for `entities` (all by default).

    `schedulehub` is a ScheduleHubResource (anything with `.client()`); the
    parents of the chosen entities are read too, so that a child held for a
    refused parent is recognised as explained by the source.
    """
    chosen = [n for n in catalog.topological_order if entities is None or n in set(entities)]
    needed = set(chosen)
    for name in chosen:
        needed.update(catalog.entity(name).parent_entities)
    views = {
        name: source_view(
            catalog, catalog.entity(name), fetch_snapshot(apismith_url, catalog.entity(name).source)
        )
        for name in catalog.topological_order
        if name in needed
    }

    async def read(resource: str) -> pa.Table:
        async with schedulehub.client() as client:
            table: pa.Table = await client.read_all(resource)
            return table

    verdicts = {
        name: compare(
            name, views[name], asyncio.run(read(catalog.entity(name).resource)), holdings(engine, name)
        )
        for name in chosen
    }
    for name, verdict in verdicts.items():
        verdict.doubly_held = doubly_held(engine, name)
    _explain_parents(verdicts, views, engine)
    return Verification(verdicts)


def verify_deployment(env: Any, entities: Iterable[str] | None = None) -> Verification:
    """`verify_sync` for a `sync_harness.Deployment`."""
    return verify_sync(
        env.apismith_url, env.resources["schedulehub"], env.resources["database"].engine, entities
    )
