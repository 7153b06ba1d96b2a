"""Normalize: every coercion layer, every rejection reason, schema drift."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as _compute
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncflow_dagster.catalog.models import EntitySpec, FieldSpec, Precision
from syncflow_dagster.engine.columns import CHANGED_AT, KEY_SEPARATOR, REJECTED_SCHEMA, ROWVERSION
from syncflow_dagster.engine.datetimes.coerce import (
    coerce_date_column,
    coerce_datetime,
    date_candidates,
    datetime_candidates,
)
from syncflow_dagster.engine.datetimes.fixed import days_from_civil, read_fixed
from syncflow_dagster.engine.datetimes.formats import format_regex, parse_format, parse_format_general
from syncflow_dagster.engine.datetimes.general import coerce_date, coerce_datetime_text
from syncflow_dagster.engine.identity import add_identity
from syncflow_dagster.engine.normalize import SchemaDriftError, normalize, rows_schema

UTC = dt.UTC
pc: Any = _compute  # the stubs cannot type run-time array types


def entity(*fields: dict[str, Any], key: tuple[str, ...] = ("code",)) -> EntitySpec:
    base = [{"source": "Code", "target": "code", "required": True, "case": "upper"}]
    return EntitySpec.model_validate(
        {
            "name": "things",
            "source": "Things",
            "resource": "things",
            "business_key": key,
            "fields": [*base, *fields],
        }
    )


def raw(n: int, **columns: Any) -> pa.Table:
    data: dict[str, Any] = {"Code": [f"k{i}" for i in range(n)]}
    data.update(columns)
    data.setdefault("RowVersion", list(range(1, n + 1)))
    data.setdefault("ModifiedAt", ["2024-05-01T10:00:00+02:00"] * n)
    return pa.table(data)


def one_field(field: dict[str, Any], values: list[Any]) -> tuple[list[Any], list[dict[str, Any]]]:
    spec = entity({"source": "V", "target": "v", **field})
    result = normalize(spec, raw(len(values), V=values))
    kept = result.rows.column("code").to_pylist()
    by_code = dict(zip(kept, result.rows.column("v").to_pylist(), strict=True))
    out = [by_code.get(f"K{i}", "REJECTED") for i in range(len(values))]
    return out, result.rejected.to_pylist()


def test_output_schema_and_declared_order() -> None:
    spec = entity({"source": "B", "target": "b", "type": "int"}, {"source": "A", "target": "a"})
    result = normalize(spec, raw(1, A=["x"], B=["7"], Extra=["ignored"]))
    assert result.rows.schema == rows_schema(spec)
    assert result.rows.column_names == ["code", "b", "a", ROWVERSION, CHANGED_AT]
    assert result.rows.to_pylist()[0]["b"] == 7
    assert result.rows.column(CHANGED_AT)[0].as_py() == dt.datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
    assert result.rejected.schema == REJECTED_SCHEMA
    assert result.rejected.num_rows == 0


def test_string_layer_trim_case_nfc_empty() -> None:
    values, rejected = one_field({"case": "lower"}, ["  AbC ", "e\u0301", "", "   ", None])
    assert values == ["abc", "\u00e9", None, None, None]
    assert rejected == []
    kept, _ = one_field({"trim": False, "nfc": False, "empty_as_null": False}, [" a ", "e\u0301", ""])
    assert kept == [" a ", "e\u0301", ""]


def test_string_max_length_and_control_characters_reject() -> None:
    values, rejected = one_field({"max_length": 3}, ["abc", "abcd", "a\x1fb", "tab\tok"[:3]])
    assert values == ["abc", "REJECTED", "REJECTED", "tab"]
    reasons = {r["raw_value"]: r["reason"] for r in rejected}
    assert reasons["abcd"] == "longer than max_length 3 (4 characters)"
    assert reasons["a\x1fb"] == "contains a control character"
    assert all(r["entity"] == "things" and r["field"] == "V" for r in rejected)


def test_int_layer() -> None:
    values, rejected = one_field(
        {"type": "int"},
        [" 42 ", "+7", "-0", "12.00", "1.5", "abc", "9223372036854775807", "9223372036854775808"],
    )
    assert values[:4] == [42, 7, 0, 12]
    assert values[6] == 9223372036854775807
    assert values[4] == values[5] == values[7] == "REJECTED"
    reasons = {r["raw_value"]: r["reason"] for r in rejected}
    assert reasons == {
        "1.5": "not an integer",
        "abc": "not an integer",
        "9223372036854775808": "integer out of range for int64",
    }


def test_int_from_json_numbers() -> None:
    values, rejected = one_field({"type": "int"}, [1, 2, None])
    assert values == [1, 2, None]
    assert rejected == []


@pytest.mark.parametrize(
    ("rounding", "expected"),
    [
        ("half_even", [Decimal("1.00"), Decimal("1.02"), Decimal("-1.00"), Decimal("0.00")]),
        ("half_up", [Decimal("1.01"), Decimal("1.02"), Decimal("-1.01"), Decimal("0.00")]),
        ("down", [Decimal("1.00"), Decimal("1.01"), Decimal("-1.00"), Decimal("0.00")]),
    ],
)
def test_decimal_rounding_modes(rounding: str, expected: list[Decimal]) -> None:
    values, rejected = one_field(
        {"type": "decimal", "scale": 2, "rounding": rounding}, ["1.005", "1.015", "-1.005", "-0.001"]
    )
    assert values == expected
    assert rejected == []


def test_decimal_accepts_json_floats_exponents_and_negative_zero() -> None:
    values, _ = one_field({"type": "decimal", "scale": 3}, ["0.1", "1e3", "-0.000", "  .5 ", "1.2345E-2"])
    assert values == [
        Decimal("0.100"),
        Decimal("1000.000"),
        Decimal("0.000"),
        Decimal("0.500"),
        Decimal("0.012"),
    ]
    assert str(values[2]) == "0.000"
    floats, rejected = one_field({"type": "decimal", "scale": 3}, [0.1, 1e3, -0.0, None])
    assert floats == [Decimal("0.100"), Decimal("1000.000"), Decimal("0.000"), None]
    assert rejected == []


def test_decimal_rejections() -> None:
    values, rejected = one_field({"type": "decimal", "scale": 2}, ["12,5", ".", "1e40", "9" * 37])
    assert values == ["REJECTED"] * 4
    reasons = [r["reason"] for r in rejected]
    assert reasons[:2] == ["not a decimal", "not a decimal"]
    assert reasons[2:] == ["decimal out of range (at most 36 integer and 38 fractional digits)"] * 2


def test_bool_layer() -> None:
    values, rejected = one_field({"type": "bool"}, ["Yes", " N ", "x", "", None, "maybe", "1", "0"])
    assert values == [True, False, True, False, None, "REJECTED", True, False]
    assert len(rejected) == 1
    assert rejected[0]["raw_value"] == "maybe"
    assert rejected[0]["reason"].startswith("not a boolean (true: 'true'")
    native, _ = one_field({"type": "bool"}, [True, False, None])
    assert native == [True, False, None]
    numbers, _ = one_field({"type": "bool"}, [1, 0])
    assert numbers == [True, False]


def test_date_formats_in_order_and_calendar_checked() -> None:
    values, rejected = one_field(
        {"type": "date", "formats": ["%d.%m.%Y", "%m/%d/%Y"]},
        ["02.01.2024", "01/03/2024", "2024-01-04", "2024-02-30", "31.04.2024", "soon"],
    )
    assert values[:3] == [dt.date(2024, 1, 2), dt.date(2024, 1, 3), dt.date(2024, 1, 4)]
    assert values[3:] == ["REJECTED"] * 3
    assert {r["reason"] for r in rejected} == {"not a date (accepted formats: %d.%m.%Y, %m/%d/%Y, %Y-%m-%d)"}


def test_datetime_iso_offsets_naive_local_and_precision() -> None:
    field = {
        "type": "datetime",
        "timezone": "Europe/Berlin",
        "precision": "ms",
        "formats": ["%d.%m.%Y %H:%M"],
    }
    values, rejected = one_field(
        field,
        [
            "2024-01-02T03:04:05.123456+01:00",  # offset: exact instant, truncated to ms
            "2024-01-02T03:04:05Z",
            "2024-07-01 12:00",  # naive ISO: Berlin summer time
            "31.12.2024 10:00",  # declared format, naive: Berlin winter time
            "2024-10-27T02:30:00",  # DST overlap: the earlier instant
            "2024-03-31T02:30:00",  # DST gap: the moment the gap ends
            "2024-02-30T10:00:00Z",
            "yesterday",
        ],
    )
    assert values[:6] == [
        dt.datetime(2024, 1, 2, 2, 4, 5, 123000, tzinfo=UTC),
        dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        dt.datetime(2024, 7, 1, 10, 0, tzinfo=UTC),
        dt.datetime(2024, 12, 31, 9, 0, tzinfo=UTC),
        dt.datetime(2024, 10, 27, 0, 30, tzinfo=UTC),
        dt.datetime(2024, 3, 31, 1, 0, tzinfo=UTC),
    ]
    assert values[6:] == ["REJECTED", "REJECTED"]
    assert all(
        r["reason"].startswith(
            "not a datetime (accepted: ISO-8601, YYYY-MM-DD as midnight UTC, %d.%m.%Y %H:%M"
        )
        for r in rejected
    )


def test_datetime_second_precision_truncates() -> None:
    values, _ = one_field({"type": "datetime", "precision": "s"}, ["2024-01-02T03:04:05.999+00:00"])
    assert values == [dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)]


def test_enum_aliases_and_unknown_values() -> None:
    values, rejected = one_field(
        {"type": "enum", "values": ["OPEN", "DONE"], "aliases": {"O": "OPEN", "D": "DONE"}, "case": "upper"},
        ["open", " o ", "d", None, "weird"],
    )
    assert values == ["OPEN", "OPEN", "DONE", None, "REJECTED"]
    assert rejected[0]["reason"] == "unknown enum value 'WEIRD'; allowed: OPEN, DONE"
    assert rejected[0]["raw_value"] == "weird"


def test_required_null_rejects_and_all_reasons_of_a_row_are_recorded() -> None:
    spec = entity(
        {"source": "Qty", "target": "qty", "type": "decimal", "scale": 1},
        {"source": "Name", "target": "name", "required": True},
    )
    result = normalize(spec, raw(2, Qty=["x", "1"], Name=[None, "ok"]))
    assert result.rows.column("code").to_pylist() == ["K1"]
    rejected = result.rejected.to_pylist()
    assert sorted((r["field"], r["reason"]) for r in rejected) == [
        ("Name", "required value is missing"),
        ("Qty", "not a decimal"),
    ]
    assert {r["business_key"] for r in rejected} == {"k0"}


def test_rejected_business_key_is_joined_raw_key_text() -> None:
    spec = entity({"source": "Line", "target": "line", "type": "int", "required": True}, key=("code", "line"))
    result = normalize(spec, raw(1, Line=["one"]))
    assert result.rejected.to_pylist() == [
        {
            "entity": "things",
            "business_key": f"k0{KEY_SEPARATOR}one",
            "field": "Line",
            "raw_value": "one",
            "reason": "not an integer",
        }
    ]


def test_bad_rowversion_and_changed_at_reject_the_row() -> None:
    spec = entity()
    result = normalize(
        spec, raw(3, RowVersion=["5", "x", None], ModifiedAt=["2024-01-01T00:00:00Z", None, "no"])
    )
    assert result.rows.column(ROWVERSION).to_pylist() == [5]
    reasons = sorted((r["field"], r["reason"]) for r in result.rejected.to_pylist())
    assert reasons[0] == (
        "ModifiedAt",
        "not a datetime (accepted: ISO-8601, YYYY-MM-DD as midnight UTC; naive values are in UTC)",
    )
    assert ("ModifiedAt", "required value is missing") in reasons
    assert ("RowVersion", "not an integer") in reasons
    assert ("RowVersion", "required value is missing") in reasons


def test_changed_at_as_native_timestamp() -> None:
    stamps = pa.array([dt.datetime(2024, 1, 1, 12, 0)], pa.timestamp("ms"))
    result = normalize(entity(), raw(1, ModifiedAt=stamps))
    assert result.rows.column(CHANGED_AT)[0].as_py() == dt.datetime(2024, 1, 1, 12, 0, tzinfo=UTC)


def test_schema_drift_required_and_rowversion_columns() -> None:
    spec = entity({"source": "Name", "target": "name", "required": True})
    with pytest.raises(SchemaDriftError, match=r"entity 'things': required source column 'Name'"):
        normalize(spec, raw(1))
    # The message names what is missing and lists what the source did send, so drift is easy to see.
    table = raw(1, Name=["n"]).drop_columns(["RowVersion"])
    with pytest.raises(SchemaDriftError, match=r"rowversion column 'RowVersion' is missing") as missing:
        normalize(spec, table)
    assert "(columns: ['Code', 'ModifiedAt', 'Name'])" in str(missing.value)
    table = raw(1, Name=["n"]).drop_columns(["ModifiedAt"])
    with pytest.raises(
        SchemaDriftError, match=r"entity 'things': the changed_at column 'ModifiedAt'"
    ) as drift:
        normalize(spec, table)
    assert "(columns: ['Code', 'Name', 'RowVersion'])" in str(drift.value)


def test_optional_missing_column_is_all_null_and_records_nothing() -> None:
    spec = entity({"source": "Note", "target": "note"}, {"source": "When", "target": "when", "type": "date"})
    result = normalize(spec, raw(2))
    assert result.rows.column("note").to_pylist() == [None, None]
    assert result.rows.column("when").type == pa.date32()
    assert result.rejected.num_rows == 0


def test_empty_batch() -> None:
    spec = entity({"source": "Qty", "target": "qty", "type": "decimal", "scale": 2})
    result = normalize(spec, raw(0, Qty=pa.array([], pa.string())))
    assert result.rows.num_rows == 0
    assert result.rows.schema == rows_schema(spec)


def test_declared_formats_with_offset_and_fallback_directives() -> None:
    field = {
        "type": "datetime",
        "timezone": "America/New_York",
        "precision": "s",
        "formats": ["%d/%m/%Y %H:%M:%S %z", "%b %d %Y %H:%M"],
    }
    values, rejected = one_field(
        field,
        ["02/01/2024 10:00:00 +0100", "Jan 02 2024 10:00", "Feb 30 2024 10:00", "31/02/2024 10:00:00 Z"],
    )
    assert values[:2] == [
        dt.datetime(2024, 1, 2, 9, 0, tzinfo=UTC),
        dt.datetime(2024, 1, 2, 15, 0, tzinfo=UTC),  # naive: New York, UTC-5 in January
    ]
    assert values[2:] == ["REJECTED", "REJECTED"]
    assert len(rejected) == 2


def test_date_single_digit_parts_in_declared_format() -> None:
    values, rejected = one_field(
        {"type": "date", "formats": ["%d.%m.%Y"]}, ["2.1.2024", "29.02.2023", "29.02.2024"]
    )
    assert values == [dt.date(2024, 1, 2), "REJECTED", dt.date(2024, 2, 29)]
    assert len(rejected) == 1


def test_decimal_plain_and_general_paths_mix_in_one_column() -> None:
    # Plain values take the decimal128 path, the others the general one; rows must line up.
    values, rejected = one_field(
        {"type": "decimal", "scale": 2},
        ["1.555", "x", "2e1", "-3", "0." + "1" * 20, "1" + "0" * 40, "99999999999999999999.999"],
    )
    assert values == [
        Decimal("1.56"),
        "REJECTED",
        Decimal("20.00"),
        Decimal("-3.00"),
        Decimal("0.11"),
        "REJECTED",
        Decimal("100000000000000000000.00"),  # a rounding carry to 21 digits still fits
    ]
    assert [(r["business_key"], r["reason"]) for r in rejected] == [
        ("k1", "not a decimal"),
        ("k5", "decimal out of range (at most 36 integer and 38 fractional digits)"),
    ]


def test_threaded_columns_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    import syncflow_dagster.engine.normalize as module

    spec = entity(
        {"source": "Qty", "target": "qty", "type": "decimal", "scale": 2},
        {"source": "At", "target": "at", "type": "datetime", "timezone": "Europe/Berlin"},
    )
    table = raw(4, Qty=["1.005", "x", None, "2"], At=["2024-01-01 10:00", "2024-13-01 10:00", None, "bad"])
    serial = normalize(spec, table)
    serial_identity = add_identity(spec, serial.rows)
    monkeypatch.setattr(module, "_THREADED_ROWS", 0)
    monkeypatch.setattr(module.pa, "cpu_count", lambda: 2)
    threaded = normalize(spec, table)
    assert add_identity(spec, threaded.rows).equals(serial_identity)  # identity threads its columns too
    assert threaded.rows.equals(serial.rows)
    assert threaded.rejected.equals(serial.rejected)
    assert serial.rejected.num_rows == 3


# -- fast paths agree with the general ones ------------------------------------------------------

_digits = st.integers(min_value=0, max_value=99)
_iso_like = st.builds(
    lambda pad, year, month, day, sep, hour, minute, second, tail: (
        f"{pad}{year:04d}-{month:02d}-{day:02d}{sep}{hour:02d}:{minute:02d}:{second:02d}{tail}"
    ),
    st.sampled_from(["", "", " "]),
    st.integers(min_value=1, max_value=9999),
    st.integers(min_value=0, max_value=13),
    st.integers(min_value=0, max_value=32),
    st.sampled_from(["T", "T", "t", " "]),
    st.integers(min_value=0, max_value=25),
    _digits,
    _digits,
    st.sampled_from(
        [
            "",
            "Z",
            "z",
            "+00:00",
            "-00:00",
            "+0000",
            "+00",
            "+01:00",
            "-05:30",
            "+0530",
            "+05",
            "+1",
            ".5Z",
            ".123456789",
            " ",
            "+01:75",
            "Zx",
            "+00:00 ",
        ]
    ),
)
_dotted = st.builds(
    lambda day, month, year, hour, minute, padded: (
        f"{day:02d}.{month:02d}.{year:04d} {hour:02d}:{minute:02d}"
        if padded
        else f"{day}.{month}.{year} {hour}:{minute:02d}"
    ),
    st.integers(min_value=0, max_value=32),
    st.integers(min_value=0, max_value=13),
    st.integers(min_value=1900, max_value=2100),
    st.integers(min_value=0, max_value=25),
    st.integers(min_value=0, max_value=61),
    st.booleans(),
)
_datetime_texts = st.lists(
    st.one_of(_iso_like, _dotted, st.sampled_from(["", "  ", "garbage", "2024-02-29T12:00:00"]), st.none()),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(
    texts=_datetime_texts,
    timezone=st.sampled_from(["Europe/Berlin", "UTC", "America/New_York"]),
    precision=st.sampled_from(list(Precision)),
)
def test_fast_datetime_path_equals_the_general_path(
    texts: list[str | None], timezone: str, precision: Precision
) -> None:
    """The direct read of well-formed ISO values gives exactly the general path's values and rejects."""
    column = pa.array(texts, pa.string())
    formats = ("%d.%m.%Y %H:%M",)
    fast = coerce_datetime(column, formats=formats, timezone=timezone, precision=precision)
    general = coerce_datetime_text(column, formats=formats, timezone=timezone, precision=precision)
    # As integers: an offset can move year 1 before datetime's range, which to_pylist cannot show.
    assert fast.values.cast(pa.int64()).to_pylist() == general.values.cast(pa.int64()).to_pylist()

    def rejected(result: Any) -> list[tuple[int, str]]:
        return sorted(
            (i, str(reason))
            for mask, reason in result.problems
            for i, bad in enumerate(mask.to_pylist())
            if bad
        )

    assert rejected(fast) == rejected(general)


@settings(max_examples=200, deadline=None)
@given(
    texts=st.lists(st.one_of(_dotted, st.sampled_from(["1.1.2024 0:00", "29.02.2023 10:00"])), max_size=40)
)
def test_zero_padded_format_path_equals_the_regex_path(texts: list[str]) -> None:
    fmt = "%d.%m.%Y %H:%M"
    compiled = format_regex(fmt)
    assert compiled is not None
    column = pa.array(texts, pa.string())
    assert parse_format(column, fmt).to_pylist() == parse_format_general(column, *compiled).to_pylist()


def test_integer_columns_read_as_the_text_path_reads_their_digits() -> None:
    values = [0, -1, 7, 2**63 - 1, -(2**63), None]
    typed, _ = one_field({"type": "int"}, values)
    as_text, _ = one_field({"type": "int"}, [None if v is None else str(v) for v in values])
    assert typed == as_text == values
    # A uint64 beyond int64 takes the text path, which names the value as out of range.
    spec = entity({"source": "V", "target": "v", "type": "int"})
    result = normalize(spec, raw(2, V=pa.array([1, 2**64 - 1], pa.uint64())))
    assert result.rows.column("v").to_pylist() == [1]
    assert [r["reason"] for r in result.rejected.to_pylist()] == ["integer out of range for int64"]


@pytest.mark.parametrize("control", ["\x00", "\x08", "\x0b", "\x0c", "\x0e", "\x1f", "\x7f"])
def test_control_characters_are_found_after_sliced_and_multibyte_values(control: str) -> None:
    """The byte scan that spares the regex reads the values' own bytes, also of a sliced column."""
    spec = entity({"source": "V", "target": "v"})
    values = ["Gehäuse", "ok", f"bad{control}x", "€uro"]
    full = raw(len(values), V=values)
    result = normalize(spec, full)
    assert [r["field"] for r in result.rejected.to_pylist()] == ["V"]
    assert result.rejected.column("reason").to_pylist() == ["contains a control character"]
    # A slice that leaves the bad value out scans none of its bytes.
    clean = normalize(spec, full.slice(0, 2))
    assert clean.rejected.num_rows == 0
    assert clean.rows.column("v").to_pylist() == ["Gehäuse", "ok"]
    tail = normalize(spec, full.slice(2, 2))
    assert tail.rejected.num_rows == 1


# -- the fixed-position reader gives exactly the general path's results ----------------------------

CATALOG_DATETIME_FORMATS = ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%d.%m.%Y %H:%M")
CATALOG_DATE_FORMATS = ("%Y-%m-%d", "%d.%m.%Y", "%m/%d/%Y")
_ZONES = [
    "", "Z", "z", "+00:00", "-00:00", "+0000", "+00", "+02:00", "+0200", "+02", "-05:30", "-0930",
    "+14:00", "-12:00", "+25", "+99:99", "+01:75", "+1", "+123", "+01:0", "Zz", "GMT", "+0:00",
]  # fmt: skip
# Characters that look like digits or separators but are not the ASCII ones.
_LOOKALIKES = ["\u0663", "\uff12", "\u00b2", "\u2013", "\u2212", "\u00a0", "\u3000", "\ufe55", "\u0660"]


def _datetime_text(
    year: int, month: int, day: int, hour: int, minute: int, second: int, shape: str, fraction: str, zone: str
) -> str:
    """One value in one of the shapes ERP data (and its dirt) comes in."""
    date, time = f"{year:04d}-{month:02d}-{day:02d}", f"{hour:02d}:{minute:02d}"
    shapes = {
        "iso": f"{date}T{time}:{second:02d}{fraction}{zone}",
        "iso_space": f"{date} {time}:{second:02d}{fraction}{zone}",
        "iso_lower": f"{date}t{time}:{second:02d}{fraction}{zone}",
        "iso_minutes": f"{date}T{time}{zone}",
        "dotted": f"{day:02d}.{month:02d}.{year:04d} {time}",
        "dotted_unpadded": f"{day}.{month}.{year} {hour}:{minute:02d}",
        "dotted_seconds": f"{day:02d}.{month:02d}.{year:04d} {time}:{second:02d}",
        "slashed": f"{month:02d}/{day:02d}/{year:04d}",
        "date": date,
        "date_dotted": f"{day:02d}.{month:02d}.{year:04d}",
        "wrong_separators": f"{year:04d}/{month:02d}/{day:02d}T{time}:{second:02d}",
        "compact": f"{year:04d}{month:02d}{day:02d}T{hour:02d}{minute:02d}{second:02d}",
    }
    return shapes[shape]


def _mutate(text: str, how: str, where: int, extra: str) -> str:
    """Dirt: whitespace around, a character added, dropped or replaced by a look-alike."""
    at = where % (len(text) + 1)
    if how == "pad":
        return f" {text}\t"
    if how == "insert":
        return text[:at] + extra + text[at:]
    if how == "drop":
        return text[:at] + text[at + 1 :]
    if how == "replace":
        return text[:at] + extra + text[at + 1 :]
    return text


_years = st.one_of(
    st.integers(min_value=2020, max_value=2030),
    st.sampled_from([0, 1, 4, 100, 1582, 1600, 1700, 1893, 1900, 1969, 1970, 2000, 2100, 2400, 9999]),
    st.integers(min_value=0, max_value=9999),
)
_datetime_values = st.one_of(
    st.builds(
        _mutate,
        st.builds(
            _datetime_text,
            _years,
            st.integers(min_value=0, max_value=13),
            st.one_of(st.integers(min_value=1, max_value=28), st.integers(min_value=0, max_value=32)),
            st.one_of(st.integers(min_value=0, max_value=23), st.sampled_from([24, 25, 99])),
            st.one_of(st.integers(min_value=0, max_value=59), st.sampled_from([60, 61, 99])),
            st.one_of(st.integers(min_value=0, max_value=59), st.sampled_from([60, 61, 99])),
            st.sampled_from(
                [
                    "shape", "iso", "iso", "iso_space", "iso_lower", "iso_minutes", "dotted",
                    "dotted_unpadded", "dotted_seconds", "slashed", "date", "date_dotted",
                    "wrong_separators", "compact",
                ]
            ).map(lambda shape: "iso" if shape == "shape" else shape),
            st.one_of(
                st.just(""),
                st.builds(lambda sep, digits: sep + digits, st.sampled_from([".", ","]), st.from_regex(r"[0-9]{1,10}", fullmatch=True)),
                st.sampled_from([".", ",5", ".x"]),
            ),
            st.sampled_from(_ZONES),
        ),
        st.sampled_from(["none", "none", "none", "pad", "insert", "drop", "replace"]),
        st.integers(min_value=0, max_value=40),
        st.sampled_from(["0", "9", "-", ":", "T", " ", "x", "+", *_LOOKALIKES]),
    ),
    st.sampled_from(["", " ", "\t", "\u00a0", "garbage", "2024-02-29T12:00:00", "0000-02-29T00:00:00"]),
    st.none(),
)  # fmt: skip


def _rejections(result: Any) -> list[tuple[int, str]]:
    return sorted(
        (i, str(reason)) for mask, reason in result.problems for i, bad in enumerate(mask.to_pylist()) if bad
    )


def _assert_datetimes_agree(
    texts: list[str | None] | pa.Array, formats: tuple[str, ...], timezone: str, precision: Precision
) -> None:
    column = texts if isinstance(texts, pa.Array) else pa.array(texts, pa.string())
    fixed = coerce_datetime(column, formats=formats, timezone=timezone, precision=precision)
    general = coerce_datetime_text(column, formats=formats, timezone=timezone, precision=precision)
    assert fixed.values.type == general.values.type
    # As integers: an offset can move year 1 before datetime's range, which to_pylist cannot show.
    assert fixed.values.cast(pa.int64()).to_pylist() == general.values.cast(pa.int64()).to_pylist()
    assert _rejections(fixed) == _rejections(general)


def _date_spec(formats: tuple[str, ...]) -> FieldSpec:
    return FieldSpec.model_validate({"source": "D", "target": "d", "type": "date", "formats": list(formats)})


def _assert_dates_agree(texts: list[str | None] | pa.Array, formats: tuple[str, ...]) -> None:
    column = texts if isinstance(texts, pa.Array) else pa.array(texts, pa.string())
    spec = _date_spec(formats)
    fixed = coerce_date_column(spec, column)
    general = coerce_date(
        spec, pc.if_else(pc.equal(pc.utf8_trim_whitespace(column), ""), None, pc.utf8_trim_whitespace(column))
    )
    assert fixed.values.cast(pa.int32()).to_pylist() == general.values.cast(pa.int32()).to_pylist()
    assert _rejections(fixed) == _rejections(general)


@settings(max_examples=400, deadline=None)
@given(
    texts=st.lists(_datetime_values, min_size=1, max_size=60),
    formats=st.sampled_from(
        [
            CATALOG_DATETIME_FORMATS,
            (),
            ("%d.%m.%Y %H:%M",),
            ("%d.%m.%Y %H:%M", "%m.%d.%Y %H:%M"),
            ("%Y-%m-%d %H:%M", "%d.%m.%Y %H:%M:%S"),
            ("%b %d %Y %H:%M", "%d.%m.%Y %H:%M"),  # an opaque format first: later ones are not read here
            ("%Y%m%dT%H%M%S", "%Y/%m/%dT%H:%M:%S%z"),
        ]
    ),
    timezone=st.sampled_from(["Europe/Berlin", "UTC", "America/New_York", "Asia/Kolkata"]),
    precision=st.sampled_from(list(Precision)),
)
def test_fixed_position_datetimes_equal_the_general_path(
    texts: list[str | None], formats: tuple[str, ...], timezone: str, precision: Precision
) -> None:
    _assert_datetimes_agree(texts, formats, timezone, precision)


@settings(max_examples=300, deadline=None)
@given(
    texts=st.lists(_datetime_values, min_size=1, max_size=60),
    formats=st.sampled_from(
        [
            CATALOG_DATE_FORMATS,
            (),
            ("%d.%m.%Y", "%m/%d/%Y"),
            ("%d.%m.%Y", "%m.%d.%Y"),  # ambiguous: the first that reads a value wins
            ("%Y%m%d",),
            ("%d.%m.%Y %H:%M",),  # a time of day in a date format: left to the general path
            ("%d %b %Y", "%d.%m.%Y"),
            ("%Y-%m-%dT%H:%M:%S%z",),
        ]
    ),
)
def test_fixed_position_dates_equal_the_general_path(
    texts: list[str | None], formats: tuple[str, ...]
) -> None:
    _assert_dates_agree(texts, formats)


def _calendar_texts() -> list[str]:
    """Every day (and the impossible days 29-31 of every month) of years that test the leap rules."""
    texts = []
    for year in (0, 1, 4, 100, 1900, 1969, 1970, 2000, 2023, 2024, 2100, 2400, 9999):
        for month in range(0, 14):
            for day in range(0, 33):
                texts.append(f"{year:04d}-{month:02d}-{day:02d}T12:34:56")
                texts.append(f"{day:02d}.{month:02d}.{year:04d} 23:59")
                texts.append(f"{year:04d}-{month:02d}-{day:02d}")
                texts.append(f"{month:02d}/{day:02d}/{year:04d}")
    return texts


@pytest.mark.parametrize("timezone", ["Europe/Berlin", "UTC"])
def test_fixed_position_calendar_matches_the_general_path_on_every_day(timezone: str) -> None:
    texts = _calendar_texts()
    _assert_datetimes_agree(texts, CATALOG_DATETIME_FORMATS, timezone, Precision.SECOND)
    _assert_dates_agree(texts, CATALOG_DATE_FORMATS)


def test_fixed_position_times_of_day_and_offsets_match_the_general_path() -> None:
    texts = [
        f"2024-03-15T{hour:02d}:{minute:02d}:{second:02d}{zone}"
        for hour in (0, 1, 9, 10, 19, 20, 23, 24, 25, 29, 30, 99)
        for minute in (0, 59, 60, 99)
        for second in (0, 59, 60, 61)
        for zone in _ZONES
    ]
    texts += [
        f"15.03.2024 {hour:02d}:{minute:02d}" for hour in range(0, 30) for minute in (0, 30, 59, 60, 61)
    ]
    _assert_datetimes_agree(texts, CATALOG_DATETIME_FORMATS, "Europe/Berlin", Precision.MICROSECOND)


def test_fixed_position_dst_gap_and_overlap_in_berlin_match_the_general_path() -> None:
    """Every minute around the spring gap and the autumn overlap, in every naive shape."""
    texts = []
    for day, month in ((31, 3), (27, 10), (30, 3), (26, 10), (29, 3), (25, 10)):
        for year in (2024, 2025, 2026, 2027):
            for hour in (0, 1, 2, 3, 4):
                for minute in range(0, 60, 7):
                    texts.append(f"{year}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:30")
                    texts.append(f"{year}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}:00")
                    texts.append(f"{year}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}")
                    texts.append(f"{day:02d}.{month:02d}.{year} {hour:02d}:{minute:02d}")
    for precision in (Precision.SECOND, Precision.MICROSECOND):
        _assert_datetimes_agree(texts, CATALOG_DATETIME_FORMATS, "Europe/Berlin", precision)
    fixed = coerce_datetime(
        pa.array(texts),
        formats=CATALOG_DATETIME_FORMATS,
        timezone="Europe/Berlin",
        precision=Precision.SECOND,
    )
    # The gap means the moment it ends; the overlap the earlier instant (as the general path does).
    at = dict(zip(texts, fixed.values.to_pylist(), strict=True))
    assert at["31.03.2024 02:21"] == dt.datetime(2024, 3, 31, 1, 0, tzinfo=UTC)
    assert at["2024-10-27T02:21:30"] == dt.datetime(2024, 10, 27, 0, 21, 30, tzinfo=UTC)


def test_fixed_position_fractions_match_the_general_path() -> None:
    texts = [
        f"{stamp}{sep}{digits}{zone}"
        for stamp in (
            "2026-11-29T17:59:17",
            "1969-12-31T23:59:59",
            "0001-01-01T00:00:00",
            "2024-06-01 00:00:00",
        )
        for sep in (".", ",")
        for digits in ("0", "5", "999", "000001", "9999999", "123456789", "1234567890", "")
        for zone in ("", "Z", "+00:00", "-0930", "+14:00", "+25")
    ]
    for precision in Precision:
        _assert_datetimes_agree(texts, (), "UTC", precision)
        _assert_datetimes_agree(texts, CATALOG_DATETIME_FORMATS, "Europe/Berlin", precision)


def test_fixed_position_reader_takes_the_catalog_shapes_and_leaves_the_rest() -> None:
    """The comparisons above only mean something if the reader really takes the common shapes."""
    common = [
        "2026-08-16T05:59:17+0200",
        "2026-06-10 00:29:17",
        "2026-08-22T02:44:17",
        "16.01.2027 11:59",
        "2026-11-29T17:59:17.999+00:00",
        "2026-01-01T00:00:00Z",
        "2000-02-29T23:59:59-14:00",  # leap days of the 400-year rule and of year 0
        "0000-02-29 00:00:00",
        "29.02.2024 12:00",
        "",
        None,
    ]
    odd = ["2026-02-30T10:00:00", " 2026-06-10 00:29:17", "16.1.2027 11:59", "2026-06-10T00:29:17.5+1", "x"]
    read = read_fixed(pa.array(common + odd, pa.string()), datetime_candidates(CATALOG_DATETIME_FORMATS))
    assert read is not None
    assert read.done.tolist() == [True] * len(common) + [False] * len(odd)
    dates = ["2025-12-15", "31.10.2027", "08/31/2026", "", None, "31.02.2027", "8/31/2026", " 2025-12-15"]
    read = read_fixed(pa.array(dates, pa.string()), date_candidates(tuple(CATALOG_DATE_FORMATS)))
    assert read is not None
    assert read.done.tolist() == [True] * 5 + [False] * 3
    # An opaque format (one the general path reads by strptime alone) hides the formats after it.
    read = read_fixed(pa.array(["16.01.2027 11:59"]), datetime_candidates(("%b %d %Y", "%d.%m.%Y %H:%M")))
    assert read is not None
    assert read.done.tolist() == [False]


def test_fixed_position_reader_on_sliced_columns() -> None:
    texts = ["2026-08-16T05:59:17+0200", None, "16.01.2027 11:59", "bad", "2026-06-10 00:29:17", ""] * 5
    column = pa.array(texts, pa.string())
    for start, length in ((0, 30), (1, 7), (3, 20), (29, 1), (5, 0)):
        piece = column.slice(start, length)
        _assert_datetimes_agree(piece, CATALOG_DATETIME_FORMATS, "Europe/Berlin", Precision.SECOND)
        _assert_dates_agree(pc.utf8_slice_codeunits(piece, 0, 10), CATALOG_DATE_FORMATS)


def test_fixed_position_reader_across_its_blocks_of_rows() -> None:
    """More rows of one length than one block (32 768), with odd values at the block edges."""
    rng = np.random.default_rng(11)
    seconds = rng.integers(-2_000_000_000, 4_000_000_000, 80_000)
    stamps = pc.strftime(pa.array(seconds, pa.timestamp("s")), format="%Y-%m-%dT%H:%M:%S").to_pylist()
    for edge in (0, 32_767, 32_768, 65_535, 65_536, 79_999):
        stamps[edge] = "2023-02-29T10:00:00"
    stamps[40_000] = None
    stamps[40_001] = ""
    _assert_datetimes_agree(stamps, CATALOG_DATETIME_FORMATS, "Europe/Berlin", Precision.SECOND)
    _assert_dates_agree([None if s is None else s[:10] for s in stamps], CATALOG_DATE_FORMATS)
    read = read_fixed(pa.array(stamps, pa.string()), datetime_candidates(CATALOG_DATETIME_FORMATS))
    assert read is not None
    assert np.flatnonzero(~read.done).tolist() == [0, 32_767, 32_768, 65_535, 65_536, 79_999]


def test_days_from_civil_matches_the_proleptic_gregorian_calendar() -> None:
    days = [dt.date(1, 1, 1) + dt.timedelta(days=d) for d in range(0, 3_652_059, 997)] + [
        dt.date(9999, 12, 31), dt.date(1970, 1, 1), dt.date(2000, 2, 29), dt.date(1969, 12, 31)
    ]  # fmt: skip
    year, month, day = (np.array([getattr(d, part) for d in days]) for part in ("year", "month", "day"))
    expected = [(d - dt.date(1970, 1, 1)).days for d in days]
    assert days_from_civil(year, month, day).tolist() == expected
    # Year 0 (1 BC) is a leap year in the proleptic calendar, as in Arrow's.
    # 0001-01-01 is day -719162, so 0000-02-29 is 366 - 59 days before it.
    leap_day = days_from_civil(np.array([0, 0]), np.array([2, 3]), np.array([29, 1]))
    assert leap_day.tolist() == [-719469, -719468]


def test_datetime_field_takes_a_bare_iso_date_as_midnight_utc() -> None:
    # adding-an-entity.md's `Since` column holds dates; a datetime field reads them as that day's
    # midnight UTC (not midnight in the field's timezone, which would move the day).
    values, rejected = one_field(
        {"type": "datetime", "timezone": "Europe/Berlin"},
        ["2021-07-15", " 2020-02-29 ", "2021-02-30", "2021-7-15", "2021-07-15T08:00:00"],
    )
    assert values == [
        dt.datetime(2021, 7, 15, tzinfo=UTC),
        dt.datetime(2020, 2, 29, tzinfo=UTC),
        "REJECTED",
        "REJECTED",
        dt.datetime(2021, 7, 15, 6, 0, tzinfo=UTC),
    ]
    assert [r["reason"] for r in rejected] == [
        "not a datetime (accepted: ISO-8601, YYYY-MM-DD as midnight UTC; naive values are in Europe/Berlin)"
    ] * 2


def test_decimal_precision_rejects_values_with_too_many_integer_digits() -> None:
    values, rejected = one_field(
        {"type": "decimal", "scale": 2, "precision": 5},
        ["999.994", "-999.99", "999.995", "1000", "1e3", "12"],
    )
    assert values == [
        Decimal("999.99"),
        Decimal("-999.99"),
        "REJECTED",
        "REJECTED",
        "REJECTED",
        Decimal("12.00"),
    ]
    assert {r["reason"] for r in rejected} == {
        "decimal out of range (precision 5, scale 2: at most 3 integer digits)"
    }
