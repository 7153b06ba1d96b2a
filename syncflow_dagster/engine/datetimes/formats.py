"""strptime formats read column-wise: a regular expression per simple format, calendar-checked parsing.

Arrow's strptime rolls 30 February over to 1 March; every parse here is
checked by a round trip so such a value comes back null (never raising),
and simple numeric formats take a zero-padded fast path.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import pyarrow as pa
import pyarrow.compute as _compute

# The pyarrow stubs type each compute function per concrete array class; the
# arrays here get their types at run time, so compute calls are left untyped.
pc: Any = _compute

_ISO_OFFSET = r"^(?P<sign>[+-])(?P<hours>[0-9]{2}):?(?P<minutes>[0-9]{2})?$"
ISO_DATE = "%Y-%m-%d"
ISO_STAMP = "%Y-%m-%d %H:%M:%S"
_ZERO_PADDED_ISO = (ISO_DATE, ISO_STAMP)


def offset_micros(zone: pa.Array) -> pa.Array:
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
DIRECTIVES = {
    "Y": r"(?P<Y>[0-9]{4})",
    "m": r"(?P<m>[0-9]{1,2})",
    "d": r"(?P<d>[0-9]{1,2})",
    "H": r"(?P<H>[0-9]{1,2})",
    "M": r"(?P<M>[0-9]{2})",
    "S": r"(?P<S>[0-9]{2})",
    "z": r"(?P<z>[Zz]|[+-][0-9]{2}(?::?[0-9]{2})?)",
}


@lru_cache(maxsize=64)
def format_regex(fmt: str) -> tuple[str, frozenset[str]] | None:
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
        elif directive in DIRECTIVES and directive not in seen:
            seen.add(directive)
            pattern.append(DIRECTIVES[directive])
        else:
            return None
    if not {"Y", "m", "d"} <= seen or ("S" in seen and "M" not in seen) or ("M" in seen and "H" not in seen):
        return None
    pattern.append("$")
    return "".join(pattern), frozenset(seen)


def parse_format(text: pa.Array, fmt: str) -> pa.Array:
    """Parse `text` with a strptime format: timestamp[s], UTC when the format has %z.

    Simple numeric formats (%Y %m %d %H %M %S %z and literals) are rewritten to
    zero-padded ISO text with one regular expression and checked by the fast
    ISO path; anything else goes through strptime and a strftime round trip.
    """
    compiled = format_regex(fmt)
    if compiled is None:
        return strict_strptime(text, fmt)
    pattern, directives = compiled
    if "z" in directives:
        return parse_format_general(text, pattern, directives)
    parsed, exact = _parse_zero_padded(text, fmt)
    rest = pc.invert(exact)
    if not pc.any(rest).as_py():
        return parsed
    return pc.replace_with_mask(parsed, rest, parse_format_general(text.filter(rest), pattern, directives))


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


def parse_format_general(text: pa.Array, pattern: str, directives: frozenset[str]) -> pa.Array:
    """A simple format through its regular expression, rewritten to zero-padded ISO and checked."""
    parts = pc.extract_regex(text, pattern)

    def group(name: str, default: str = "00") -> pa.Array:
        if name not in directives:
            return pc.if_else(pc.is_valid(parts), default, pa.scalar(None, pa.string()))
        return pc.utf8_lpad(pc.struct_field(parts, name), width=2, padding="0")

    date = pc.binary_join_element_wise(pc.struct_field(parts, "Y"), group("m"), group("d"), "-")
    stamp = pc.binary_join_element_wise(date, group("H"), group("M"), group("S"), ":")
    stamp = pc.utf8_replace_slice(stamp, start=10, stop=11, replacement=" ")
    parsed = strict_strptime(stamp, ISO_STAMP)
    if "z" not in directives:
        return parsed
    offset_s = pc.divide(offset_micros(pc.struct_field(parts, "z")), 1_000_000)
    utc = pc.subtract(parsed, pc.cast(offset_s, pa.duration("s")))
    return pc.cast(utc, pa.timestamp("s", tz="UTC"))


def strict_strptime(text: pa.Array, fmt: str) -> pa.Array:
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
            pc.cast(pc.divide(offset_micros(pc.struct_field(parts, "zone")), 1_000_000), pa.duration("s")),
        )
        same = pc.equal(
            _unpadded(pc.strftime(wall, format=fmt[:-2])), _unpadded(pc.struct_field(parts, "body"))
        )
    elif "%z" in fmt:
        return parsed  # an offset in the middle of a format: Arrow's own check only
    elif fmt in _ZERO_PADDED_ISO:
        # ISO forms are zero-padded, so Arrow's plain cast back to text (much
        # faster than strftime) must give the input exactly.
        back = pc.cast(pc.cast(parsed, pa.date32()) if fmt == ISO_DATE else parsed, pa.string())
        same = pc.equal(back, text)
    else:
        same = pc.equal(_unpadded(pc.strftime(parsed, format=fmt)), _unpadded(text))
    return pc.if_else(pc.fill_null(same, False), parsed, pa.scalar(None, parsed.type))
