"""Fixed-position reading of zero-padded date and time text, straight from Arrow's string buffers.

The general datetime path (general.py) tries ISO-8601 and then each declared
format with regular expressions and strptime, a dozen kernels per value. ERP
data nearly always comes in a few zero-padded shapes ("2026-08-16T05:59:17+0200",
"16.01.2027 11:59", "2025-12-15"), whose every byte sits at a fixed position.
This module reads those in numpy: the rows of one byte length are gathered
into a (length, rows) matrix from the Arrow offsets, literal bytes and digits
are checked by position, the fields are computed arithmetically and checked
against the calendar, and epoch seconds come from a days-from-civil formula.

It only says which rows it could read and what they mean; it never rejects.
A row it does not take (another length, whitespace, unpadded fields, an
impossible date, any doubt) is left to the general path, so odd input keeps
exactly the behaviour it had. A row is taken only when it is certain that the
general path reads it the same way: it fits a layout of a candidate (ISO or a
declared format) and every earlier candidate certainly refuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

_DIGIT = None  # a position that must hold an ASCII digit
_WIDTHS = {"Y": 4, "m": 2, "d": 2, "H": 2, "M": 2, "S": 2}
# Widths the general path's regular expression allows per strptime directive (see formats.DIRECTIVES).
_REGEX_WIDTHS = {"Y": (4, 4), "m": (1, 2), "d": (1, 2), "H": (1, 2), "M": (2, 2), "S": (2, 2), "z": (1, 6)}
_WHITESPACE = frozenset(b" \t\n\v\f\r")
_MICROS = 1_000_000
# Rows read at a time: a block's few dozen temporaries then fit in the CPU's cache.
_BLOCK_ROWS = 32_768


@dataclass(frozen=True)
class Layout:
    """One zero-padded shape: its byte length, the bytes each position allows, where each field sits.

    Fields: Y m d H M S (digits), f (fraction digits), zs/zh/zm (offset sign, hours,
    minutes). `zone` is "naive" (no offset), "utc" (Z) or "offset".
    """

    length: int
    literals: tuple[tuple[int, bytes], ...]
    digits: tuple[int, ...]
    fields: tuple[tuple[str, int, int], ...]
    zone: str = "naive"


@dataclass(frozen=True)
class Candidate:
    """One way the general path may read a value (ISO or a declared format), in its order.

    `layouts` are the shapes read here with exactly the general path's result.
    `prefix`/`suffix` hold byte checks every text this candidate accepts passes
    (positions from the start / from the end), with its length bounds: a row
    failing any of them is certainly refused by it. `opaque` means nothing is
    known (a format with directives outside the simple set): no later
    candidate's layout may then be used.
    """

    layouts: tuple[Layout, ...] = ()
    min_length: int = 0
    max_length: int = 0
    prefix: tuple[tuple[int, bytes | None], ...] = ()
    suffix: tuple[tuple[int, bytes | None], ...] = ()
    opaque: bool = False


@dataclass
class FixedRead:
    """Per row: taken here (`done`), local wall time in µs, UTC offset in µs, whether naive.

    `done` rows that are null or empty text have `empty` set and no value.
    """

    done: np.ndarray
    empty: np.ndarray
    local_us: np.ndarray
    offset_us: np.ndarray
    naive: np.ndarray
    fraction: bool = False


def _tokens(fmt: str) -> list[tuple[str, str]] | None:
    """A strptime format as ("lit", char) / ("dir", letter) tokens; None when not simple ASCII."""
    tokens: list[tuple[str, str]] = []
    i = 0
    while i < len(fmt):
        char = fmt[i]
        if not char.isascii():
            return None
        if char != "%":
            tokens.append(("lit", char))
            i += 1
            continue
        directive = fmt[i + 1 : i + 2]
        i += 2
        if directive == "%":
            tokens.append(("lit", "%"))
        elif directive in _REGEX_WIDTHS:
            tokens.append(("dir", directive))
        else:
            return None
    return tokens


def _token_checks(tokens: list[tuple[str, str]]) -> list[bytes | None] | None:
    """Byte checks of a run of fixed-width tokens, or None at the first variable-width one."""
    checks: list[bytes | None] = []
    for kind, value in tokens:
        if kind == "lit":
            checks.append(value.encode())
        else:
            low, high = _REGEX_WIDTHS[value]
            if low != high:
                return None
            checks.extend([_DIGIT] * low)
    return checks


def _fixed_run(tokens: list[tuple[str, str]]) -> list[bytes | None]:
    """Checks of the longest run of fixed-width tokens at the start of `tokens`."""
    checks: list[bytes | None] = []
    for token in tokens:
        more = _token_checks([token])
        if more is None:
            break
        checks.extend(more)
    return checks


def format_candidate(fmt: str, *, readable: bool) -> Candidate:
    """The candidate of a declared strptime format that the general path compiles to a regex.

    `readable`: its values may be taken here (False for formats whose general
    reading this module does not reproduce, e.g. with %z); the bounds still let
    later candidates' layouts be used on rows this format certainly refuses.
    """
    tokens = _tokens(fmt)
    if tokens is None:
        return Candidate(opaque=True)
    widths = [(1, 1) if kind == "lit" else _REGEX_WIDTHS[value] for kind, value in tokens]
    prefix = _fixed_run(tokens)
    suffix = _fixed_run(tokens[::-1])[::-1]
    layouts: tuple[Layout, ...] = ()
    if readable and "z" not in {value for kind, value in tokens if kind == "dir"}:
        layout = _layout(tokens)
        layouts = (layout,) if layout is not None else ()
    return Candidate(
        layouts=layouts,
        min_length=sum(low for low, _ in widths),
        max_length=sum(high for _, high in widths),
        prefix=tuple(enumerate(prefix)),
        suffix=tuple((i - len(suffix), check) for i, check in enumerate(suffix)),
    )


def _layout(tokens: list[tuple[str, str]], zone: str = "naive") -> Layout | None:
    """The zero-padded layout of tokens whose directives are Y m d H M S (plus f, zs, zh, zm here)."""
    literals: list[tuple[int, bytes]] = []
    digits: list[int] = []
    fields: list[tuple[str, int, int]] = []
    position = 0
    for kind, value in tokens:
        if kind == "lit" or kind == "set":
            literals.append((position, value.encode()))
            position += 1
        elif kind == "sign":
            literals.append((position, b"+-"))
            fields.append(("zs", position, 1))
            position += 1
        else:
            width = int(kind[1:]) if kind.startswith("w") else _WIDTHS[value]
            digits.extend(range(position, position + width))
            fields.append((value, position, width))
            position += width
    ends = b"".join(allowed for at, allowed in literals if at in (0, position - 1))
    if any(byte in _WHITESPACE for byte in ends):
        return None  # the general path trims first: such a layout would not be the whole value
    return Layout(position, tuple(literals), tuple(digits), tuple(fields), zone)


def _iso_layouts() -> tuple[Layout, ...]:
    """ISO-8601 as the general path's regex reads it: date [Tt ] HH:MM[:SS][.,fraction][zone]."""
    head: list[tuple[str, str]] = [
        ("w4", "Y"),
        ("lit", "-"),
        ("w2", "m"),
        ("lit", "-"),
        ("w2", "d"),
        ("set", "Tt "),
        ("w2", "H"),
        ("lit", ":"),
        ("w2", "M"),
    ]
    seconds: list[tuple[str, str]] = [("lit", ":"), ("w2", "S")]
    zones: list[tuple[list[tuple[str, str]], str]] = [
        ([], "naive"),
        ([("set", "Zz")], "utc"),
        ([("sign", ""), ("w2", "zh")], "offset"),
        ([("sign", ""), ("w2", "zh"), ("w2", "zm")], "offset"),
        ([("sign", ""), ("w2", "zh"), ("lit", ":"), ("w2", "zm")], "offset"),
    ]
    bodies: list[list[tuple[str, str]]] = [head, head + seconds]
    bodies += [[*head, *seconds, ("set", ".,"), (f"w{n}", "f")] for n in range(1, 10)]
    layouts = []
    for body in bodies:
        for tail, zone in zones:
            layout = _layout(body + tail, zone)
            assert layout is not None
            layouts.append(layout)
    return tuple(layouts)


def iso_datetime_candidate() -> Candidate:
    """ISO-8601 date-times: the general path's first candidate (see general.ISO_DATETIME)."""
    # Every value its regex accepts starts YYYY-MM-DD[Tt ]HH:MM and is 16 to 35 bytes long.
    digit: bytes | None = _DIGIT
    prefix: list[bytes | None] = [digit, digit, digit, digit, b"-", digit, digit, b"-", digit, digit]
    prefix += [b"Tt ", digit, digit, b":", digit, digit]
    return Candidate(layouts=_iso_layouts(), min_length=16, max_length=35, prefix=tuple(enumerate(prefix)))


def _string_parts(text: pa.Array) -> tuple[np.ndarray, np.ndarray] | None:
    """(offsets, data bytes) of a string array (what normalize's text layer gives), else None."""
    if not pa.types.is_string(text.type):
        return None
    _, offsets_buffer, data_buffer = text.buffers()
    if offsets_buffer is None:
        return None
    offsets = np.frombuffer(
        memoryview(offsets_buffer), dtype=np.int32, count=len(text) + 1, offset=text.offset * 4
    ).astype(np.int64)
    data = (
        np.frombuffer(memoryview(data_buffer), dtype=np.uint8)
        if data_buffer is not None
        else np.zeros(0, np.uint8)
    )
    return offsets, data


def _check(matrix: np.ndarray, digits: np.ndarray, position: int, allowed: bytes | None) -> np.ndarray:
    """Rows whose byte at `position` is an ASCII digit (allowed None) or one of `allowed`."""
    if allowed is None:
        result: np.ndarray = digits[position] < 10
        return result
    row = matrix[position]
    result = row == allowed[0]
    for byte in allowed[1:]:
        result |= row == byte
    return result


def _number(digits: np.ndarray, start: int, width: int) -> np.ndarray:
    """The decimal number in positions start..start+width of rows known to hold digits there."""
    value = digits[start].astype(np.int32)
    for position in range(start + 1, start + width):
        value = value * 10 + digits[position]
    return value


def _digit_runs(positions: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Consecutive digit positions as (start, stop) slices, checked a run at a time."""
    runs: list[list[int]] = []
    for position in positions:
        if runs and runs[-1][1] == position:
            runs[-1][1] = position + 1
        else:
            runs.append([position, position + 1])
    return tuple((start, stop) for start, stop in runs)


def days_from_civil(year: np.ndarray, month: np.ndarray, day: np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 of proleptic Gregorian dates (H. Hinnant's algorithm), int64 arrays."""
    year = year - (month <= 2)
    era = np.floor_divide(year, 400)
    year_of_era = year - era * 400
    day_of_year = (153 * np.where(month > 2, month - 3, month + 9) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    result: np.ndarray = era * 146097 + day_of_era - 719468
    return result


# The calendar of the years four digits can write (proleptic Gregorian, with year 0 as Arrow has it):
# per year its leap flag and the days from 1970-01-01 to its 1 January; per (leap, month) the
# month's length and the days before it (month 0 stands for every impossible month).
_YEARS = np.arange(10_000, dtype=np.int32)
_YEAR_LEAP = ((_YEARS % 4 == 0) & ((_YEARS % 100 != 0) | (_YEARS % 400 == 0))).astype(np.int32)
_YEAR_START = days_from_civil(_YEARS, np.ones_like(_YEARS), np.ones_like(_YEARS)).astype(np.int32)
_COMMON = [0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
_LEAP = [0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
_MONTH_LENGTH = np.array(_COMMON + _LEAP, dtype=np.int32)
_MONTH_START = np.array(
    [sum(_COMMON[1:month]) for month in range(13)] + [sum(_LEAP[1:month]) for month in range(13)],
    dtype=np.int32,
)


def _read_layout(
    layout: Layout, matrix: np.ndarray, digits: np.ndarray, open_rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices of the matching open rows of a block, local µs, offset µs) of one layout.

    A row matches when every literal and digit is in place and the fields make
    a real calendar time (month 1-12, the month's days with leap years, hour
    0-23, minute and second 0-59); offsets are any two digits, as in the
    general path.
    """
    ok = open_rows.copy()
    for position, allowed in layout.literals:
        ok &= _check(matrix, digits, position, allowed)
    for start, stop in _digit_runs(layout.digits):
        ok &= (digits[start:stop] < 10).all(axis=0)
    hit = np.flatnonzero(ok)
    if len(hit) == 0:
        empty = np.zeros(0, np.int64)
        return hit, empty, empty
    sub = digits if len(hit) == len(ok) else digits[:, hit]
    values = {name: _number(sub, start, width) for name, start, width in layout.fields if name != "zs"}
    zero = np.zeros(len(hit), np.int32)
    year, month, day = values["Y"], values["m"], values["d"]
    hour, minute, second = values.get("H", zero), values.get("M", zero), values.get("S", zero)
    # Month 0 and 13-99 index a month of no days, which no day fits.
    month_of_year = _YEAR_LEAP[year] * 13 + np.where(month <= 12, month, 0)
    good = (day >= 1) & (day <= _MONTH_LENGTH[month_of_year]) & (hour <= 23) & (minute <= 59) & (second <= 59)
    days = _YEAR_START[year] + _MONTH_START[month_of_year] + (day - 1)
    local = (days.astype(np.int64) * 86400 + (hour * 3600 + minute * 60 + second)) * _MICROS
    if "f" in values:
        width = next(width for name, _, width in layout.fields if name == "f")
        # The general path pads the fraction to nanoseconds and divides by 1000 (truncating).
        local += values["f"].astype(np.int64) * 10 ** (9 - width) // 1000
    offset = np.zeros(len(hit), np.int64)
    if layout.zone == "offset":
        sign = np.where(
            matrix[next(start for name, start, _ in layout.fields if name == "zs"), hit] == ord("-"), -1, 1
        )
        offset = sign * (values["zh"] * 60 + values.get("zm", zero)).astype(np.int64) * 60 * _MICROS
    if good.all():
        return hit, local, offset
    return hit[good], local[good], offset[good]


def read_fixed(text: pa.Array, candidates: Sequence[Candidate]) -> FixedRead | None:
    """Read every row of `text` that fits a candidate's layout and that no earlier candidate can take.

    Null and empty values are `done` too (the general path makes them null
    without a rejection). None when the array is not a string array.
    """
    parts = _string_parts(text)
    if parts is None:
        return None
    offsets, data = parts
    n = len(text)
    lengths = offsets[1:] - offsets[:-1]
    valid = np.ones(n, bool) if text.null_count == 0 else text.is_valid().to_numpy(zero_copy_only=False)
    empty = ~valid | (lengths == 0)
    read = FixedRead(
        done=empty.copy(),
        empty=empty,
        local_us=np.zeros(n, np.int64),
        offset_us=np.zeros(n, np.int64),
        naive=np.zeros(n, bool),
    )
    usable: list[Candidate] = []
    for candidate in candidates:
        usable.append(candidate)
        if candidate.opaque:
            break
    layout_lengths = {layout.length for candidate in usable for layout in candidate.layouts}
    if not layout_lengths:
        return read
    present = np.bincount(np.where(valid, np.minimum(lengths, 64), 0), minlength=65)
    for length in sorted(layout_lengths):
        if length > 64 or present[length] == 0:
            continue
        group = np.flatnonzero(valid & (lengths == length))
        windows = np.lib.stride_tricks.sliding_window_view(data, length)
        last = max(
            i for i, candidate in enumerate(usable) if any(x.length == length for x in candidate.layouts)
        )
        # In blocks, so that every temporary stays in the CPU cache.
        for start in range(0, len(group), _BLOCK_ROWS):
            rows = group[start : start + _BLOCK_ROWS]
            _read_block(read, usable[: last + 1], length, rows, windows[offsets[rows]].T)
    return read


def _read_block(
    read: FixedRead, candidates: Sequence[Candidate], length: int, rows: np.ndarray, bytes_: np.ndarray
) -> None:
    """Read `rows` (all of byte length `length`; `bytes_` their bytes, position-major) into `read`."""
    matrix = np.ascontiguousarray(bytes_)
    digits = matrix - np.uint8(48)  # ASCII digits become 0-9, everything else wraps above 9
    open_rows = np.ones(len(rows), bool)  # every earlier candidate certainly refuses these
    for candidate in candidates:
        for layout in candidate.layouts:
            if layout.length != length:
                continue
            hit, local, offset = _read_layout(layout, matrix, digits, open_rows)
            if len(hit) == 0:
                continue
            target = rows[hit]
            read.done[target] = True
            read.local_us[target] = local
            read.offset_us[target] = offset
            read.naive[target] = layout.zone == "naive"
            read.fraction = read.fraction or any(name == "f" for name, _, _ in layout.fields)
            open_rows[hit] = False
        if candidate.opaque:
            break
        open_rows &= ~_may_accept(candidate, matrix, digits, length)
        if not open_rows.any():
            break


def _may_accept(candidate: Candidate, matrix: np.ndarray, digits: np.ndarray, length: int) -> np.ndarray:
    """Rows of one length group the candidate might accept (False means certainly refused)."""
    rows = matrix.shape[1]
    if not candidate.min_length <= length <= candidate.max_length:
        return np.zeros(rows, bool)
    result = np.ones(rows, bool)
    for position, allowed in candidate.prefix:
        result &= _check(matrix, digits, position, allowed)
    for position, allowed in candidate.suffix:
        result &= _check(matrix, digits, length + position, allowed)
    return result
