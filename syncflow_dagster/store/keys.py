"""Business-key hashes on their way into SQL: checked, staged in a TEMP table, joined by index.

Every repository that acts on a set of keys (state lookups and deletes,
closing failures, forgetting parked children) stages them the same way:
distinct and sorted, by binary COPY, into `syncflow_keys(bk_hash uuid)`,
and joins it by primary-key lookups. `execute_for_keys` is that whole round
trip for one statement.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from psycopg import sql

from syncflow_dagster.engine.columns import BK_HASH_TYPE
from syncflow_dagster.store.copy import PgColumn, copy_in, create_staging
from syncflow_dagster.store.database import driver_cursor

_KEYS_STAGING = "syncflow_keys"
_KEY_COLUMN = PgColumn("bk_hash", "uuid")
# The staged keys, as statements name them: `... {keys} AS k ... k.bk_hash`.
KEYS = sql.Identifier(_KEYS_STAGING)


def check_keys(entity: str, field: str, keys: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Business-key hashes as one fixed_size_binary(16) array without nulls, or a clear error."""
    array = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    if array.type != BK_HASH_TYPE:
        raise ValueError(f"entity {entity!r}, field {field!r}: expected {BK_HASH_TYPE}, got {array.type}")
    if array.null_count:
        raise ValueError(f"entity {entity!r}, field {field!r}: {array.null_count} null key hash(es)")
    return array


def stage_keys(cursor: psycopg.Cursor[Any], entity: str, field: str, keys: pa.Array | pa.ChunkedArray) -> int:
    """COPY distinct key hashes, sorted, into TEMP table syncflow_keys(bk_hash uuid); returns the count.

    Also makes the rest of the transaction join by index (see prefer_index_joins).
    """
    array = check_keys(entity, field, keys)
    # Sorted, the index probes of the join walk the primary key in order (and
    # the heap too, which commit_delivered fills in key order).
    unique = pc.unique(array)
    ordered = unique.take(pc.sort_indices(unique))
    create_staging(cursor, _KEYS_STAGING, [_KEY_COLUMN])
    copy_in(cursor, _KEYS_STAGING, pa.table({"bk_hash": ordered}), [_KEY_COLUMN])
    prefer_index_joins(cursor)
    return len(ordered)


def prefer_index_joins(cursor: psycopg.Cursor[Any]) -> None:
    """Join staged keys to entity_state by primary-key lookups for the rest of this transaction.

    Left to itself, the planner hashes the whole entity (a sequential scan of
    millions of rows) to look up a few thousand keys as soon as the staging
    table has statistics, and guesses blindly when it has none. Lookups by
    index make the cost follow the number of staged keys, which is the
    contract of stored_for_keys and what keeps incremental commits small.
    """
    cursor.execute("SET LOCAL enable_hashjoin = off")
    cursor.execute("SET LOCAL enable_mergejoin = off")


def execute_for_keys(
    engine: sa.Engine, entity: str, field: str, keys: pa.Array | pa.ChunkedArray, statement: sql.Composed
) -> int:
    """Stage `keys`, run `statement` (it joins them as {keys}, see KEYS) in the same transaction.

    `statement` gets `%(entity)s`; returns its row count (0, without a round
    trip, for no keys).
    """
    if len(keys) == 0:
        return 0
    with engine.begin() as conn:
        cursor = driver_cursor(conn)
        stage_keys(cursor, entity, field, keys)
        cursor.execute(statement, {"entity": entity})
        return int(cursor.rowcount)
