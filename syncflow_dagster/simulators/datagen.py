"""Seeded synthetic ERP data for the APISmith stand-in, generated from any catalog.

`generate_dataset(catalog, rows, seed)` returns one Arrow table per entity,
keyed by the entity's SOURCE name, with SOURCE column names: every payload
column is utf8 text (what the ERP's JSON carries), followed by `RowVersion`
(int64) and `ModifiedAt` (ISO-8601 text with offset, millisecond precision).

Sizing (`rows` sizes the largest entity; parents scale down, never below 5):

| entity            | rows                         |
|-------------------|------------------------------|
| sites             | rows / 50 000, clamped 5..20 |
| work_centers      | 10 per site                  |
| items             | rows / 20                    |
| customers         | rows / 200                   |
| sales_orders      | rows / 20                    |
| sales_order_lines | rows / 8                     |
| work_orders       | rows                         |
| operations        | rows                         |
| (other catalogs)  | rows for leaves, rows / 20 for entities with children |

Keys are clean and unique; FK fields are drawn from the parent's keys (a
child's own integer key part, e.g. LineNo, counts 1.. within its parent, or
10, 20, .. for a `*_seq` field). An FK whose fields are all optional is null in
about 15% of rows (a make-to-stock work order has no sales order line).

Payload values carry realistic dirt that a correct normaliser coerces: stray
whitespace, mixed case, the field's mixed date formats, decimals with many
digits and "-0.00", nulls and empty strings, Unicode (the NFC and NFD form of
the same text, umlauts, CJK), enum aliases and bool spellings. A small share
(`bad_row_fraction`, default 0.1%) of rows get one value that cannot be
coerced (a decimal "12,5x", a date "31.02.2024", ...); keys stay valid.

RowVersion is one counter across the whole dataset: unique and increasing,
with entities interleaved. ModifiedAt is non-decreasing in RowVersion and
spread over [as_of - history_days, as_of]; history_days=0 puts every record at
as_of. Everything is vectorised (numpy indices into small value pools, Arrow
`take`), so a million rows take seconds, and the same seed gives the same data.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from syncflow_dagster.catalog.models import Case, Catalog, EntitySpec, FieldSpec, FieldType

ROWVERSION_TYPE = pa.int64()
DEFAULT_BAD_ROW_FRACTION = 0.001
MIN_ENTITY_ROWS = 5
NULL_FK_SHARE = 0.15
POOL_SIZE = 4096

# Entity sizes of the default catalog, as a function of `rows` (see module doc).
_DEFAULT_SIZING = {
    "sites": lambda rows: min(20, max(MIN_ENTITY_ROWS, rows // 50_000)),
    "items": lambda rows: rows // 20,
    "customers": lambda rows: rows // 200,
    "sales_orders": lambda rows: rows // 20,
    "sales_order_lines": lambda rows: rows // 8,
    "work_orders": lambda rows: rows,
    "operations": lambda rows: rows,
}
_KEY_PREFIX = {
    "sites": "S",
    "work_centers": "WC-",
    "items": "IT-",
    "customers": "C-",
    "sales_orders": "SO-",
    "work_orders": "WO-",
}

_WORDS = (
    "Gear",
    "Shaft",
    "Housing",
    "Bracket",
    "Valve",
    "Pump",
    "Flange",
    "Bearing",
    "Spindle",
    "Rotor",
    "Assembly",
    "Cover",
    "Plate",
    "Bolt",
    "Seal",
    "Frame",
    "Drill",
    "Lathe",
    "Press",
    "Weld",
    "Paint",
    "Inspect",
    "Pack",
)
# Text a real ERP holds: umlauts (given in both NFC and NFD below), accents, CJK.
_UNICODE_WORDS = ("Müller", "Größe", "Straße", "Käse", "Café", "Ærø", "精密加工", "東京工場", "Łódź")
_COUNTRIES = ("DE", "US", "CN", "FR", "PL", "JP", "IT", "AT", "CH", "NL")
_TIME_ZONES = ("Europe/Berlin", "America/Chicago", "Asia/Shanghai", "Europe/Paris", "Asia/Tokyo", "UTC")
_UOMS = ("PCS", "KG", "M", "L", "EA", "BOX")
_CURRENCIES = ("EUR", "USD", "CNY", "PLN", "JPY", "CHF")


class DatagenError(ValueError):
    """The catalog asks for data the generator cannot make (names entity and field)."""


@dataclass(frozen=True)
class _Ctx:
    rng: np.random.Generator
    as_of: datetime


def entity_sizes(catalog: Catalog, rows: int) -> dict[str, int]:
    """Row count per entity name for a dataset whose largest entity has `rows`."""
    if rows < 1:
        raise DatagenError(f"rows must be at least 1, got {rows}")
    sizes: dict[str, int] = {}
    for name in catalog.topological_order:
        if name in _DEFAULT_SIZING:
            size = _DEFAULT_SIZING[name](rows)
        elif name == "work_centers" and "sites" in sizes:
            size = sizes["sites"] * 10
        elif catalog.children_of(name):
            size = rows // 20
        else:
            size = rows
        sizes[name] = max(MIN_ENTITY_ROWS, size)
    return sizes


def generate_dataset(
    catalog: Catalog,
    rows: int,
    seed: int,
    as_of: datetime | None = None,
    history_days: int = 0,
    *,
    bad_row_fraction: float = DEFAULT_BAD_ROW_FRACTION,
) -> dict[str, pa.Table]:
    """One table per entity (keyed by source name, source column names), deterministic by seed."""
    if history_days < 0:
        raise DatagenError(f"history_days must be >= 0, got {history_days}")
    if not 0.0 <= bad_row_fraction <= 1.0:
        raise DatagenError(f"bad_row_fraction must be within [0, 1], got {bad_row_fraction}")
    as_of = (as_of or datetime.now(UTC)).astimezone(UTC)
    rng = np.random.default_rng(seed)
    ctx = _Ctx(rng=rng, as_of=as_of)
    sizes = entity_sizes(catalog, rows)
    payloads: dict[str, pa.Table] = {}
    for name in catalog.topological_order:
        entity = catalog.entity(name)
        payloads[name] = _entity_payload(ctx, catalog, entity, sizes[name], payloads, bad_row_fraction)

    # One rowversion counter across entities, interleaved: position i of the
    # shuffled label array is rowversion i+1 and belongs to entity label[i].
    names = list(catalog.topological_order)
    counts = np.array([payloads[n].num_rows for n in names], dtype=np.int64)
    labels = np.repeat(np.arange(len(names), dtype=np.int32), counts)
    rng.shuffle(labels)
    total = int(counts.sum())
    span_ms = int(history_days * 86_400_000)
    end_ms = int(as_of.timestamp() * 1000)
    offsets = np.sort(rng.integers(0, span_ms + 1, total)) if span_ms else np.zeros(total, dtype=np.int64)
    changed_ms = end_ms - span_ms + offsets
    if span_ms:
        changed_ms[-1] = end_ms  # the newest record changed exactly at as_of
    dataset: dict[str, pa.Table] = {}
    for index, name in enumerate(names):
        entity = catalog.entity(name)
        positions = np.flatnonzero(labels == index)
        table = payloads[name].take(rng.permutation(payloads[name].num_rows))
        rowversions = pa.array(positions + 1, type=ROWVERSION_TYPE)
        changed = format_changed_at(changed_ms[positions])
        table = table.append_column(entity.rowversion, rowversions).append_column(entity.changed_at, changed)
        dataset[entity.source] = table
    return dataset


def format_changed_at(epoch_ms: np.ndarray) -> pa.Array:
    """ISO-8601 text with a UTC offset and milliseconds, e.g. 2024-05-01T12:34:56.123+00:00."""
    return iso_millis(pa.array(np.asarray(epoch_ms, dtype=np.int64), type=pa.timestamp("ms", tz="UTC")))


def iso_millis(stamps: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Timestamps (naive = UTC) as ISO-8601 text with milliseconds and +00:00.

    Arrow's timestamp-to-text cast writes `YYYY-MM-DD HH:MM:SS.mmm` for a naive
    millisecond timestamp in a quarter of strftime's time; the space becomes the T.
    """
    value: Any = stamps
    if value.type.tz is not None:
        value = pc.cast(pc.cast(value, pa.timestamp("ms", tz="UTC")), pa.timestamp("ms"))
    else:
        value = pc.cast(value, pa.timestamp("ms"))
    text: Any = pc.cast(value, pa.string())
    joined: Any = pc.binary_join_element_wise(
        pc.replace_substring(text, " ", "T", max_replacements=1), "+00:00", ""
    )
    if isinstance(joined, pa.ChunkedArray):
        joined = joined.combine_chunks()
    result: pa.Array = joined
    return result


# --- keys ------------------------------------------------------------------------------------------


def key_prefix(entity: EntitySpec) -> str:
    """The prefix of generated key codes, e.g. WO- for work orders."""
    if entity.name in _KEY_PREFIX:
        return _KEY_PREFIX[entity.name]
    return "".join(part[:1] for part in entity.name.split("_")).upper() + "-"


def key_codes(prefix: str, numbers: np.ndarray, width: int = 6) -> pa.Array:
    """Vectorised key text: prefix + zero-padded number."""
    digits: Any = pc.utf8_lpad(pc.cast(pa.array(numbers, type=pa.int64()), pa.string()), width, padding="0")
    codes: pa.Array = pc.binary_join_element_wise(pa.scalar(prefix), digits, "")
    return codes


def _relation_of(entity: EntitySpec) -> dict[str, int]:
    """Target FK field → index of the (first) parent relation that fills it."""
    owner: dict[str, int] = {}
    for index, relation in enumerate(entity.parents):
        for field in relation.fields:
            owner.setdefault(field, index)
    return owner


def _entity_payload(
    ctx: _Ctx,
    catalog: Catalog,
    entity: EntitySpec,
    size: int,
    done: dict[str, pa.Table],
    bad_row_fraction: float,
) -> pa.Table:
    rng = ctx.rng
    columns: dict[str, pa.Array] = {}
    owner = _relation_of(entity)
    key = set(entity.business_key)

    # Parent row drawn for every row and relation. A relation that fills part
    # of the business key orders the rows by parent so own int key parts can
    # count within the parent (LineNo 1, 2, 3 of one order).
    key_relation = next((i for i, rel in enumerate(entity.parents) if set(rel.fields) & key), None)
    parent_rows: dict[int, np.ndarray] = {}
    null_fk: dict[int, np.ndarray] = {}
    for index, relation in enumerate(entity.parents):
        parent_size = done[relation.entity].num_rows
        drawn = rng.integers(0, parent_size, size)
        if index == key_relation:
            drawn = np.sort(drawn)
        parent_rows[index] = drawn
        optional = not any(entity.field_by_target[f].required or f in key for f in relation.fields)
        if optional:
            null_fk[index] = rng.random(size) < NULL_FK_SHARE

    own_key = [f for f in entity.business_key if f not in owner]
    if not own_key and key_relation is not None:
        raise DatagenError(
            f"entity {entity.name!r}: business key {list(entity.business_key)} is made only of FK "
            "fields; the generator needs one own key field to make keys unique"
        )
    rank = None
    if key_relation is not None:
        groups = parent_rows[key_relation]
        starts = np.r_[True, groups[1:] != groups[:-1]]
        first = np.maximum.accumulate(np.where(starts, np.arange(size), 0))
        rank = np.arange(size) - first + 1

    for spec in entity.fields:
        target = spec.target
        if target in owner:
            relation_index = owner[target]
            relation = entity.parents[relation_index]
            parent = catalog.entity(relation.entity)
            parent_key_target = parent.business_key[relation.fields.index(target)]
            parent_source = parent.field_by_target[parent_key_target].source
            values: Any = done[relation.entity].column(parent_source).take(parent_rows[relation_index])
            if relation_index in null_fk:
                values = pc.if_else(pa.array(null_fk[relation_index]), pa.scalar(None, pa.string()), values)
            columns[spec.source] = values
        elif target in key:
            columns[spec.source] = _own_key_values(entity, spec, size, rank)
        else:
            columns[spec.source] = _payload_values(ctx, entity, spec, size)

    table = pa.table(columns)
    if bad_row_fraction > 0:
        table = _spoil_rows(ctx, entity, table, bad_row_fraction)
    return table


def _own_key_values(entity: EntitySpec, spec: FieldSpec, size: int, rank: np.ndarray | None) -> pa.Array:
    if spec.type is FieldType.INT:
        numbers = rank if rank is not None else np.arange(1, size + 1)
        if spec.target.endswith("_seq"):
            numbers = numbers * 10
        return pc.cast(pa.array(numbers, type=pa.int64()), pa.string())
    if spec.type not in (FieldType.STRING, FieldType.ENUM):
        raise DatagenError(
            f"entity {entity.name!r}, field {spec.source!r}: the generator makes keys of type "
            f"string or int, not {spec.type}"
        )
    prefix = key_prefix(entity)
    width = max(4, len(str(size)))
    codes = key_codes(prefix, np.arange(1, size + 1), width)
    if spec.max_length is not None and len(prefix) + width > spec.max_length:
        raise DatagenError(
            f"entity {entity.name!r}, field {spec.source!r}: generated keys need "
            f"{len(prefix) + width} characters, max_length is {spec.max_length}"
        )
    return codes


# --- payload pools ---------------------------------------------------------------------------------


def _payload_values(ctx: _Ctx, entity: EntitySpec, spec: FieldSpec, size: int) -> pa.Array:
    pool = value_pool(ctx.rng, spec, ctx.as_of)
    return pool.take(ctx.rng.integers(0, len(pool), size))


def value_pool(rng: np.random.Generator, spec: FieldSpec, as_of: datetime) -> pa.Array:
    """A few thousand plausible raw values for one field, dirt included (see module doc)."""
    builders = {
        FieldType.STRING: _string_pool,
        FieldType.ENUM: _enum_pool,
        FieldType.BOOL: _bool_pool,
        FieldType.INT: _int_pool,
        FieldType.DECIMAL: _decimal_pool,
        FieldType.DATE: _date_pool,
        FieldType.DATETIME: _datetime_pool,
    }
    values = builders[spec.type](rng, spec, as_of)
    if not spec.required:
        # Nulls and (where the string layer turns them into nulls) empty strings.
        values += [None] * max(1, len(values) // 25)
        if spec.empty_as_null and spec.type is not FieldType.BOOL:
            values += [""] * max(1, len(values) // 50)
    return pa.array(values, type=pa.string())


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    """One of `options`, drawn as `rng.choice(options)` draws it (one `integers(0, len)`): the same
    values for a seed, without what choice does around the draw on every call (convert `options`
    to an array, check its shape), which was more than half of generating a dataset."""
    return options[int(rng.integers(0, len(options)))]


def _dirty(rng: np.random.Generator, text: str, spec: FieldSpec) -> str:
    """Stray whitespace and (when the field folds case) the wrong case."""
    roll = rng.random()
    if spec.trim and roll < 0.1:
        text = f"  {text} "
    elif spec.trim and roll < 0.15:
        text = f"{text}\t"
    if spec.case is not Case.NONE and rng.random() < 0.15:
        text = text.lower() if spec.case is Case.UPPER else text.upper()
    return text


def _fit(text: str, spec: FieldSpec) -> str:
    return text[: spec.max_length] if spec.max_length is not None else text


def _string_pool(rng: np.random.Generator, spec: FieldSpec, as_of: datetime) -> list[str | None]:
    name = spec.target
    if "country" in name:
        base: tuple[str, ...] = _COUNTRIES
    elif "time_zone" in name or "timezone" in name:
        base = _TIME_ZONES
    elif name == "uom" or name.endswith("_uom"):
        base = _UOMS
    elif "currency" in name:
        base = _CURRENCIES
    elif "calendar" in name:
        base = ("CAL-5D", "CAL-6D", "CAL-24X7", "CAL-2S")
    else:
        base = ()
    out: list[str | None] = []
    if base:
        for value in base:
            out.append(_fit(value, spec))
            for _ in range(3):
                out.append(_dirty(rng, _fit(value, spec), spec))
        return list(out)
    for _ in range(POOL_SIZE // 4):
        # rng.choice(_WORDS, size=n), drawn the same way (see _pick).
        words = [_WORDS[i] for i in rng.integers(0, len(_WORDS), size=int(rng.integers(1, 4)))]
        text = " ".join(words) + f" {int(rng.integers(1, 999))}"
        roll = rng.random()
        if roll < 0.12:
            unicode_word = _pick(rng, _UNICODE_WORDS)
            # The same text in composed and decomposed form: equal after NFC.
            form: Literal["NFC", "NFD"] = "NFD" if rng.random() < 0.5 else "NFC"
            text = f"{unicodedata.normalize(form, unicode_word)} {text}"
        text = _fit(text, spec).strip()
        out.append(_dirty(rng, text, spec))
    return out


def _enum_pool(rng: np.random.Generator, spec: FieldSpec, as_of: datetime) -> list[str | None]:
    spellings = list(spec.values) + list(spec.aliases)
    out: list[str | None] = []
    for value in spellings:
        out.extend([value, value, _dirty(rng, value, spec), _dirty(rng, value, spec)])
    return out


def _bool_pool(rng: np.random.Generator, spec: FieldSpec, as_of: datetime) -> list[str | None]:
    out: list[str | None] = []
    for value in (*spec.true_values, *spec.false_values):
        if value == "" and spec.required:
            continue
        out.extend([value, value.upper(), value.capitalize(), f" {value} "])
    return out


def _int_pool(rng: np.random.Generator, spec: FieldSpec, as_of: datetime) -> list[str | None]:
    numbers = rng.integers(0, 120, 200)
    return [f" {n} " if rng.random() < 0.05 else str(n) for n in numbers]


def _decimal_pool(rng: np.random.Generator, spec: FieldSpec, as_of: datetime) -> list[str | None]:
    out: list[str | None] = ["-0.00", "0", "0.0", "-0", "1000"]
    magnitudes = 10.0 ** rng.integers(-1, 5, POOL_SIZE)
    values = rng.random(POOL_SIZE) * magnitudes
    digits = rng.integers(0, 10, POOL_SIZE)  # up to 9 digits: more than the scale → rounding
    for value, places in zip(values, digits, strict=True):
        text = f"{value:.{places}f}"
        out.append(f" {text}" if rng.random() < 0.03 else text)
    return out


def _date_pool(rng: np.random.Generator, spec: FieldSpec, as_of: datetime) -> list[str | None]:
    formats = spec.formats or ("%Y-%m-%d",)
    start = as_of.date() - timedelta(days=365)
    out: list[str | None] = []
    for offset in rng.integers(0, 730, 1024):
        day = start + timedelta(days=int(offset))
        out.append(day.strftime(_pick(rng, formats)))
    return out


def _datetime_pool(rng: np.random.Generator, spec: FieldSpec, as_of: datetime) -> list[str | None]:
    formats = spec.formats or ("%Y-%m-%dT%H:%M:%S%z",)
    zone = ZoneInfo(spec.timezone)
    start = as_of - timedelta(days=180)
    out: list[str | None] = []
    for offset in rng.integers(0, 360 * 24 * 4, 2048):
        moment = (start + timedelta(minutes=15 * int(offset))).astimezone(zone)
        out.append(moment.strftime(_pick(rng, formats)))
    return out


# --- rows that cannot be coerced -------------------------------------------------------------------


def uncoercible_value(spec: FieldSpec) -> str | None:
    """A raw value a correct normaliser must reject for this field, or None if it has none."""
    if spec.type is FieldType.DECIMAL:
        return "12,5x"
    if spec.type is FieldType.INT:
        return "12a"
    if spec.type is FieldType.DATE:
        return "31.02.2024" if "%d.%m.%Y" in spec.formats else "2024-02-31"
    if spec.type is FieldType.DATETIME:
        return "2024-02-30 25:61:00"
    if spec.type is FieldType.BOOL:
        return "maybe"
    if spec.type is FieldType.ENUM:
        return "NOT-A-STATUS"
    if spec.max_length is not None:
        return "X" * (spec.max_length + 5)
    return None


def _spoil_rows(ctx: _Ctx, entity: EntitySpec, table: pa.Table, fraction: float) -> pa.Table:
    fk_fields = {f for rel in entity.parents for f in rel.fields}
    candidates = [
        spec
        for spec in entity.fields
        if spec.target not in entity.business_key
        and spec.target not in fk_fields
        and uncoercible_value(spec) is not None
    ]
    count = round(table.num_rows * fraction)
    if not candidates or count == 0:
        return table
    rows = ctx.rng.choice(table.num_rows, size=count, replace=False)
    which = ctx.rng.integers(0, len(candidates), count)
    for index, spec in enumerate(candidates):
        chosen = rows[which == index]
        if chosen.size == 0:
            continue
        mask = np.zeros(table.num_rows, dtype=bool)
        mask[chosen] = True
        column = table.column(spec.source)
        spoiled = pc.if_else(pa.array(mask), pa.scalar(uncoercible_value(spec), pa.string()), column)
        table = table.set_column(table.schema.get_field_index(spec.source), spec.source, spoiled)
    return table
