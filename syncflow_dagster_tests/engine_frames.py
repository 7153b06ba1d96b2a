"""Small identified frames for the engine tests, built through normalize and identity."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from syncflow_dagster.catalog.models import EntitySpec
from syncflow_dagster.engine.columns import BK_HASH, DATA_HASH, RECIPE, ROWVERSION
from syncflow_dagster.engine.identity import add_identity
from syncflow_dagster.engine.normalize import normalize

ENTITY = EntitySpec.model_validate(
    {
        "name": "parts",
        "source": "Parts",
        "resource": "parts",
        "business_key": ["part_no"],
        "fields": [
            {"source": "PartNo", "target": "part_no", "required": True},
            {"source": "Qty", "target": "qty", "type": "decimal", "scale": 2},
            {"source": "Note", "target": "note"},
        ],
    }
)


def identified(records: list[tuple[str, str | None, int]], note: str | None = None) -> pa.Table:
    """Rows of (part_no, qty, rowversion) through normalize → identity."""
    raw = pa.table(
        {
            "PartNo": pa.array([r[0] for r in records], pa.string()),
            "Qty": pa.array([r[1] for r in records], pa.string()),
            "Note": pa.array([note] * len(records), pa.string()),
            "RowVersion": pa.array([r[2] for r in records], pa.int64()),
            "ModifiedAt": pa.array(["2024-01-01T00:00:00Z"] * len(records), pa.string()),
        }
    )
    result = normalize(ENTITY, raw)
    assert result.rejected.num_rows == 0
    return add_identity(ENTITY, result.rows)


def stored_from(rows: pa.Table) -> pa.Table:
    """The state a commit of `rows` would leave: what plan_delta compares against."""
    return rows.select([BK_HASH, DATA_HASH, ROWVERSION, RECIPE])


def plan_view(plan: pa.Table) -> list[dict[str, Any]]:
    return plan.select(["_bk", "_action", "_reason", ROWVERSION]).to_pylist()


def random_hashes(rng: np.random.Generator, n: int, width: int = 16) -> pa.Array:
    """`n` random fixed-width hashes (a key hash at 16 bytes, a data hash at 32), without Python objects."""
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), n, [None, pa.py_buffer(rng.bytes(width * n))]
    )
