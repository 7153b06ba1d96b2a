"""Wall-clock times to UTC (DST gaps and overlaps decided once) and UTC values to a field's precision."""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.compute as _compute

from syncflow_dagster.catalog.models import Precision
from syncflow_dagster.engine.columns import CHANGED_AT_TYPE

# The pyarrow stubs type each compute function per concrete array class; the
# arrays here get their types at run time, so compute calls are left untyped.
pc: Any = _compute

_FLOOR_UNIT = {Precision.SECOND: "second", Precision.MILLISECOND: "millisecond"}


def localize(naive: pa.Array, timezone: str) -> pa.Array:
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


def at_precision(values: pa.Array, precision: Precision) -> pa.Array:
    """Truncate to the field's precision (a fixed precision keeps DATA_HASH stable)."""
    unit = _FLOOR_UNIT.get(precision)
    return values if unit is None else pc.floor_temporal(values, unit=unit)
