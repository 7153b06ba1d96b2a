"""Normalize: APISmith's raw records → typed rows under the catalog's target names.

Field mapping, then the layered coercions each field declares (type, string,
numeric, datetime, enum, bool), all columnar with pyarrow.compute. A value that
cannot be coerced never raises: its whole row moves to the rejected frame, with
one rejected row per bad value (entity, business key, field, raw value,
reason), and the rest of the batch goes on. Only a change of the source's
shape (a required column or the rowversion column missing) raises
`SchemaDriftError`, because then every row would be wrong in the same way.

Every value is first read as text (JSON numbers and booleans included), then
validated by a regular expression or a parser with `error_is_null` before any
cast, so that one bad value can never make a cast raise.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache, partial
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as _compute

from syncflow_dagster.catalog.models import EntitySpec, FieldSpec, FieldType, Precision, Rounding
from syncflow_dagster.engine.chunks import chunk_size, chunk_starts
from syncflow_dagster.engine.columns import (
    CHANGED_AT,
    CHANGED_AT_TYPE,
    KEY_SEPARATOR,
    REJECTED_SCHEMA,
    ROWVERSION,
    ROWVERSION_TYPE,
)
from syncflow_dagster.engine.fixed_time import (
    Candidate,
    FixedRead,
    format_candidate,
    iso_datetime_candidate,
    read_fixed,
)

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
_ISO_DATETIME = (
    r"^(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ](?P<time>[0-9]{2}:[0-9]{2}(?::[0-9]{2})?)"
    r"(?:[.,](?P<frac>[0-9]{1,9}))?(?P<zone>[Zz]|[+-][0-9]{2}(?::?[0-9]{2})?)?$"
)
_ISO_OFFSET = r"^(?P<sign>[+-])(?P<hours>[0-9]{2}):?(?P<minutes>[0-9]{2})?$"
_ISO_DATE = "%Y-%m-%d"
_ISO_BARE_DATE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"
# Below this many rows, thread start-up costs more than the columns take.
_THREADED_ROWS = 50_000
_T = TypeVar("_T")
_ISO_STAMP = "%Y-%m-%d %H:%M:%S"
_ZERO_PADDED_ISO = (_ISO_DATE, _ISO_STAMP)
_ROUND_MODE = {
    # half_up is the commercial rule: ties away from zero (Java's HALF_UP);
    # Arrow's own "half_up" rounds ties towards +infinity, which is not it.
    Rounding.HALF_EVEN: "half_to_even",
    Rounding.HALF_UP: "half_towards_infinity",
    Rounding.DOWN: "towards_zero",
}
_FLOOR_UNIT = {Precision.SECOND: "second", Precision.MILLISECOND: "millisecond"}


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


@dataclass
class _Coerced:
    """One column after its layers: typed values and the (mask, reason) of each bad value."""

    values: pa.Array
    problems: list[tuple[pa.Array, pa.Array | str]]

    def reject(self, mask: pa.Array, reason: pa.Array | str | Callable[[], pa.Array]) -> None:
        """Record bad values; a per-value reason is built only when some value is bad."""
        mask = pc.fill_null(mask, False)
        if pc.any(mask).as_py():
            self.problems.append((mask, reason() if callable(reason) else reason))


def normalize(entity: EntitySpec, raw: pa.Table, size: int | None = None) -> NormalizeResult:
    """Map and coerce `raw` (APISmith source names) into typed rows for `entity`.

    Every row is coerced on its own, so a frame of more than `size` rows
    (SYNCFLOW_CHUNK_SIZE) is normalised chunk by chunk and the pieces joined
    (without copying): the per-column temporaries, the combined source
    columns and the filtered copy are then bounded by the chunk, not the frame.
    """
    _check_shape(entity, raw)
    size = size or chunk_size()
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

    def coerce(spec: FieldSpec) -> tuple[str, str | None, _Coerced]:
        """One field through its layers: (source name, raw column read, result)."""
        if spec.source not in columns:
            # An optional field the source no longer sends is all-null: nothing to reject.
            return spec.source, None, _Coerced(_nulls(n, target_type(spec)), [])
        result = _coerce_field(entity, spec, _combined(raw.column(spec.source)))
        if spec.required or spec.target in key_targets:
            result.reject(pc.and_(pc.is_null(result.values), _no_problem(result, n)), REASON_MISSING)
        return spec.source, spec.source, result

    def coerce_rowversion() -> tuple[str, str | None, _Coerced]:
        column = _combined(raw.column(entity.rowversion))
        typed = _integers(column)
        result = typed if typed is not None else _coerce_int(_text(entity, entity.rowversion, column))
        result.reject(pc.and_(pc.is_null(result.values), _no_problem(result, n)), REASON_MISSING)
        return entity.rowversion, entity.rowversion, result

    def coerce_changed_at() -> tuple[str, str | None, _Coerced]:
        result = _coerce_datetime(
            _text_or_timestamp(entity, entity.changed_at, _combined(raw.column(entity.changed_at))),
            formats=(),
            timezone="UTC",
            precision=Precision.MICROSECOND,
        )
        result.reject(pc.and_(pc.is_null(result.values), _no_problem(result, n)), REASON_MISSING)
        return entity.changed_at, entity.changed_at, result

    # Columns are independent and Arrow's kernels release the GIL, so the fields
    # are coerced on Arrow's CPU count of threads (pa.set_cpu_count limits it).
    jobs: list[Callable[[], tuple[str, str | None, _Coerced]]] = [
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


def _no_problem(result: _Coerced, n: int) -> pa.Array:
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


def _coerce_field(entity: EntitySpec, spec: FieldSpec, column: pa.Array) -> _Coerced:
    if spec.type is FieldType.BOOL and pa.types.is_boolean(column.type):
        return _Coerced(column, [])
    if spec.type is FieldType.DATETIME:
        return _coerce_datetime(
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
        return _coerce_date_column(spec, text)
    text = pc.utf8_trim_whitespace(text)
    if spec.type is FieldType.BOOL:
        return _coerce_bool(spec, text)
    text = _empty_to_null(text)
    if spec.type is FieldType.INT:
        return _coerce_int(text)
    result = _coerce_decimal(spec, text)
    if spec.decimal_precision is not None:
        _within_precision(result, spec.decimal_precision, spec.scale or 0)
    return result


def _within_precision(result: _Coerced, precision: int, scale: int) -> None:
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


def _empty_to_null(text: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(text, ""), pa.scalar(None, text.type), text)


def _string_layer(spec: FieldSpec, text: pa.Array) -> _Coerced:
    if spec.trim:
        text = pc.utf8_trim_whitespace(text)
    if spec.nfc:
        text = pc.utf8_normalize(text, form="NFC")
    if spec.case.value == "upper":
        text = pc.utf8_upper(text)
    elif spec.case.value == "lower":
        text = pc.utf8_lower(text)
    if spec.empty_as_null:
        text = _empty_to_null(text)
    result = _Coerced(text, [])
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


def _enum_layer(spec: FieldSpec, result: _Coerced) -> _Coerced:
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
    return _Coerced(text, result.problems)


def _coerce_bool(spec: FieldSpec, text: pa.Array) -> _Coerced:
    lowered = pc.utf8_lower(text)
    truthy = pc.is_in(lowered, value_set=pa.array([v.lower() for v in spec.true_values], pa.string()))
    falsy = pc.is_in(lowered, value_set=pa.array([v.lower() for v in spec.false_values], pa.string()))
    values = pc.if_else(truthy, True, pc.if_else(falsy, False, pa.scalar(None, pa.bool_())))
    values = pc.if_else(pc.is_null(text), pa.scalar(None, pa.bool_()), values)
    result = _Coerced(values, [])
    reason = (
        f"not a boolean (true: {', '.join(map(repr, spec.true_values))}; "
        f"false: {', '.join(map(repr, spec.false_values))})"
    )
    result.reject(pc.and_(pc.is_valid(text), pc.is_null(values)), reason)
    return result


def _integers(column: pa.Array) -> _Coerced | None:
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
    return _Coerced(pc.cast(column, pa.int64()), [])


def _coerce_int(text: pa.Array) -> _Coerced:
    text = _empty_to_null(pc.utf8_trim_whitespace(text))
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
    result = _Coerced(values, [])
    result.reject(pc.invert(shaped), REASON_NOT_INT)
    result.reject(pc.and_(shaped, pc.invert(fits)), REASON_INT_RANGE)
    return result


def _coerce_decimal(spec: FieldSpec, text: pa.Array) -> _Coerced:
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
        return _Coerced(values, [])
    general = _coerce_decimal_general(spec, text.filter(rest))
    result = _Coerced(pc.replace_with_mask(values, rest, general.values), [])
    nowhere = pa.repeat(pa.scalar(False, pa.bool_()), len(text))
    for mask, reason in general.problems:
        result.reject(pc.replace_with_mask(nowhere, rest, mask), reason)
    return result


def _coerce_decimal_general(spec: FieldSpec, text: pa.Array) -> _Coerced:
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
    result = _Coerced(values, [])
    result.reject(pc.and_(pc.is_valid(text), pc.invert(shaped)), REASON_NOT_DECIMAL)
    out_of_range = pc.and_(
        shaped, pc.invert(pc.and_(pc.fill_null(in_range, False), pc.fill_null(fits, True)))
    )
    result.reject(
        out_of_range,
        f"decimal out of range (at most {38 - scale} integer and {_WIDE_FRACTION} fractional digits)",
    )
    return result


def _date_formats(spec: FieldSpec) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*spec.formats, _ISO_DATE)))  # ISO always accepted, last


def _coerce_date_column(spec: FieldSpec, text: pa.Array) -> _Coerced:
    """Dates: zero-padded values by fixed position, the rest trimmed and through `_coerce_date`."""
    read = read_fixed(text, _date_candidates(_date_formats(spec)))
    if read is None or not read.done.any():
        return _coerce_date(spec, _empty_to_null(pc.utf8_trim_whitespace(text)))
    days = (read.local_us // 86_400_000_000).astype(np.int32)  # date-only layouts: whole days
    fast = pa.array(days, pa.date32(), mask=~read.done | read.empty)
    rest = ~read.done
    if not rest.any():
        return _Coerced(fast, [])
    general = _coerce_date(spec, _empty_to_null(pc.utf8_trim_whitespace(text.filter(pa.array(rest)))))
    return _merge_general(fast, rest, general)


def _coerce_date(spec: FieldSpec, text: pa.Array) -> _Coerced:
    """The general date path (trimmed text, empty as null): each format in order, calendar-checked."""
    formats = _date_formats(spec)
    values = pa.nulls(len(text)).cast(pa.date32())
    waiting = pc.is_valid(text)
    for fmt in formats:  # each tried only on what earlier formats could not read
        if not pc.any(waiting).as_py():
            break
        parsed = pc.cast(_parse_format(text.filter(waiting), fmt), pa.date32())
        values = pc.replace_with_mask(values, waiting, parsed)
        waiting = pc.replace_with_mask(waiting, waiting, pc.is_null(parsed))
    result = _Coerced(values, [])
    result.reject(
        pc.and_(pc.is_valid(text), pc.is_null(values)),
        f"not a date (accepted formats: {', '.join(formats)})",
    )
    return result


def _coerce_datetime(
    column: pa.Array, *, formats: tuple[str, ...], timezone: str, precision: Precision
) -> _Coerced:
    if pa.types.is_timestamp(column.type):
        typed = column if column.type.tz else _localize(column, timezone)
        values = pc.cast(typed, pa.timestamp(column.type.unit, tz="UTC")).cast(CHANGED_AT_TYPE)
        return _Coerced(_at_precision(values, precision), [])
    read = read_fixed(column, _datetime_candidates(formats))
    if read is None or not read.done.any():
        return _coerce_datetime_text(column, formats=formats, timezone=timezone, precision=precision)
    fast = _fixed_datetimes(read, timezone, precision)
    rest = ~read.done
    if not rest.any():
        return _Coerced(fast, [])
    general = _coerce_datetime_text(
        column.filter(pa.array(rest)), formats=formats, timezone=timezone, precision=precision
    )
    return _merge_general(fast, rest, general)


def _merge_general(fast: pa.Array, rest: np.ndarray, general: _Coerced) -> _Coerced:
    """The fixed-position values with the general path's values and rejections put in at `rest`."""
    where = pa.array(rest)
    result = _Coerced(pc.replace_with_mask(fast, where, general.values), [])
    nowhere = pa.repeat(pa.scalar(False, pa.bool_()), len(rest))
    for mask, reason in general.problems:
        result.reject(pc.replace_with_mask(nowhere, where, mask), reason)
    return result


def _format_candidate(fmt: str, *, readable: bool) -> Candidate:
    """A declared format as a candidate of the fixed-position reader (opaque unless regex-compiled)."""
    if _format_regex(fmt) is None:
        return Candidate(opaque=True)
    return format_candidate(fmt, readable=readable)


@lru_cache(maxsize=64)
def _datetime_candidates(formats: tuple[str, ...]) -> tuple[Candidate, ...]:
    """The general datetime path's candidates in its order: ISO-8601, then each declared format."""
    return (iso_datetime_candidate(), *(_format_candidate(fmt, readable=True) for fmt in formats))


@lru_cache(maxsize=64)
def _date_candidates(formats: tuple[str, ...]) -> tuple[Candidate, ...]:
    """`_coerce_date`'s formats in its order; only formats without a time of day are read."""
    candidates = []
    for fmt in formats:
        compiled = _format_regex(fmt)
        date_only = compiled is not None and compiled[1] <= {"Y", "m", "d"}
        candidates.append(_format_candidate(fmt, readable=date_only))
    return tuple(candidates)


def _fixed_datetimes(read: FixedRead, timezone: str, precision: Precision) -> pa.Array:
    """UTC values of the rows `read_fixed` took; naive ones through `_localize` like the general path."""
    utc = read.local_us - read.offset_us
    naive = read.naive & read.done
    if naive.any():
        localized = _localize(pa.array(read.local_us[naive], pa.timestamp("us")), timezone)
        utc[naive] = localized.view(pa.int64()).to_numpy()
    values = pa.array(utc, CHANGED_AT_TYPE, mask=~read.done | read.empty)
    # Without a fraction every value is a whole second, which no precision changes.
    return _at_precision(values, precision) if read.fraction else values


def _coerce_datetime_text(
    column: pa.Array, *, formats: tuple[str, ...], timezone: str, precision: Precision
) -> _Coerced:
    """The general text path: ISO-8601 in all its forms, then each declared format."""
    text = _empty_to_null(pc.utf8_trim_whitespace(column))
    values = pa.nulls(len(text)).cast(CHANGED_AT_TYPE)
    waiting = pc.is_valid(text)
    # Candidates in order (ISO first, then the declared formats), each tried only
    # on the values no earlier one could read, so a batch pays for one parse per value.
    candidates: list[str | None] = [None, *formats]
    for fmt in candidates:
        if not pc.any(waiting).as_py():
            break
        subset = text.filter(waiting)
        if fmt is None:
            iso_aware, iso_naive = _parse_iso(subset)
            parsed = pc.coalesce(iso_aware, _localize(iso_naive, timezone))
        elif "%z" in fmt:
            parsed = pc.cast(_parse_format(subset, fmt), CHANGED_AT_TYPE)
        else:
            parsed = _localize(_parse_format(subset, fmt), timezone)
        values = pc.replace_with_mask(values, waiting, parsed)
        waiting = pc.replace_with_mask(waiting, waiting, pc.is_null(parsed))
    if pc.any(waiting).as_py():
        # A bare ISO date (`2021-07-15`, what a date-only ERP column sends) is that
        # day's midnight UTC, whatever the field's timezone: the day stays the day.
        subset = text.filter(waiting)
        bare = pc.match_substring_regex(subset, _ISO_BARE_DATE)
        days = _strict_strptime(pc.if_else(bare, subset, pa.scalar(None, pa.string())), _ISO_DATE)
        parsed = pc.cast(pc.cast(days, pa.timestamp("us")), pa.timestamp("us", tz="UTC")).cast(
            CHANGED_AT_TYPE
        )
        values = pc.replace_with_mask(values, waiting, parsed)
    values = _at_precision(values, precision)
    result = _Coerced(values, [])
    accepted = ", ".join(("ISO-8601", "YYYY-MM-DD as midnight UTC", *formats))
    result.reject(
        pc.and_(pc.is_valid(text), pc.is_null(values)),
        f"not a datetime (accepted: {accepted}; naive values are in {timezone})",
    )
    return result


def _parse_iso(text: pa.Array) -> tuple[pa.Array, pa.Array]:
    """ISO-8601 date-times: (UTC values of those with an offset, naive values of those without).

    Fractions and offsets cost several kernels each, so they are computed only
    when some value in the batch has one (a batch is usually of one shape).
    """
    parts = pc.extract_regex(text, _ISO_DATETIME)
    date = pc.struct_field(parts, "date")
    time = pc.struct_field(parts, "time")
    if pc.any(pc.equal(pc.binary_length(time), 5)).as_py():
        time = pc.if_else(
            pc.equal(pc.binary_length(time), 5), pc.binary_join_element_wise(time, ":00", ""), time
        )
    stamp = pc.binary_join_element_wise(date, time, " ")
    # _strict_strptime refuses 30 February instead of rolling it over, without raising.
    local = pc.cast(_strict_strptime(stamp, _ISO_STAMP), pa.timestamp("us"))
    frac = pc.struct_field(parts, "frac")
    if pc.any(pc.greater(pc.binary_length(frac), 0)).as_py():
        nanos = pc.cast(
            pc.utf8_rpad(pc.if_else(pc.equal(frac, ""), "0", frac), width=9, padding="0"), pa.int64()
        )
        local = pc.add(local, pc.cast(pc.divide(nanos, 1000), pa.duration("us")))
    zone = pc.struct_field(parts, "zone")
    has_zone = pc.fill_null(pc.greater(pc.binary_length(zone), 0), False)
    if not pc.any(has_zone).as_py():
        return pa.nulls(len(text)).cast(CHANGED_AT_TYPE), local
    if pc.all(pc.or_(pc.invert(has_zone), pc.equal(pc.utf8_upper(zone), "Z"))).as_py():
        as_utc = local  # every offset is Z
    else:
        as_utc = pc.subtract(local, pc.cast(_offset_micros(zone), pa.duration("us")))
    aware = pc.if_else(has_zone, pc.cast(as_utc, CHANGED_AT_TYPE), pa.scalar(None, CHANGED_AT_TYPE))
    naive = pc.if_else(has_zone, pa.scalar(None, local.type), local)
    return aware, naive


def _offset_micros(zone: pa.Array) -> pa.Array:
    """UTC offsets written as Z, +hh, +hhmm or +hh:mm → signed microseconds (null when not one)."""
    parts = pc.extract_regex(zone, _ISO_OFFSET)
    hours = pc.cast(pc.struct_field(parts, "hours"), pa.int64())
    minutes_text = pc.struct_field(parts, "minutes")
    minutes = pc.cast(pc.if_else(pc.equal(minutes_text, ""), "0", minutes_text), pa.int64())
    sign = pc.if_else(pc.equal(pc.struct_field(parts, "sign"), "-"), -1, 1)
    offset = pc.multiply(sign, pc.multiply(pc.add(pc.multiply(hours, 60), minutes), 60_000_000))
    return pc.if_else(pc.fill_null(pc.equal(pc.utf8_upper(zone), "Z"), False), 0, offset)


def _unpadded(text: pa.Array) -> pa.Array:
    """Text with leading zeros of digit runs dropped and case folded, for round-trip checks."""
    return pc.replace_substring_regex(pc.utf8_lower(text), r"(^|[^0-9])0+([0-9])", r"\1\2")


# strptime directives the fast path understands, as RE2 groups.
_DIRECTIVES = {
    "Y": r"(?P<Y>[0-9]{4})",
    "m": r"(?P<m>[0-9]{1,2})",
    "d": r"(?P<d>[0-9]{1,2})",
    "H": r"(?P<H>[0-9]{1,2})",
    "M": r"(?P<M>[0-9]{2})",
    "S": r"(?P<S>[0-9]{2})",
    "z": r"(?P<z>[Zz]|[+-][0-9]{2}(?::?[0-9]{2})?)",
}


@lru_cache(maxsize=64)
def _format_regex(fmt: str) -> tuple[str, frozenset[str]] | None:
    """A strptime format as an anchored RE2 pattern with one group per directive, if simple enough."""
    pattern = ["^"]
    seen: set[str] = set()
    i = 0
    while i < len(fmt):
        char = fmt[i]
        if char != "%":
            pattern.append(char if char.isalnum() or char == " " else "\\" + char)
            i += 1
            continue
        directive = fmt[i + 1 : i + 2]
        i += 2
        if directive == "%":
            pattern.append("%")
        elif directive in _DIRECTIVES and directive not in seen:
            seen.add(directive)
            pattern.append(_DIRECTIVES[directive])
        else:
            return None
    if not {"Y", "m", "d"} <= seen or ("S" in seen and "M" not in seen) or ("M" in seen and "H" not in seen):
        return None
    pattern.append("$")
    return "".join(pattern), frozenset(seen)


def _parse_format(text: pa.Array, fmt: str) -> pa.Array:
    """Parse `text` with a strptime format: timestamp[s], UTC when the format has %z.

    Simple numeric formats (%Y %m %d %H %M %S %z and literals) are rewritten to
    zero-padded ISO text with one regular expression and checked by the fast
    ISO path; anything else goes through strptime and a strftime round trip.
    """
    compiled = _format_regex(fmt)
    if compiled is None:
        return _strict_strptime(text, fmt)
    pattern, directives = compiled
    if "z" in directives:
        return _parse_format_general(text, pattern, directives)
    parsed, exact = _parse_zero_padded(text, fmt)
    rest = pc.invert(exact)
    if not pc.any(rest).as_py():
        return parsed
    return pc.replace_with_mask(parsed, rest, _parse_format_general(text.filter(rest), pattern, directives))


# Where each strptime directive sits in Arrow's "YYYY-MM-DD HH:MM:SS" text of a timestamp.
_ISO_SLICES = {"Y": (0, 4), "m": (5, 7), "d": (8, 10), "H": (11, 13), "M": (14, 16), "S": (17, 19)}


def _parse_zero_padded(text: pa.Array, fmt: str) -> tuple[pa.Array, pa.Array]:
    """(parsed, exact): strptime, kept where the text is exactly the zero-padded rendering of the value.

    The rendering is rebuilt from Arrow's cast of the value to text (the
    directives' slices with the format's literals between them), which is much
    cheaper than strftime; equal text means the value is a real calendar time
    (strptime rolls 30 February over, the rendering then differs) and the
    general path would read it the same way. Unpadded values are left to it.
    """
    parsed = pc.strptime(text, format=fmt, unit="s", error_is_null=True)
    back = pc.cast(parsed, pa.string())
    pieces: list[Any] = []
    i = 0
    while i < len(fmt):
        if fmt[i] == "%":
            directive = fmt[i + 1]
            pieces.append("%" if directive == "%" else pc.utf8_slice_codeunits(back, *_ISO_SLICES[directive]))
            i += 2
        else:
            pieces.append(fmt[i])
            i += 1
    rendered = pc.binary_join_element_wise(*pieces, "")
    exact = pc.fill_null(pc.equal(rendered, text), False)
    return pc.if_else(exact, parsed, pa.scalar(None, parsed.type)), exact


def _parse_format_general(text: pa.Array, pattern: str, directives: frozenset[str]) -> pa.Array:
    """A simple format through its regular expression, rewritten to zero-padded ISO and checked."""
    parts = pc.extract_regex(text, pattern)

    def group(name: str, default: str = "00") -> pa.Array:
        if name not in directives:
            return pc.if_else(pc.is_valid(parts), default, pa.scalar(None, pa.string()))
        return pc.utf8_lpad(pc.struct_field(parts, name), width=2, padding="0")

    date = pc.binary_join_element_wise(pc.struct_field(parts, "Y"), group("m"), group("d"), "-")
    stamp = pc.binary_join_element_wise(date, group("H"), group("M"), group("S"), ":")
    stamp = pc.utf8_replace_slice(stamp, start=10, stop=11, replacement=" ")
    parsed = _strict_strptime(stamp, _ISO_STAMP)
    if "z" not in directives:
        return parsed
    offset_s = pc.divide(_offset_micros(pc.struct_field(parts, "z")), 1_000_000)
    utc = pc.subtract(parsed, pc.cast(offset_s, pa.duration("s")))
    return pc.cast(utc, pa.timestamp("s", tz="UTC"))


def _strict_strptime(text: pa.Array, fmt: str) -> pa.Array:
    """pc.strptime at second resolution, null where the value is not a real calendar time.

    Arrow's strptime rolls 30 February over to 1 March; formatting the parsed
    value back with the same format and comparing (ignoring zero padding and
    case) refuses such values. With `%z` at the end, the comparison is made in
    the value's own offset.
    """
    parsed = pc.strptime(text, format=fmt, unit="s", error_is_null=True)
    if fmt.endswith("%z"):
        parts = pc.extract_regex(text, r"^(?P<body>.*?)(?P<zone>[Zz]|[+-][0-9]{2}(?::?[0-9]{2})?)$")
        wall = pc.add(
            pc.cast(parsed, pa.timestamp("s")),
            pc.cast(pc.divide(_offset_micros(pc.struct_field(parts, "zone")), 1_000_000), pa.duration("s")),
        )
        same = pc.equal(
            _unpadded(pc.strftime(wall, format=fmt[:-2])), _unpadded(pc.struct_field(parts, "body"))
        )
    elif "%z" in fmt:
        return parsed  # an offset in the middle of a format: Arrow's own check only
    elif fmt in _ZERO_PADDED_ISO:
        # ISO forms are zero-padded, so Arrow's plain cast back to text (much
        # faster than strftime) must give the input exactly.
        back = pc.cast(pc.cast(parsed, pa.date32()) if fmt == _ISO_DATE else parsed, pa.string())
        same = pc.equal(back, text)
    else:
        same = pc.equal(_unpadded(pc.strftime(parsed, format=fmt)), _unpadded(text))
    return pc.if_else(pc.fill_null(same, False), parsed, pa.scalar(None, parsed.type))


def _localize(naive: pa.Array, timezone: str) -> pa.Array:
    """Naive wall-clock times in `timezone` → UTC.

    In the autumn overlap the earlier instant wins; a time in the spring gap
    (02:30 on the night clocks jump to 03:00) means the moment the gap ends,
    which is what a clerk typing 02:30 meant. Arrow's "earliest" would give
    01:59:59.999999 instead.
    """
    if ZoneInfo(timezone).key in ("UTC", "Etc/UTC"):
        return pc.cast(naive, pa.timestamp(naive.type.unit, tz="UTC")).cast(CHANGED_AT_TYPE)
    localized = pc.assume_timezone(naive, timezone=timezone, ambiguous="earliest", nonexistent="latest")
    return pc.cast(localized, pa.timestamp(naive.type.unit, tz="UTC")).cast(CHANGED_AT_TYPE)


def _at_precision(values: pa.Array, precision: Precision) -> pa.Array:
    """Truncate to the field's precision (a fixed precision keeps DATA_HASH stable)."""
    unit = _FLOOR_UNIT.get(precision)
    return values if unit is None else pc.floor_temporal(values, unit=unit)


def _rejected_frame(
    entity: EntitySpec, raw: pa.Table, coerced: list[tuple[str, str | None, _Coerced]]
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
