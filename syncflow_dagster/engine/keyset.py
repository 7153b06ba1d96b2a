"""A fixed set of key hashes held compactly, asked chunk after chunk: which of these keys are in it?

`pc.is_in` builds a hash table of its value set on every call, and a Python
set of a million 16-byte `bytes` costs about a hundred bytes a key. A stage
that asks the same set once per chunk (parent-child: "which of this chunk's
parents are delivered?") holds it here instead: the keys' two 64-bit words,
sorted once, 16 bytes a key, and each question is a binary search of the
chunk's keys.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from syncflow_dagster.engine.columns import BK_HASH_TYPE
from syncflow_dagster.engine.delta import key_words, word_order


class KeySet:
    """Null-free 16-byte key hashes, sorted as (high, low) 64-bit words."""

    def __init__(self, keys: pa.Array | pa.ChunkedArray) -> None:
        array = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
        if array.type != BK_HASH_TYPE:
            raise ValueError(f"a KeySet holds {BK_HASH_TYPE} key hashes, got {array.type}")
        if array.null_count:
            raise ValueError(f"a KeySet holds no null key hash, got {array.null_count}")
        words = key_words(array)
        order = word_order(words) if len(words) > 1 else np.arange(len(words))
        self._high = np.ascontiguousarray(words[order, 0])
        self._low = np.ascontiguousarray(words[order, 1])

    def __len__(self) -> int:
        return len(self._high)

    def contains(self, keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """A boolean mask: which of `keys` are in the set (a null key never is)."""
        array = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
        if len(array) == 0 or len(self._high) == 0:
            return np.zeros(len(array), dtype=bool)
        valid = np.ones(len(array), dtype=bool)
        if array.null_count:
            valid = array.is_valid().to_numpy(zero_copy_only=False)
            # A null's slot holds arbitrary bytes; read it as zeros, then mask it out.
            array = array.fill_null(pa.scalar(bytes(BK_HASH_TYPE.byte_width), BK_HASH_TYPE))
        words = key_words(array)
        high, low = words[:, 0], words[:, 1]
        left = np.searchsorted(self._high, high, side="left")
        right = np.searchsorted(self._high, high, side="right")
        found = np.zeros(len(array), dtype=bool)
        single = right - left == 1
        found[single] = self._low[left[single]] == low[single]
        # Two keys of the set sharing a first word (rare for random hashes): look at each.
        for row in np.flatnonzero(right - left > 1):
            found[row] = bool(np.any(self._low[left[row] : right[row]] == low[row]))
        return found & valid

    def among(self, keys: pa.Array | pa.ChunkedArray) -> pa.Array:
        """The keys (of `keys`) that are in the set, in their order."""
        array = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
        return array.filter(pa.array(self.contains(array)))
