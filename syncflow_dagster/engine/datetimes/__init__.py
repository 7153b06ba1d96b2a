"""Datetimes and dates: text (or timestamp) columns to UTC timestamps and calendar dates, columnar.

The modules, one idea each:

- `coerce.py`: the two entry points normalize calls; zero-padded values by
  fixed position, the rest by the general path, merged row by row.
- `fixed.py`: the fixed-position reader of zero-padded text (numpy over
  Arrow's buffers); it only takes rows the general path reads the same way.
- `general.py`: the general path: ISO-8601, then each declared format, and
  the rejection reasons.
- `formats.py`: strptime formats as regular expressions, calendar-checked
  parsing (no 30 February), UTC offsets.
- `zones.py`: wall-clock times to UTC and values to a field's precision.
"""

from syncflow_dagster.engine.datetimes.coerce import coerce_date_column, coerce_datetime

__all__ = ["coerce_date_column", "coerce_datetime"]
