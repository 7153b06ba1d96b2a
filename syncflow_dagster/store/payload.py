"""Payloads of failed and pending rows: Arrow row ↔ JSON text, so a retry can resend without refetching.

A payload is the row's normalized target fields as one JSON object. Decimals
travel as strings (JSON numbers would lose their scale), dates and
timestamps as ISO 8601 text. These rows are few (failures, children waiting
for a parent), so one orjson call per row is fine here; the hot paths never
come through this module.
"""

from __future__ import annotations

import decimal
from collections.abc import Sequence
from typing import Any

import orjson
import pyarrow as pa


def _json_default(value: object) -> object:
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot put a {type(value).__name__} into a payload: {value!r}")


def payload_json(rows: pa.Table, columns: Sequence[str] | None = None) -> pa.Array:
    """One JSON object per row of `rows` (only `columns` when given), as a string array."""
    names = list(columns) if columns is not None else [c for c in rows.column_names if not c.startswith("_")]
    missing = [c for c in names if c not in rows.column_names]
    if missing:
        raise ValueError(f"payload: the frame has no column(s) {missing}")
    records = rows.select(names).to_pylist()
    return pa.array([orjson.dumps(record, default=_json_default).decode() for record in records], pa.string())


def _is_text_cast(typ: pa.DataType) -> bool:
    # Types that travel as JSON strings and come back with an Arrow cast.
    return bool(pa.types.is_decimal(typ) or pa.types.is_temporal(typ) or pa.types.is_fixed_size_binary(typ))


def payload_table(payloads: pa.Array | pa.ChunkedArray, schema: pa.Schema, entity: str = "?") -> pa.Table:
    """The rows of JSON payloads back as an Arrow table typed by `schema` (e.g. the entity's frame schema).

    A key that `schema` does not know is an error, not silently dropped; a
    field the payload lacks comes back null.
    """
    known = set(schema.names)
    values: dict[str, list[Any]] = {name: [] for name in schema.names}
    for index, text in enumerate(payloads.to_pylist()):
        record = orjson.loads(text) if text is not None else {}
        if not isinstance(record, dict):
            raise ValueError(f"entity {entity!r}, payload #{index}: not a JSON object: {text!r}")
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"entity {entity!r}, payload #{index}: field(s) {unknown} are not in the schema")
        for name in schema.names:
            values[name].append(record.get(name))
    arrays: list[Any] = []
    for field in schema:
        column = values[field.name]
        try:
            if pa.types.is_fixed_size_binary(field.type) or pa.types.is_binary(field.type):
                arrays.append(pa.array([None if v is None else bytes.fromhex(v) for v in column], field.type))
            elif pa.types.is_timestamp(field.type):
                # Parsed at microseconds (what the JSON carries), then narrowed
                # with a safe cast, which refuses to drop digits.
                tz = field.type.tz
                parsed = pa.array(column, pa.string()).cast(pa.timestamp("us", tz=tz))
                arrays.append(parsed.cast(field.type))
            elif _is_text_cast(field.type):
                arrays.append(pa.array(column, pa.string()).cast(field.type))
            else:
                arrays.append(pa.array(column, field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, TypeError) as exc:
            bad = next((v for v in column if v is not None), None)
            raise ValueError(
                f"entity {entity!r}, field {field.name!r}: payload value {bad!r} "
                f"is not a {field.type} ({exc})"
            ) from exc
    return pa.Table.from_arrays(arrays, schema=schema)
