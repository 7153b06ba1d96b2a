"""The delta stage's keys check over chunks (KeyTally): duplicates and missing keys counted exactly."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from syncflow_dagster.defs.checks import KeyTally
from syncflow_dagster.engine import columns as c


def _plan(keys: Sequence[bytes | None]) -> pa.Table:
    return pa.table(
        {
            c.BK_HASH: pa.array(keys, c.BK_HASH_TYPE),
            c.BK: pa.array([None if key is None else key.hex() for key in keys], pa.string()),
        }
    )


def _tally(*chunks: Sequence[bytes | None]) -> dict[str, object]:
    tally = KeyTally()
    for chunk in chunks:
        tally.add(_plan(chunk))
    result = tally.check()
    return {"passed": result.passed, **{k: v.value for k, v in result.metadata.items()}}


def test_distinct_repeated_shared_first_words_and_missing_keys() -> None:
    rng = np.random.default_rng(4)
    keys = [rng.bytes(16) for _ in range(40)]
    assert _tally(keys[:25], keys[25:]) == {
        "passed": True,
        "rows": 40,
        "missing_keys": 0,
        "duplicate_keys": 0,
    }
    # A key repeated across chunks.
    assert _tally(keys[:25], [*keys[25:], keys[3]])["duplicate_keys"] == 1
    # Two distinct keys that share their first word are not duplicates.
    shared = keys[7][:8] + bytes(8)
    assert _tally(keys, [shared]) == {"passed": True, "rows": 41, "missing_keys": 0, "duplicate_keys": 0}
    # A missing key fails the check (and is counted once among the distinct values).
    missing = _tally(keys, [None])
    assert missing["passed"] is False
    assert missing["duplicate_keys"] == 0
    assert _tally() == {"passed": True, "rows": 0, "missing_keys": 0, "duplicate_keys": 0}
