"""verify.compare classifies every key: matched, lost, different, extra, duplicated, held, refused."""

from __future__ import annotations

import pyarrow as pa

from syncflow_dagster_tests.verify import INVALID_VALUE, Holding, SourceView, compare

VIEW = SourceView(
    "sites",
    ("name",),
    {"A": ("a",), "B": ("b",), "C": ("c",), "D": ("d",)},
    {"R": "field Active: not a bool (value 'maybe')", "S": "field Active: not a bool"},
)


def _hub(keys: list[str], names: list[str | None]) -> pa.Table:
    return pa.table({"id": [f"id{k}" for k in keys], "external_key": keys, "name": names})


def test_compare_classifies_every_key() -> None:
    hub = _hub(["A", "B", "B", "Z", "Y", "R"], ["a", "x", "x", "z", "y", "old"])
    held = {"C": Holding("transient_failure", "retryable"), "Y": Holding("http_503", "retryable")}
    held["R"] = Holding(INVALID_VALUE, "permanent")
    verdict = compare("sites", VIEW, hub, held)
    assert verdict.matched == 1
    assert verdict.duplicated == ["B"]
    assert verdict.different == ["B"]
    assert verdict.lost == ["D"]
    assert verdict.extra == ["Z"]
    assert verdict.unrecorded_refusals == ["S"]
    assert set(verdict.held) == {"C", "Y", "R"}
    assert set(verdict.explained) == {"R"}
    assert len(verdict.defects()) == 5


def test_compare_equal() -> None:
    verdict = compare(
        "sites",
        SourceView("sites", ("name",), {"A": ("a",)}, {}),
        _hub(["A"], ["a"]),
        {},
    )
    assert verdict.defects() == []
    assert verdict.matched == 1


def test_null_differs_from_empty_text() -> None:
    verdict = compare("sites", SourceView("sites", ("name",), {"A": ("",)}, {}), _hub(["A"], [None]), {})
    assert verdict.different == ["A"]
