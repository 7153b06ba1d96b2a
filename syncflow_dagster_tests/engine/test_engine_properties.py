"""Engine properties (hypothesis): plans converge, ignore input order, hashes are stable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as _compute
from hypothesis import given, settings
from hypothesis import strategies as st

from syncflow_dagster.engine.columns import BK_HASH, DATA_HASH
from syncflow_dagster.engine.delta import plan_delta
from syncflow_dagster_tests.engine_frames import identified, stored_from

pc: Any = _compute  # the stubs cannot type run-time array types
ROOT = Path(__file__).resolve().parents[2]

part_nos = st.sampled_from([f"P{i}" for i in range(12)])
qtys = st.one_of(st.none(), st.decimals(min_value=-1000, max_value=1000, places=3).map(str))
records = st.lists(st.tuples(part_nos, qtys, st.integers(min_value=1, max_value=50)), max_size=20)


def apply_plan(stored: pa.Table | None, plan: pa.Table) -> pa.Table:
    """The state after ScheduleHub confirmed every insert, update and delete of `plan`."""
    sent = plan.filter(pc.is_in(plan.column("_action"), value_set=pa.array(["insert", "update"])))
    gone = plan.filter(pc.equal(plan.column("_action"), "delete")).column(BK_HASH)
    touched = pa.concat_arrays([sent.column(BK_HASH).combine_chunks(), gone.combine_chunks()])
    kept = (
        stored.filter(pc.invert(pc.is_in(stored.column(BK_HASH), value_set=touched)))
        if stored is not None
        else None
    )
    fresh = stored_from(sent)
    return pa.concat_tables([kept, fresh]) if kept is not None else fresh


@settings(max_examples=50, deadline=None)
@given(first=records, second=records)
def test_applying_a_plan_then_replanning_is_all_skip(first: list[Any], second: list[Any]) -> None:
    stored = apply_plan(None, plan_delta(identified(first), None))
    batch = identified(second)
    stored = apply_plan(stored, plan_delta(batch, stored))
    again = plan_delta(batch, stored)
    assert set(again.column("_action").to_pylist()) <= {"skip"}


@settings(max_examples=50, deadline=None)
@given(first=records, second=records, seed=st.randoms(use_true_random=False))
def test_permuting_input_rows_leaves_the_plan_unchanged(
    first: list[Any], second: list[Any], seed: Any
) -> None:
    stored = stored_from(identified(first)) if first else None
    shuffled = list(second)
    seed.shuffle(shuffled)
    assert plan_delta(identified(second), stored).equals(plan_delta(identified(shuffled), stored))


HASH_SCRIPT = """
import json, sys
from syncflow_dagster_tests.engine_frames import identified
rows = identified([tuple(r) for r in json.loads(sys.argv[1])])
print(json.dumps([[h.hex() for h in rows.column(c).to_pylist()] for c in ("_bk_hash", "_data_hash")]))
"""


def hexes(rows: pa.Table, column: str) -> list[str]:
    values: list[Any] = rows.column(column).to_pylist()
    return [value.hex() for value in values]


@settings(max_examples=5, deadline=None)
@given(batch=records.filter(bool))
def test_hashes_are_stable_across_processes(batch: list[Any]) -> None:
    rows = identified(batch)
    here = [hexes(rows, BK_HASH), hexes(rows, DATA_HASH)]
    done = subprocess.run(
        [sys.executable, "-c", HASH_SCRIPT, json.dumps(batch)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=ROOT,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    )
    assert json.loads(done.stdout) == here
