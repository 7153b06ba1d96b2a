"""Reserved column names and Arrow types that SyncFlow adds to every frame.

Payload columns carry the catalog's target names; SyncFlow's own columns start
with `_` so they can never collide with a target name (targets start with a
letter, enforced by the catalog).
"""

from __future__ import annotations

import pyarrow as pa

from syncflow_dagster.catalog.models import KEY_SEPARATOR as CATALOG_KEY_SEPARATOR

ROWVERSION = "_rowversion"
CHANGED_AT = "_changed_at"
BK = "_bk"
BK_HASH = "_bk_hash"
DATA_HASH = "_data_hash"
RECIPE = "_recipe"
ACTION = "_action"
REASON = "_reason"

BK_HASH_TYPE = pa.binary(16)
DATA_HASH_TYPE = pa.binary(32)
ROWVERSION_TYPE = pa.int64()
CHANGED_AT_TYPE = pa.timestamp("us", tz="UTC")
RECIPE_TYPE = pa.int16()

# Actions a delta plan assigns to each key.
INSERT = "insert"
UPDATE = "update"
DELETE = "delete"
SKIP = "skip"
ACTIONS = (INSERT, UPDATE, DELETE, SKIP)

# The rejected frame: one row per value that could not be coerced.
REJECTED_SCHEMA = pa.schema(
    [
        ("entity", pa.string()),
        ("business_key", pa.string()),
        ("field", pa.string()),
        ("raw_value", pa.string()),
        ("reason", pa.string()),
    ]
)

# Separator of the canonical business-key text (`_bk`): the catalog's KEY_SEPARATOR.
KEY_SEPARATOR = CATALOG_KEY_SEPARATOR
