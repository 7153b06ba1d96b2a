"""Datetime and date columns to typed values: zero-padded text by fixed position, the rest by the general path.

`coerce_datetime` and `coerce_date_column` are what normalize calls. The
fixed-position reader (fixed.py) takes the rows it can read with certainty;
the general path (general.py) reads and rejects the rest, and the two results
are merged row by row, so the outcome is the general path's whatever the mix.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as _compute

from syncflow_dagster.catalog.models import FieldSpec, Precision
from syncflow_dagster.engine.coerced import Coerced, empty_to_null
from syncflow_dagster.engine.columns import CHANGED_AT_TYPE
from syncflow_dagster.engine.datetimes.fixed import (
    Candidate,
    FixedRead,
    format_candidate,
    iso_datetime_candidate,
    read_fixed,
)
from syncflow_dagster.engine.datetimes.formats import format_regex
from syncflow_dagster.engine.datetimes.general import coerce_date, coerce_datetime_text, date_formats
from syncflow_dagster.engine.datetimes.zones import at_precision, localize

# The pyarrow stubs type each compute function per concrete array class; the
# arrays here get their types at run time, so compute calls are left untyped.
pc: Any = _compute


def coerce_date_column(spec: FieldSpec, text: pa.Array) -> Coerced:
    """Dates: zero-padded values by fixed position, the rest trimmed and through `coerce_date`."""
    read = read_fixed(text, date_candidates(date_formats(spec)))
    if read is None or not read.done.any():
        return coerce_date(spec, empty_to_null(pc.utf8_trim_whitespace(text)))
    days = (read.local_us // 86_400_000_000).astype(np.int32)  # date-only layouts: whole days
    fast = pa.array(days, pa.date32(), mask=~read.done | read.empty)
    rest = ~read.done
    if not rest.any():
        return Coerced(fast, [])
    general = coerce_date(spec, empty_to_null(pc.utf8_trim_whitespace(text.filter(pa.array(rest)))))
    return _merge_general(fast, rest, general)


def coerce_datetime(
    column: pa.Array, *, formats: tuple[str, ...], timezone: str, precision: Precision
) -> Coerced:
    if pa.types.is_timestamp(column.type):
        typed = column if column.type.tz else localize(column, timezone)
        values = pc.cast(typed, pa.timestamp(column.type.unit, tz="UTC")).cast(CHANGED_AT_TYPE)
        return Coerced(at_precision(values, precision), [])
    read = read_fixed(column, datetime_candidates(formats))
    if read is None or not read.done.any():
        return coerce_datetime_text(column, formats=formats, timezone=timezone, precision=precision)
    fast = _fixed_datetimes(read, timezone, precision)
    rest = ~read.done
    if not rest.any():
        return Coerced(fast, [])
    general = coerce_datetime_text(
        column.filter(pa.array(rest)), formats=formats, timezone=timezone, precision=precision
    )
    return _merge_general(fast, rest, general)


def _merge_general(fast: pa.Array, rest: np.ndarray, general: Coerced) -> Coerced:
    """The fixed-position values with the general path's values and rejections put in at `rest`."""
    where = pa.array(rest)
    result = Coerced(pc.replace_with_mask(fast, where, general.values), [])
    nowhere = pa.repeat(pa.scalar(False, pa.bool_()), len(rest))
    for mask, reason in general.problems:
        result.reject(pc.replace_with_mask(nowhere, where, mask), reason)
    return result


def _format_candidate(fmt: str, *, readable: bool) -> Candidate:
    """A declared format as a candidate of the fixed-position reader (opaque unless regex-compiled)."""
    if format_regex(fmt) is None:
        return Candidate(opaque=True)
    return format_candidate(fmt, readable=readable)


@lru_cache(maxsize=64)
def datetime_candidates(formats: tuple[str, ...]) -> tuple[Candidate, ...]:
    """The general datetime path's candidates in its order: ISO-8601, then each declared format."""
    return (iso_datetime_candidate(), *(_format_candidate(fmt, readable=True) for fmt in formats))


@lru_cache(maxsize=64)
def date_candidates(formats: tuple[str, ...]) -> tuple[Candidate, ...]:
    """`coerce_date`'s formats in its order; only formats without a time of day are read."""
    candidates = []
    for fmt in formats:
        compiled = format_regex(fmt)
        date_only = compiled is not None and compiled[1] <= {"Y", "m", "d"}
        candidates.append(_format_candidate(fmt, readable=date_only))
    return tuple(candidates)


def _fixed_datetimes(read: FixedRead, timezone: str, precision: Precision) -> pa.Array:
    """UTC values of the rows `read_fixed` took; naive ones through `localize` like the general path."""
    utc = read.local_us - read.offset_us
    naive = read.naive & read.done
    if naive.any():
        localized = localize(pa.array(read.local_us[naive], pa.timestamp("us")), timezone)
        utc[naive] = localized.view(pa.int64()).to_numpy()
    values = pa.array(utc, CHANGED_AT_TYPE, mask=~read.done | read.empty)
    # Without a fraction every value is a whole second, which no precision changes.
    return at_precision(values, precision) if read.fraction else values
