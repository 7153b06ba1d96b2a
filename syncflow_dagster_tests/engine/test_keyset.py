"""KeySet: membership of 16-byte key hashes against a set sorted once, exact like pc.is_in."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from syncflow_dagster.engine.keyset import KeySet
from syncflow_dagster_tests.engine_frames import random_hashes


def test_membership_equals_is_in() -> None:
    rng = np.random.default_rng(1)
    held = random_hashes(rng, 5000)
    others = random_hashes(rng, 3000)
    asked = pa.concat_arrays([held.slice(0, 2000), others]).take(rng.permutation(5000))
    keys = KeySet(held)
    assert len(keys) == 5000
    expected = pc.is_in(asked, value_set=held).to_numpy(zero_copy_only=False)
    assert np.array_equal(keys.contains(asked), expected)
    assert keys.among(asked).to_pylist() == asked.filter(pa.array(expected)).to_pylist()


def test_keys_sharing_their_first_word_are_told_apart() -> None:
    prefix = b"\x07" * 8
    held = pa.array([prefix + bytes([i]) * 8 for i in (1, 3, 5)], pa.binary(16))
    asked = pa.array([prefix + bytes([i]) * 8 for i in range(7)] + [None], pa.binary(16))
    assert KeySet(held).contains(asked).tolist() == [False, True, False, True, False, True, False, False]


def test_empty_sets_and_questions() -> None:
    rng = np.random.default_rng(2)
    assert KeySet(pa.array([], pa.binary(16))).contains(random_hashes(rng, 3)).tolist() == [False] * 3
    assert KeySet(random_hashes(rng, 3)).contains(pa.array([], pa.binary(16))).tolist() == []
    assert (
        KeySet(pa.chunked_array([random_hashes(rng, 2), random_hashes(rng, 2)]))
        .among(random_hashes(rng, 4))
        .to_pylist()
        == []
    )


def test_refuses_other_types_and_nulls() -> None:
    with pytest.raises(ValueError, match="fixed_size_binary"):
        KeySet(pa.array([b"x"], pa.binary()))
    with pytest.raises(ValueError, match="null"):
        KeySet(pa.array([None], pa.binary(16)))
