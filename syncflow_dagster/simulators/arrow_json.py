"""Canonical JSON text of every row of Arrow columns, written with Arrow kernels rather than per row.

The ScheduleHub stand-in keeps a record's attributes and references as the
compact, key-sorted JSON that `orjson.dumps(value, option=OPT_SORT_KEYS)`
writes; a batch of 5000 Arrow rows gets the same text per row from a handful
of string kernels (escape, quote, join) instead of 5000 dicts and dumps.
Strings with a control character and floats (whose shortest text Arrow and
orjson spell differently, `1` against `1.0`) are written by orjson value by
value: they are rare in a SyncFlow batch, whose decimals, dates and times
travel as text.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from syncflow_dagster.clients.schedulehub import canonical_attribute

NULL = "null"
_compute: Any = pc  # pyarrow's stubs do not type the kernels' array-and-scalar forms


def canonical_arrow(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """An attribute column as the stand-in stores it: decimals, dates, times and timestamps as the
    contract's canonical text (the form SyncFlow's client sends, `canonical_attribute`)."""
    value: Any = canonical_attribute(column)
    if isinstance(value, pa.ChunkedArray):
        value = value.combine_chunks()
    result: pa.Array = value
    return result


def _python_json(values: list[Any]) -> list[str]:
    return [orjson.dumps(v).decode() for v in values]


def json_values(column: Any) -> pa.Array:
    """JSON text of every value (`null` for null), as orjson writes it."""
    kind = column.type
    text: Any
    if pa.types.is_string(kind):
        escaped = _compute.replace_substring(_compute.replace_substring(column, "\\", "\\\\"), '"', '\\"')
        text = _compute.binary_join_element_wise('"', escaped, '"', "")
        control = _compute.fill_null(_compute.match_substring_regex(column, "[\\x00-\\x1f]"), False)
        if _compute.any(control).as_py():
            rows = np.flatnonzero(control.to_numpy(zero_copy_only=False))
            exact = _python_json(column.take(pa.array(rows)).to_pylist())
            spelled = text.to_pylist()
            for row, value in zip(rows, exact, strict=True):
                spelled[row] = value
            text = pa.array(spelled, pa.string())
    elif pa.types.is_integer(kind):
        text = column.cast(pa.string())
    elif pa.types.is_boolean(kind):
        text = _compute.if_else(column, "true", "false")
    elif pa.types.is_null(kind):
        return pa.array([NULL] * len(column), pa.string())
    else:
        text = pa.array(_python_json(column.to_pylist()), pa.string())
    filled: pa.Array = _compute.fill_null(text, NULL)
    return filled


def json_objects(names: Sequence[str], columns: Sequence[pa.Array], length: int) -> pa.Array:
    """`{"name": value, ...}` per row, names sorted, nulls written as null (an attributes object)."""
    if not names:
        return pa.array(["{}"] * length, pa.string())
    order = sorted(range(len(names)), key=lambda i: names[i])
    pieces: list[Any] = []
    for position, index in enumerate(order):
        prefix = ("{" if position == 0 else ",") + orjson.dumps(names[index]).decode() + ":"
        pieces.extend([prefix, json_values(columns[index])])
    pieces.append("}")
    joined: pa.Array = _compute.binary_join_element_wise(*pieces, "")
    return joined


def json_references(names: Sequence[str], columns: Sequence[pa.Array], length: int) -> pa.Array:
    """`{"parent": "key", ...}` per row with the null references left out; null where none is left."""
    if not names:
        return pa.nulls(length, pa.string())
    order = sorted(range(len(names)), key=lambda i: names[i])
    pieces: list[Any] = []
    for index in order:
        member = _compute.binary_join_element_wise(
            "," + orjson.dumps(names[index]).decode() + ":", json_values(columns[index]), ""
        )
        pieces.append(_compute.if_else(_compute.is_valid(columns[index]), member, ""))
    joined = _compute.binary_join_element_wise(*pieces, "") if len(pieces) > 1 else pieces[0]
    wrapped = _compute.binary_join_element_wise("{", _compute.utf8_slice_codeunits(joined, 1), "}", "")
    result: pa.Array = _compute.if_else(_compute.equal(joined, ""), pa.scalar(None, pa.string()), wrapped)
    return result


def objects_table(texts: Sequence[str]) -> pa.Table | None:
    """The JSON objects of `texts` (one per row) as Arrow columns, or None when they do not fit columns.

    Types as `pa.array` infers them from the Python values (int, double, bool,
    string, null), by Arrow's JSON reader in one pass over the page instead
    of a dict per row; the reader's guess that ISO text is a timestamp is
    undone by a second parse with those columns as text. None when a column
    mixes kinds (text and numbers): the caller then builds the page from Python.
    """
    if not texts:
        return pa.table({})
    data = "\n".join(texts).encode()
    options = pa_json.ReadOptions(block_size=max(1 << 20, len(data) + 1))
    try:
        table = pa_json.read_json(io.BytesIO(data), read_options=options)
        guessed = {f.name for f in table.schema if pa.types.is_timestamp(f.type) or pa.types.is_date(f.type)}
        if guessed:
            schema = pa.schema(
                [pa.field(f.name, pa.string()) if f.name in guessed else f for f in table.schema]
            )
            table = pa_json.read_json(
                io.BytesIO(data),
                read_options=options,
                parse_options=pa_json.ParseOptions(explicit_schema=schema),
            )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if table.num_rows != len(texts) or any(pa.types.is_nested(f.type) for f in table.schema):
        return None
    return table.combine_chunks()
