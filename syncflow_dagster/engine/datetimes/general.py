"""The general datetime and date paths: ISO-8601 in all its forms, then each declared format, in order.

Every value is tried by one candidate after another (ISO first, then the
field's formats), each only on the values no earlier one could read; what no
candidate reads is rejected with a reason that lists what is accepted. The
fixed-position reader (fixed.py) takes the common zero-padded shapes first
and must agree with this path exactly.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as _compute

from syncflow_dagster.catalog.models import FieldSpec, Precision
from syncflow_dagster.engine.coerced import Coerced, empty_to_null
from syncflow_dagster.engine.columns import CHANGED_AT_TYPE
from syncflow_dagster.engine.datetimes.formats import (
    ISO_DATE,
    ISO_STAMP,
    offset_micros,
    parse_format,
    strict_strptime,
)
from syncflow_dagster.engine.datetimes.zones import at_precision, localize

# The pyarrow stubs type each compute function per concrete array class; the
# arrays here get their types at run time, so compute calls are left untyped.
pc: Any = _compute

ISO_DATETIME = (
    r"^(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ](?P<time>[0-9]{2}:[0-9]{2}(?::[0-9]{2})?)"
    r"(?:[.,](?P<frac>[0-9]{1,9}))?(?P<zone>[Zz]|[+-][0-9]{2}(?::?[0-9]{2})?)?$"
)
_ISO_BARE_DATE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"


def date_formats(spec: FieldSpec) -> tuple[str, ...]:
    """A date field's formats in the order they are tried."""
    return tuple(dict.fromkeys((*spec.formats, ISO_DATE)))  # ISO always accepted, last


def coerce_date(spec: FieldSpec, text: pa.Array) -> Coerced:
    """The general date path (trimmed text, empty as null): each format in order, calendar-checked."""
    formats = date_formats(spec)
    values = pa.nulls(len(text)).cast(pa.date32())
    waiting = pc.is_valid(text)
    for fmt in formats:  # each tried only on what earlier formats could not read
        if not pc.any(waiting).as_py():
            break
        parsed = pc.cast(parse_format(text.filter(waiting), fmt), pa.date32())
        values = pc.replace_with_mask(values, waiting, parsed)
        waiting = pc.replace_with_mask(waiting, waiting, pc.is_null(parsed))
    result = Coerced(values, [])
    result.reject(
        pc.and_(pc.is_valid(text), pc.is_null(values)),
        f"not a date (accepted formats: {', '.join(formats)})",
    )
    return result


def coerce_datetime_text(
    column: pa.Array, *, formats: tuple[str, ...], timezone: str, precision: Precision
) -> Coerced:
    """The general text path: ISO-8601 in all its forms, then each declared format."""
    text = empty_to_null(pc.utf8_trim_whitespace(column))
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
            iso_aware, iso_naive = parse_iso(subset)
            parsed = pc.coalesce(iso_aware, localize(iso_naive, timezone))
        elif "%z" in fmt:
            parsed = pc.cast(parse_format(subset, fmt), CHANGED_AT_TYPE)
        else:
            parsed = localize(parse_format(subset, fmt), timezone)
        values = pc.replace_with_mask(values, waiting, parsed)
        waiting = pc.replace_with_mask(waiting, waiting, pc.is_null(parsed))
    if pc.any(waiting).as_py():
        # A bare ISO date (`2021-07-15`, what a date-only ERP column sends) is that
        # day's midnight UTC, whatever the field's timezone: the day stays the day.
        subset = text.filter(waiting)
        bare = pc.match_substring_regex(subset, _ISO_BARE_DATE)
        days = strict_strptime(pc.if_else(bare, subset, pa.scalar(None, pa.string())), ISO_DATE)
        parsed = pc.cast(pc.cast(days, pa.timestamp("us")), pa.timestamp("us", tz="UTC")).cast(
            CHANGED_AT_TYPE
        )
        values = pc.replace_with_mask(values, waiting, parsed)
    values = at_precision(values, precision)
    result = Coerced(values, [])
    accepted = ", ".join(("ISO-8601", "YYYY-MM-DD as midnight UTC", *formats))
    result.reject(
        pc.and_(pc.is_valid(text), pc.is_null(values)),
        f"not a datetime (accepted: {accepted}; naive values are in {timezone})",
    )
    return result


def parse_iso(text: pa.Array) -> tuple[pa.Array, pa.Array]:
    """ISO-8601 date-times: (UTC values of those with an offset, naive values of those without).

    Fractions and offsets cost several kernels each, so they are computed only
    when some value in the batch has one (a batch is usually of one shape).
    """
    parts = pc.extract_regex(text, ISO_DATETIME)
    date = pc.struct_field(parts, "date")
    time = pc.struct_field(parts, "time")
    if pc.any(pc.equal(pc.binary_length(time), 5)).as_py():
        time = pc.if_else(
            pc.equal(pc.binary_length(time), 5), pc.binary_join_element_wise(time, ":00", ""), time
        )
    stamp = pc.binary_join_element_wise(date, time, " ")
    # strict_strptime refuses 30 February instead of rolling it over, without raising.
    local = pc.cast(strict_strptime(stamp, ISO_STAMP), pa.timestamp("us"))
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
        as_utc = pc.subtract(local, pc.cast(offset_micros(zone), pa.duration("us")))
    aware = pc.if_else(has_zone, pc.cast(as_utc, CHANGED_AT_TYPE), pa.scalar(None, CHANGED_AT_TYPE))
    naive = pc.if_else(has_zone, pa.scalar(None, local.type), local)
    return aware, naive
