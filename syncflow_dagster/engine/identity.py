"""Identity: the canonical business key and payload of each row, and their hashes.

BK_HASH = xxHash3-128 of the canonical key text, DATA_HASH = BLAKE3 of the
canonical payload; the recipe (docs/identity.md, with test vectors) is
versioned by RECIPE_VERSION, stored beside both hashes. The canonical strings
are built columnar; the only per-row Python is one hash call per value.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import blake3
import pyarrow as pa
import pyarrow.compute as _compute
import xxhash

from syncflow_dagster.catalog.models import EntitySpec
from syncflow_dagster.engine.chunks import DEFAULT_CHUNK_SIZE, chunk_starts
from syncflow_dagster.engine.columns import (
    BK,
    BK_HASH,
    BK_HASH_TYPE,
    DATA_HASH,
    DATA_HASH_TYPE,
    KEY_SEPARATOR,
    RECIPE,
    RECIPE_TYPE,
)
from syncflow_dagster.engine.normalize import run_column_jobs

# The pyarrow stubs type each compute function per concrete array class; the
# arrays here get their types at run time, so compute calls are left untyped.
pc: Any = _compute

# Bump only as a deliberate re-baseline: every stored hash then compares as
# "recipe_changed" and is re-delivered once (docs/identity.md).
RECIPE_VERSION = 1
NULL_MARK = "~"
_UTC_TEXT = pa.timestamp("us", tz="UTC")
# Dates and datetimes in years 1..9999 have canonical texts of one byte length,
# so their length prefix is a constant rather than a kernel per row.
_DAYS_0001_01_01, _DAYS_9999_12_31 = -719162, 2932896
_US_0001_01_01, _US_9999_12_31 = -62135596800 * 10**6, 253402300799999999


def canonical_text(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Each value's canonical text for its Arrow type (null stays null).

    int: decimal digits; decimal: fixed scale, plain notation, never -0;
    bool: true/false; date: YYYY-MM-DD; datetime: UTC YYYY-MM-DDTHH:MM:SS.ffffffZ;
    strings: as they are (normalize made them NFC).
    """
    array = _one_array(values)
    kind = array.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return pc.cast(array, pa.string())
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind) or pa.types.is_date32(kind):
        return pc.cast(array, pa.string())
    if pa.types.is_decimal(kind):
        return _decimal_text(array)
    if pa.types.is_timestamp(kind):
        if kind.tz is None:
            raise ValueError(f"a naive timestamp ({kind}) has no canonical instant; normalize makes UTC")
        # Arrow's cast of a naive microsecond timestamp writes "YYYY-MM-DD HH:MM:SS.ffffff"
        # (much faster than strftime, docs/benchmarks.md); the UTC wall clock is the naive value.
        wall = pc.cast(pc.cast(pc.cast(array, _UTC_TEXT), pa.timestamp("us")), pa.string())
        return pc.binary_join_element_wise(
            pc.utf8_replace_slice(wall, start=10, stop=11, replacement="T"), "Z", ""
        )
    raise ValueError(f"no canonical text for Arrow type {kind}")


def _one_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        if values.num_chunks == 1:
            only: pa.Array = values.chunks[0]
            return only
        combined: pa.Array = (
            pa.concat_arrays(values.chunks) if values.num_chunks else pa.array([], values.type)
        )
        return combined
    return values


def _decimal_text(array: pa.Array) -> pa.Array:
    """Plain fixed-scale text of a decimal (Arrow's own cast writes 1E-9 and 0E-2)."""
    kind = array.type
    scale = kind.scale
    if scale <= 6:
        # Arrow switches to exponent notation only below an adjusted exponent of -6,
        # which a scale of at most 6 never reaches: its own cast is the plain text.
        return pc.cast(array, pa.string())
    # The unscaled integer, read from the same buffers with scale 0: plain digits.
    unscaled_type = (
        pa.decimal128(kind.precision, 0) if kind.byte_width == 16 else pa.decimal256(kind.precision, 0)
    )
    unscaled = pa.Array.from_buffers(unscaled_type, len(array), array.buffers(), offset=array.offset)
    digits = pc.cast(unscaled, pa.string())
    if scale == 0:
        return digits
    negative = pc.starts_with(digits, "-")
    magnitude = pc.utf8_lpad(pc.utf8_ltrim(digits, characters="-"), width=scale + 1, padding="0")
    whole = pc.utf8_slice_codeunits(magnitude, 0, -scale)
    fraction = pc.utf8_slice_codeunits(magnitude, -scale)
    text = pc.binary_join_element_wise(whole, fraction, ".")
    # The unscaled integer of a zero is 0, so "-" never precedes 0.00.
    return pc.if_else(negative, pc.binary_join_element_wise("-", text, ""), text)


def canonical_key_text(entity: EntitySpec, rows: pa.Table) -> pa.Array:
    """`_bk`: the key values in business_key order, canonical, joined by KEY_SEPARATOR."""
    for field in entity.business_key:
        if field not in rows.column_names:
            raise ValueError(f"entity {entity.name!r}: business key field {field!r} is not in the rows")
        missing = rows.column(field).null_count
        if missing:
            raise ValueError(
                f"entity {entity.name!r}: business key field {field!r} is null in {missing} row(s); "
                "normalize rejects such rows"
            )
    return key_text_of([rows.column(field) for field in entity.business_key])


def key_text_of(columns: list[pa.Array | pa.ChunkedArray]) -> pa.Array:
    """Canonical key text of key columns in key order; null where any part is null."""
    texts = [canonical_text(column) for column in columns]
    if len(texts) == 1:
        return texts[0]
    return pc.binary_join_element_wise(*texts, KEY_SEPARATOR)


def key_hash_of(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """xxHash3-128 of each UTF-8 key text (null stays null): BK_HASH."""
    array = _as_binary(_one_array(texts))
    digest = xxhash.xxh3_128_digest
    present = array.drop_null() if array.null_count else array
    values: list[Any] = present.to_pylist()
    hashes = _from_digests(BK_HASH_TYPE, [digest(value) for value in values])
    if not array.null_count:
        return hashes
    return pc.replace_with_mask(pa.nulls(len(array)).cast(BK_HASH_TYPE), pc.is_valid(array), hashes)


def canonical_payload(entity: EntitySpec, rows: pa.Table) -> pa.Array:
    """The canonical payload text: every target field in declared order, each a token.

    A token is "~" for null and "<utf-8 byte length>:<canonical text>" otherwise,
    so tokens are self-delimiting: null differs from "", and no value can fake
    a field boundary.
    """
    for field in entity.targets:
        if field not in rows.column_names:
            raise ValueError(f"entity {entity.name!r}: target field {field!r} is not in the rows")

    def token(field: str) -> pa.Array:
        column = rows.column(field)
        text = canonical_text(column)
        width = _fixed_width(column)
        length = str(width) if width is not None else pc.cast(pc.binary_length(text), pa.string())
        # Null text makes the token null; the final join writes NULL_MARK for it.
        return pc.binary_join_element_wise(length, text, ":")

    tokens = run_column_jobs([partial(token, field) for field in entity.targets], rows.num_rows)
    return pc.binary_join_element_wise(*tokens, "", null_handling="replace", null_replacement=NULL_MARK)


def _fixed_width(column: pa.Array | pa.ChunkedArray) -> int | None:
    """The canonical text width of a date/datetime column whose years all have four digits."""
    if pa.types.is_date32(column.type):
        as_int, low, high, width = pc.cast(column, pa.int32()), _DAYS_0001_01_01, _DAYS_9999_12_31, 10
    elif pa.types.is_timestamp(column.type):
        as_int = pc.cast(pc.cast(column, _UTC_TEXT), pa.int64())
        low, high, width = _US_0001_01_01, _US_9999_12_31, 27
    else:
        return None
    bounds = pc.min_max(as_int).as_py()
    if bounds["min"] is None:
        return width  # all null: no value needs a prefix
    return width if low <= bounds["min"] and bounds["max"] <= high else None


def data_hash_of(payload: pa.Array) -> pa.Array:
    """BLAKE3-256 of each canonical payload: DATA_HASH (a payload is never null)."""
    if payload.null_count:
        raise ValueError("a canonical payload is never null; build it with canonical_payload")
    values: list[Any] = _as_binary(payload).to_pylist()
    # The hasher is bound once and called inline: a wrapper per row costs more than the hash.
    hasher = blake3.blake3
    return _from_digests(DATA_HASH_TYPE, [hasher(value).digest() for value in values])


def _as_binary(texts: pa.Array) -> pa.Array:
    return texts if pa.types.is_binary(texts.type) else pc.cast(texts, pa.binary())


def _from_digests(kind: pa.FixedSizeBinaryType, digests: list[bytes]) -> pa.Array:
    """Digests back into Arrow as one buffer (no per-row Arrow scalar)."""
    return pa.FixedSizeBinaryArray.from_buffers(kind, len(digests), [None, pa.py_buffer(b"".join(digests))])


def add_identity(entity: EntitySpec, rows: pa.Table, size: int = DEFAULT_CHUNK_SIZE) -> pa.Table:
    """Append `_bk`, `_bk_hash`, `_data_hash` and `_recipe` to normalized rows (hashed `size` rows at a time)."""
    key = canonical_key_text(entity, rows)
    table = rows
    for name in (BK, BK_HASH, DATA_HASH, RECIPE):
        if name in table.column_names:
            table = table.drop_columns([name])
    key_hashes, payload_hashes = identity_hashes(entity, rows, key, size)
    recipe = pa.repeat(pa.scalar(RECIPE_VERSION, RECIPE_TYPE), rows.num_rows)
    table = table.append_column(pa.field(BK, pa.string()), key)
    table = table.append_column(pa.field(BK_HASH, BK_HASH_TYPE), key_hashes)
    table = table.append_column(pa.field(DATA_HASH, DATA_HASH_TYPE), payload_hashes)
    return table.append_column(pa.field(RECIPE, RECIPE_TYPE), recipe)


def identity_hashes(
    entity: EntitySpec, rows: pa.Table, key: pa.Array, size: int = DEFAULT_CHUNK_SIZE
) -> tuple[pa.Array, pa.Array]:
    """(BK_HASH of each `key` text, DATA_HASH of each row), chunk by chunk (`size` rows).

    A row's canonical payload depends on that row alone, so chunking changes
    no hash. It bounds the per-row temporaries (payload text, one bytes object
    per row) by the chunk, and lets a worker thread build the next chunk's
    payload with Arrow kernels (which release the GIL) while this thread runs
    the GIL-bound hash loops: the key hashes of a chunk are taken while its
    payload is still being built, so neither core waits for the other at the
    start.
    """
    if rows.num_rows <= size:
        return key_hash_of(key), data_hash_of(canonical_payload(entity, rows))
    chunks = list(chunk_starts(rows.num_rows, size))
    keys: list[pa.Array] = []
    digests: list[pa.Array] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="syncflow-payload") as pool:
        pending = pool.submit(canonical_payload, entity, rows.slice(*chunks[0]))
        for index, (start, length) in enumerate(chunks):
            keys.append(key_hash_of(key.slice(start, length)))
            payload = pending.result()
            if index + 1 < len(chunks):
                pending = pool.submit(canonical_payload, entity, rows.slice(*chunks[index + 1]))
            digests.append(data_hash_of(payload))
            del payload
    return pa.concat_arrays(keys), pa.concat_arrays(digests)
