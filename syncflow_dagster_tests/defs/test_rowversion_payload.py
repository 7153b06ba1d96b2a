"""A catalog may deliver the rowversion and changed-at columns as payload fields.

They were refused at load time, so ScheduleHub could never receive them. Now a
field may name either column as its source: normalize reads the column for
`_rowversion` / `_changed_at` and for the field, the field is part of DATA_HASH
like any other, and an entity that does not map them hashes as before (the
identity vectors of docs/identity.md are tested unchanged in engine/).
"""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.compute as pc

from syncflow_dagster.catalog import default_catalog
from syncflow_dagster.catalog.loader import parse_catalog
from syncflow_dagster.defs import stages
from syncflow_dagster.engine import columns as c
from syncflow_dagster.engine.identity import add_identity
from syncflow_dagster.engine.normalize import normalize
from syncflow_dagster_tests.sync_harness import deployment

CATALOG_WITH_VERSION = """
entities:
  items:
    source: Items
    resource: items
    business_key: [item_no]
    fields:
      - {source: ItemNo, target: item_no, type: string, required: true, case: upper}
      - {source: Description, target: description, type: string}
      - {source: RowVersion, target: erp_rowversion, type: int}
      - {source: ModifiedAt, target: erp_modified_at, type: datetime, precision: us}
"""


def test_the_rowversion_and_changed_at_reach_schedulehub_as_fields(fresh_database_url: str) -> None:
    entity = parse_catalog(CATALOG_WITH_VERSION).entity("items")
    today = dt.datetime.now(dt.UTC).date()
    with deployment(fresh_database_url, rows=300, seed=11) as env:
        fetched = stages.fetch_stage(env.resources["apismith"].client(), entity, (today,))
        normalized, rejected = stages.normalize_stage(entity, fetched.frame)
        assert rejected.num_rows == 0
        identified = stages.identity_stage(entity, normalized.frame).frame
        live = identified.filter(pc.invert(identified[stages.DELETED]))
        ready = live.append_column(c.ACTION, pa.array([c.INSERT] * live.num_rows))
        delivered = stages.deliver_stage(env.resources["schedulehub"].client(), entity, ready)
        assert delivered.counts["failed"] == 0
        assert delivered.counts["delivered"] == live.num_rows > 0
        held = env.schedulehub_records("items")

    source = {row["_bk"]: row for row in live.select([c.BK, c.ROWVERSION, c.CHANGED_AT]).to_pylist()}
    assert held.num_rows == len(source)
    assert "erp_rowversion" in held.column_names
    for record in held.select(["external_key", "erp_rowversion", "erp_modified_at"]).to_pylist():
        row = source[record["external_key"]]
        assert int(record["erp_rowversion"]) == row[c.ROWVERSION]
        assert record["erp_modified_at"] is not None


def test_mapping_the_rowversion_puts_it_in_the_data_hash_only_of_that_entity() -> None:
    with_version = parse_catalog(CATALOG_WITH_VERSION).entity("items")
    without = default_catalog().entity("items")
    raw = pa.table(
        {
            "ItemNo": ["it-1", "it-1"],
            "Description": ["bolt", "bolt"],
            "ItemType": ["MAKE", "MAKE"],
            "UoM": ["pc", "pc"],
            "StdCost": ["1.5", "1.5"],
            "LeadTimeDays": ["3", "3"],
            "Blocked": ["false", "false"],
            "RowVersion": [10, 11],
            "ModifiedAt": ["2026-01-01T00:00:00Z", "2026-01-01T00:00:00Z"],
        }
    )
    # The same record at two rowversions, nothing else changed.
    plain = add_identity(without, normalize(without, raw).rows)[c.DATA_HASH].to_pylist()
    mapped = add_identity(with_version, normalize(with_version, raw).rows)[c.DATA_HASH].to_pylist()
    assert plain[0] == plain[1]  # the rowversion is not payload: an unchanged record hashes the same
    assert mapped[0] != mapped[1]  # declared as a field, a new rowversion is a change to deliver
