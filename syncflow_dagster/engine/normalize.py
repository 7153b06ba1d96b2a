"""Normalize: APISmith's raw records → typed rows under the catalog's target names.

Field mapping, then the layered coercions each field declares (type, string,
numeric, datetime, enum, bool), all columnar with pyarrow.compute; datetimes
and dates are read by `engine/datetimes/`. A value that cannot be coerced
never raises: its whole row moves to the rejected frame, with one rejected row
per bad value (entity, business key, field, raw value, reason), and the rest
of the batch goes on. Only a change of the source's shape (a required column
or the rowversion column missing) raises `SchemaDriftError`, because then every
row would be wrong in the same way.

Every value is first read as text (JSON numbers and booleans included), then
validated by a regular expression or a parser with `error_is_null` before any
cast, so that one bad value can never make a cast raise.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as _compute

from syncflow_dagster.catalog.models import EntitySpec, FieldSpec, FieldType, Precision, Rounding
from syncflow_dagster.engine.chunks import DEFAULT_CHUNK_SIZE, chunk_starts
from syncflow_dagster.engine.coerced import Coerced, empty_to_null
from syncflow_dagster.engine.columns import (
    CHANGED_AT,
    CHANGED_AT_TYPE,
    KEY_SEPARATOR,
    REJECTED_SCHEMA,
    ROWVERSION,
    ROWVERSION_TYPE,
)
from syncflow_dagster.engine.datetimes import coerce_date_column, coerce_datetime

# The pyarrow stubs type each compute function per concrete array class; the
# arrays here get their types at run time, so compute calls are left untyped.
pc: Any = _compute


class SchemaDriftError(ValueError):
    """The source's columns no longer match the catalog (a required column is gone)."""


@dataclass(frozen=True)
class NormalizeResult:
    """Typed rows that passed every layer, and one rejected row per bad value."""

    rows: pa.Table
    rejected: pa.Table


# Reasons, spelled once so that reports can group by them.
REASON_MISSING = "required value is missing"
REASON_NOT_INT = "not an integer"
REASON_INT_RANGE = "integer out of range for int64"
REASON_NOT_DECIMAL = "not a decimal"
REASON_CONTROL = "contains a control character"

# C0 controls except tab, LF and CR, plus DEL: never legitimate in ERP text, and
# KEY_SEPARATOR (0x1f) must not occur inside a key value.
_CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"
_INT = r"^[+-]?[0-9]+(\.0*)?$"
_INT64_MAX_DIGITS = "9223372036854775807"
_INT64_MIN_DIGITS = "9223372036854775808"
_DECIMAL = r"^(?P<sign>[+-]?)(?P<int>[0-9]*)(?:\.(?P<frac>[0-9]*))?(?:[eE](?P<exp>[+-]?[0-9]{1,4}))?$"
# Decimals are parsed wide (38 fractional digits) so the rounding mode sees
# every digit the source sent, then rounded and narrowed to decimal128(38, scale).
_WIDE_DECIMAL = pa.decimal256(76, 38)
_WIDE_FRACTION = 38
# 19 integer digits stay below 10**19 even after a rounding carry, inside decimal128(38, 18).
_PLAIN_DECIMAL = r"^[+-]?([0-9]{1,19}(\.[0-9]{0,18})?|\.[0-9]{1,18})$"
_PLAIN_WIDE = pa.decimal128(38, 18)
# Below this many rows, thread start-up costs more than the columns take.
_THREADED_ROWS = 50_000
_T = TypeVar("_T")
_ROUND_MODE = {
    # half_up is the commercial rule: ties away from zero (Java's HALF_UP);
    # Arrow's own "half_up" rounds ties towards +infinity, which is not it.
    Rounding.HALF_EVEN: "half_to_even",
    Rounding.HALF_UP: "half_towards_infinity",
    Rounding.DOWN: "towards_zero",
}


def target_type(spec: FieldSpec) -> pa.DataType:
    """The Arrow type a field has after normalisation (the frame contract)."""
    if spec.type is FieldType.INT:
        return pa.int64()
    if spec.type is FieldType.DECIMAL:
        return pa.decimal128(38, spec.scale or 0)
    if spec.type is FieldType.BOOL:
        return pa.bool_()
    if spec.type is FieldType.DATE:
        return pa.date32()
    if spec.type is FieldType.DATETIME:
        return CHANGED_AT_TYPE
    return pa.string()


def rows_schema(entity: EntitySpec) -> pa.Schema:
    """The schema of `NormalizeResult.rows` for an entity."""
    fields = [pa.field(spec.target, target_type(spec)) for spec in entity.fields]
    fields += [pa.field(ROWVERSION, ROWVERSION_TYPE), pa.field(CHANGED_AT, CHANGED_AT_TYPE)]
    return pa.schema(fields)


def normalize(entity: EntitySpec, raw: pa.Table, size: int = DEFAULT_CHUNK_SIZE) -> NormalizeResult:
    """Map and coerce `raw` (APISmith source names) into typed rows for `entity`.

    Every row is coerced on its own, so a frame of more than `size` rows
    is normalised chunk by chunk and the pieces joined
    (without copying): the per-column temporaries, the combined source
    columns and the filtered copy are then bounded by the chunk, not the frame.
    """
    _check_shape(entity, raw)
    if raw.num_rows <= size:
        return _normalize_chunk(entity, raw)
    parts = [_normalize_chunk(entity, raw.slice(*chunk)) for chunk in chunk_starts(raw.num_rows, size)]
    return NormalizeResult(
        rows=pa.concat_tables([part.rows for part in parts]),
        rejected=pa.concat_tables([part.rejected for part in parts]),
    )


def _check_shape(entity: EntitySpec, raw: pa.Table) -> None:
    """Raise SchemaDriftError when a column every row needs is missing from the source."""
    columns = set(raw.column_names)
    if entity.rowversion not in columns:
        raise SchemaDriftError(
            f"entity {entity.name!r}: the rowversion column {entity.rowversion!r} is missing "
            f"from the source records (columns: {sorted(columns)})"
        )
    if entity.changed_at not in columns:
        raise SchemaDriftError(
            f"entity {entity.name!r}: the changed_at column {entity.changed_at!r} is missing "
            f"from the source records (columns: {sorted(columns)})"
        )
    key_targets = set(entity.business_key)
    for spec in entity.fields:
        if spec.source not in columns and (spec.required or spec.target in key_targets):
            raise SchemaDriftError(
                f"entity {entity.name!r}: required source column {spec.source!r} "
                f"(target {spec.target!r}) is missing from the source records"
            )


def _normalize_chunk(entity: EntitySpec, raw: pa.Table) -> NormalizeResult:
    """`normalize` of rows whose shape `_check_shape` accepted."""
    n = raw.num_rows
    columns = set(raw.column_names)
    key_targets = set(entity.business_key)

    def coerce(spec: FieldSpec) -> tuple[str, str | None, Coerced]:
        """One field through its layers: (source name, raw column read, result)."""
        if spec.source not in columns:
            # An optional field the source no longer sends is all-null: nothing to reject.
            return spec.source, None, Coerced(_nulls(n, target_type(spec)), [])
        result = _coerce_field(entity, spec, _combined(raw.column(spec.source)))
        if spec.required or spec.target in key_targets:
            result.reject(pc.and_(pc.is_null(result.values), _no_problem(result, n)), REASON_MISSING)
        return spec.source, spec.source, result

    def coerce_rowversion() -> tuple[str, str | None, Coerced]:
        column = _combined(raw.column(entity.rowversion))
        typed = _integers(column)
        result = typed if typed is not None else _coerce_int(_text(entity, entity.rowversion, column))
        result.reject(pc.and_(pc.is_null(result.values), _no_problem(result, n)), REASON_MISSING)
        return entity.rowversion, entity.rowversion, result

    def coerce_changed_at() -> tuple[str, str | None, Coerced]:
        result = coerce_datetime(
            _text_or_timestamp(entity, entity.changed_at, _combined(raw.column(entity.changed_at))),
            formats=(),
            timezone="UTC",
            precision=Precision.MICROSECOND,
        )
        result.reject(pc.and_(pc.is_null(result.values), _no_problem(result, n)), REASON_MISSING)
        return entity.changed_at, entity.changed_at, result

    # Columns are independent and Arrow's kernels release the GIL, so the fields
    # are coerced on Arrow's CPU count of threads (pa.set_cpu_count limits it).
    jobs: list[Callable[[], tuple[str, str | None, Coerced]]] = [
        *(partial(coerce, spec) for spec in entity.fields),
        coerce_rowversion,
        coerce_changed_at,
    ]
    coerced = run_column_jobs(jobs, n)

    bad_row = pa.repeat(pa.scalar(False, pa.bool_()), n)
    for _, _, result in coerced:
        for mask, _ in result.problems:
            bad_row = pc.or_(bad_row, mask)

    names = [*entity.targets, ROWVERSION, CHANGED_AT]
    table = pa.Table.from_arrays([result.values for _, _, result in coerced], schema=rows_schema(entity))
    assert table.column_names == names
    has_bad = n > 0 and pc.any(bad_row).as_py()
    rows = table.filter(pc.invert(bad_row)) if has_bad else table
    rejected = _rejected_frame(entity, raw, coerced) if has_bad else REJECTED_SCHEMA.empty_table()
    return NormalizeResult(rows=rows, rejected=rejected)


def run_column_jobs(jobs: list[Callable[[], _T]], rows: int) -> list[_T]:
    """Run independent per-column jobs, on threads when the batch is big enough to gain.

    Arrow's kernels release the GIL, so columns proceed in parallel on Arrow's
    CPU count (`pa.set_cpu_count` limits it); results keep the jobs' order.
    """
    workers = min(pa.cpu_count(), len(jobs))
    if workers <= 1 or rows < _THREADED_ROWS:
        return [job() for job in jobs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="syncflow-normalize") as pool:
        return list(pool.map(lambda job: job(), jobs))


def _combined(column: pa.ChunkedArray) -> pa.Array:
    if column.num_chunks == 1:
        only: pa.Array = column.chunks[0]
        return only
    combined: pa.Array = pa.concat_arrays(column.chunks) if column.num_chunks else pa.array([], column.type)
    return combined


def _nulls(n: int, type_: pa.DataType) -> pa.Array:
    nulls: pa.Array = pa.nulls(n).cast(type_)
    return nulls


def _no_problem(result: Coerced, n: int) -> pa.Array:
    """Rows of this column not already rejected for a bad value (so 'missing' is not added twice)."""
    ok = pa.repeat(pa.scalar(True, pa.bool_()), n)
    for mask, _ in result.problems:
        ok = pc.and_(ok, pc.invert(mask))
    return ok


def _text(entity: EntitySpec, source: str, column: pa.Array) -> pa.Array:
    """Any JSON-native column as text; null stays null."""
    if pa.types.is_string(column.type):
        return column
    if pa.types.is_null(column.type):
        return pa.nulls(len(column), pa.string())
    try:
        return pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise SchemaDriftError(
            f"entity {entity.name!r}: source column {source!r} has type {column.type}, "
            "which cannot be read as text"
        ) from exc


def _text_or_timestamp(entity: EntitySpec, source: str, column: pa.Array) -> pa.Array:
    return column if pa.types.is_timestamp(column.type) else _text(entity, source, column)


def _coerce_field(entity: EntitySpec, spec: FieldSpec, column: pa.Array) -> Coerced:
    if spec.type is FieldType.BOOL and pa.types.is_boolean(column.type):
        return Coerced(column, [])
    if spec.type is FieldType.DATETIME:
        return coerce_datetime(
            _text_or_timestamp(entity, spec.source, column),
            formats=spec.formats,
            timezone=spec.timezone,
            precision=spec.datetime_precision,
        )
    if spec.type is FieldType.INT:
        typed = _integers(column)
        if typed is not None:
            return typed
    text = _text(entity, spec.source, column)
    if spec.type in (FieldType.STRING, FieldType.ENUM):
        result = _string_layer(spec, text)
        if spec.type is FieldType.ENUM:
            result = _enum_layer(spec, result)
        return result
    if spec.type is FieldType.DATE:
        return coerce_date_column(spec, text)
    text = pc.utf8_trim_whitespace(text)
    if spec.type is FieldType.BOOL:
        return _coerce_bool(spec, text)
    text = empty_to_null(text)
    if spec.type is FieldType.INT:
        return _coerce_int(text)
    result = _coerce_decimal(spec, text)
    if spec.decimal_precision is not None:
        _within_precision(result, spec.decimal_precision, spec.scale or 0)
    return result


def _within_precision(result: Coerced, precision: int, scale: int) -> None:
    """A decimal declared `precision: P` (with `scale: S`) holds at most P - S integer digits."""
    limit = Decimal(10) ** (precision - scale)
    too_big = pc.greater_equal(pc.abs(result.values), pa.scalar(limit, result.values.type))
    result.reject(
        too_big,
        f"decimal out of range (precision {precision}, scale {scale}: at most {precision - scale} integer digits)",
    )
    result.values = pc.if_else(
        pc.fill_null(too_big, False), pa.scalar(None, result.values.type), result.values
    )


def _string_layer(spec: FieldSpec, text: pa.Array) -> Coerced:
    if spec.trim:
        text = pc.utf8_trim_whitespace(text)
    if spec.nfc:
        text = pc.utf8_normalize(text, form="NFC")
    if spec.case.value == "upper":
        text = pc.utf8_upper(text)
    elif spec.case.value == "lower":
        text = pc.utf8_lower(text)
    if spec.empty_as_null:
        text = empty_to_null(text)
    result = Coerced(text, [])
    if _may_hold_control(text):
        result.reject(pc.match_substring_regex(text, _CONTROL_CHARS), REASON_CONTROL)
    if spec.max_length is not None:
        length = pc.utf8_length(text)
        too_long = pc.greater(length, spec.max_length)
        result.reject(
            too_long,
            lambda: pc.binary_join_element_wise(
                f"longer than max_length {spec.max_length} (",
                pc.cast(length, pa.string()),
                " characters)",
                "",
            ),
        )
    return result


# The bytes of _CONTROL_CHARS. UTF-8 never uses a byte below 0x80 inside a
# multi-byte character, so a column whose bytes hold none of these has no such
# character, and one look at its data buffer spares the per-value regex.
_CONTROL_BYTES = np.zeros(256, dtype=bool)
_CONTROL_BYTES[[*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F]] = True


def _may_hold_control(text: pa.Array) -> bool:
    """False when no value of a string column can hold a control character (a quick byte scan)."""
    if not pa.types.is_string(text.type) or len(text) == 0:
        return len(text) > 0
    _, offsets_buffer, data_buffer = text.buffers()
    if data_buffer is None or offsets_buffer is None:
        return False
    offsets = np.frombuffer(
        memoryview(offsets_buffer), dtype=np.int32, count=len(text) + 1, offset=text.offset * 4
    )
    data = np.frombuffer(memoryview(data_buffer), dtype=np.uint8)[offsets[0] : offsets[-1]]
    return bool(_CONTROL_BYTES[data].any())


def _enum_layer(spec: FieldSpec, result: Coerced) -> Coerced:
    text = result.values
    if spec.aliases:
        # Alias spellings go through the same case rule as the values they map.
        fold = {"upper": str.upper, "lower": str.lower}.get(spec.case.value, str)
        spellings = pa.array([fold(alias) for alias in spec.aliases], pa.string())
        meanings = pa.array(list(spec.aliases.values()), pa.string())
        mapped = pc.take(meanings, pc.index_in(text, value_set=spellings))
        text = pc.coalesce(mapped, text)
    allowed = pa.array(list(spec.values), pa.string())
    unknown = pc.and_(pc.is_valid(text), pc.invert(pc.is_in(text, value_set=allowed)))
    allowed_text = "'; allowed: " + ", ".join(spec.values)
    result.reject(
        unknown, lambda: pc.binary_join_element_wise("unknown enum value '", result.values, allowed_text, "")
    )
    return Coerced(text, result.problems)


def _coerce_bool(spec: FieldSpec, text: pa.Array) -> Coerced:
    lowered = pc.utf8_lower(text)
    truthy = pc.is_in(lowered, value_set=pa.array([v.lower() for v in spec.true_values], pa.string()))
    falsy = pc.is_in(lowered, value_set=pa.array([v.lower() for v in spec.false_values], pa.string()))
    values = pc.if_else(truthy, True, pc.if_else(falsy, False, pa.scalar(None, pa.bool_())))
    values = pc.if_else(pc.is_null(text), pa.scalar(None, pa.bool_()), values)
    result = Coerced(values, [])
    reason = (
        f"not a boolean (true: {', '.join(map(repr, spec.true_values))}; "
        f"false: {', '.join(map(repr, spec.false_values))})"
    )
    result.reject(pc.and_(pc.is_valid(text), pc.is_null(values)), reason)
    return result


def _integers(column: pa.Array) -> Coerced | None:
    """An integer-typed column as int64 with no text round trip, or None when it needs the text path.

    Every value of a signed or narrow unsigned type fits int64; a uint64 column
    does when its largest value does (otherwise the text path names the values
    out of range).
    """
    if not pa.types.is_integer(column.type):
        return None
    if pa.types.is_uint64(column.type):
        largest = pc.max(column).as_py()
        if largest is not None and largest > 2**63 - 1:
            return None
    return Coerced(pc.cast(column, pa.int64()), [])


def _coerce_int(text: pa.Array) -> Coerced:
    text = empty_to_null(pc.utf8_trim_whitespace(text))
    shaped = pc.match_substring_regex(text, _INT)
    digits = pc.utf8_ltrim(pc.replace_substring_regex(text, r"^[+-]|\.0*$", ""), characters="0")
    negative = pc.starts_with(text, "-")
    length = pc.utf8_length(digits)
    # Same-length digit strings compare as numbers, so the int64 bound is a string compare.
    fits = pc.or_(
        pc.less(length, 19),
        pc.and_(
            pc.equal(length, 19),
            pc.if_else(
                negative,
                pc.less_equal(digits, _INT64_MIN_DIGITS),
                pc.less_equal(digits, _INT64_MAX_DIGITS),
            ),
        ),
    )
    good = pc.and_(shaped, fits)
    clean = pc.replace_substring_regex(text, r"^\+|\.0*$", "")
    values = pc.cast(pc.if_else(good, clean, pa.scalar(None, pa.string())), pa.int64())
    result = Coerced(values, [])
    result.reject(pc.invert(shaped), REASON_NOT_INT)
    result.reject(pc.and_(shaped, pc.invert(fits)), REASON_INT_RANGE)
    return result


def _coerce_decimal(spec: FieldSpec, text: pa.Array) -> Coerced:
    """Plain decimals (at most 19 integer and 18 fractional digits) take a short path
    through decimal128; the rest (exponents, long digits, garbage) the general one."""
    scale = spec.scale or 0
    plain = pc.fill_null(pc.match_substring_regex(text, _PLAIN_DECIMAL), False)
    values = pc.cast(pc.if_else(plain, text, pa.scalar(None, pa.string())), _PLAIN_WIDE)
    values = pc.cast(
        pc.round(values, ndigits=scale, round_mode=_ROUND_MODE[spec.rounding]), pa.decimal128(38, scale)
    )
    rest = pc.and_(pc.is_valid(text), pc.invert(plain))
    if not pc.any(rest).as_py():
        return Coerced(values, [])
    general = _coerce_decimal_general(spec, text.filter(rest))
    result = Coerced(pc.replace_with_mask(values, rest, general.values), [])
    nowhere = pa.repeat(pa.scalar(False, pa.bool_()), len(text))
    for mask, reason in general.problems:
        result.reject(pc.replace_with_mask(nowhere, rest, mask), reason)
    return result


def _coerce_decimal_general(spec: FieldSpec, text: pa.Array) -> Coerced:
    scale = spec.scale or 0
    parts = pc.extract_regex(text, _DECIMAL)
    int_part = pc.struct_field(parts, "int")
    frac_part = pc.struct_field(parts, "frac")
    exp_text = pc.struct_field(parts, "exp")
    has_digits = pc.or_(pc.greater(pc.utf8_length(int_part), 0), pc.greater(pc.utf8_length(frac_part), 0))
    shaped = pc.and_(pc.is_valid(parts), pc.fill_null(has_digits, False))
    exponent = pc.cast(pc.if_else(pc.equal(exp_text, ""), "0", exp_text), pa.int64())
    int_digits = pc.add(pc.utf8_length(pc.utf8_ltrim(int_part, characters="0")), exponent)
    frac_digits = pc.subtract(pc.utf8_length(pc.utf8_rtrim(frac_part, characters="0")), exponent)
    # Checked on digit counts before the wide cast, so the cast itself cannot overflow.
    in_range = pc.and_(pc.less_equal(int_digits, 38 - scale), pc.less_equal(frac_digits, _WIDE_FRACTION))
    good = pc.and_(shaped, pc.fill_null(in_range, False))
    wide = pc.cast(pc.if_else(good, text, pa.scalar(None, pa.string())), _WIDE_DECIMAL)
    rounded = pc.round(wide, ndigits=scale, round_mode=_ROUND_MODE[spec.rounding])
    largest = Decimal("9" * (38 - scale) + ("." + "9" * scale if scale else ""))
    fits = pc.less_equal(pc.abs(rounded), pa.scalar(largest, _WIDE_DECIMAL))  # a carry can add a digit
    rounded = pc.if_else(fits, rounded, pa.scalar(None, _WIDE_DECIMAL))
    # Decimals have no negative zero: -0.00 parses to the same value as 0.00.
    values = pc.cast(rounded, pa.decimal128(38, scale))
    result = Coerced(values, [])
    result.reject(pc.and_(pc.is_valid(text), pc.invert(shaped)), REASON_NOT_DECIMAL)
    out_of_range = pc.and_(
        shaped, pc.invert(pc.and_(pc.fill_null(in_range, False), pc.fill_null(fits, True)))
    )
    result.reject(
        out_of_range,
        f"decimal out of range (at most {38 - scale} integer and {_WIDE_FRACTION} fractional digits)",
    )
    return result


def _rejected_frame(
    entity: EntitySpec, raw: pa.Table, coerced: list[tuple[str, str | None, Coerced]]
) -> pa.Table:
    """One row per bad value, with the raw key text (best effort) to find the record again."""
    key_text = []
    for target in entity.business_key:
        source = entity.field_by_target[target].source
        column = _text(entity, source, _combined(raw.column(source)))
        key_text.append(pc.fill_null(column, ""))
    business_key = pc.binary_join_element_wise(*key_text, KEY_SEPARATOR)
    pieces: list[pa.Table] = []
    for source, raw_name, result in coerced:
        raw_value = _text(entity, source, _combined(raw.column(raw_name))) if raw_name is not None else None
        for mask, reason in result.problems:
            count = pc.sum(mask).as_py() or 0
            reasons = (
                reason.filter(mask)
                if isinstance(reason, pa.Array)
                else pa.repeat(pa.scalar(reason, pa.string()), count)
            )
            values = raw_value.filter(mask) if raw_value is not None else pa.nulls(count, pa.string())
            pieces.append(
                pa.Table.from_arrays(
                    [
                        pa.repeat(pa.scalar(entity.name, pa.string()), count),
                        business_key.filter(mask),
                        pa.repeat(pa.scalar(source, pa.string()), count),
                        pc.cast(values, pa.string()),
                        pc.cast(reasons, pa.string()),
                    ],
                    schema=REJECTED_SCHEMA,
                )
            )
    return pa.concat_tables(pieces) if pieces else REJECTED_SCHEMA.empty_table()
