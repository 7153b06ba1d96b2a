"""Identity: the documented recipe vectors, canonical text per type, hash shapes."""

from __future__ import annotations

import datetime as dt
import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import blake3
import pyarrow as pa
import pytest
import xxhash

from syncflow_dagster.catalog import default_catalog
from syncflow_dagster.catalog.models import EntitySpec
from syncflow_dagster.engine.columns import (
    BK,
    BK_HASH,
    BK_HASH_TYPE,
    DATA_HASH,
    DATA_HASH_TYPE,
    KEY_SEPARATOR,
    RECIPE,
    RECIPE_TYPE,
)
from syncflow_dagster.engine.identity import (
    RECIPE_VERSION,
    add_identity,
    canonical_key_text,
    canonical_payload,
    canonical_text,
    key_hash_of,
)
from syncflow_dagster.engine.normalize import normalize

DOC = Path(__file__).resolve().parents[2] / "docs" / "identity.md"


def documented_vectors() -> list[dict[str, Any]]:
    text = DOC.read_text("utf-8")
    blocks = re.findall(r"```json\n(.*?)\n```", text, flags=re.DOTALL)
    assert len(blocks) == 1, "docs/identity.md must hold exactly one JSON block of vectors"
    vectors: list[dict[str, Any]] = json.loads(blocks[0])
    return vectors


VECTORS = documented_vectors()


def test_the_doc_has_at_least_ten_vectors_covering_the_traps() -> None:
    assert len(VECTORS) >= 10
    names = " ".join(v["name"] for v in VECTORS)
    for topic in ("null", "-0.00", "NFC", "datetime", "composite", "field order"):
        assert topic in names


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_code_matches_documented_vector(vector: dict[str, Any]) -> None:
    entity = EntitySpec.model_validate(
        {
            "name": "vectors",
            "source": "Vectors",
            "resource": "vectors",
            "business_key": vector["business_key"],
            "fields": vector["fields"],
        }
    )
    columns = {name: pa.array([value], pa.string()) for name, value in vector["raw"].items()}
    raw = pa.table({**columns, "RowVersion": [1], "ModifiedAt": ["2024-01-01T00:00:00Z"]})
    result = normalize(entity, raw)
    assert result.rejected.num_rows == 0
    identified = add_identity(entity, result.rows)
    assert identified.column(BK).to_pylist() == [vector["bk"]]
    assert canonical_payload(entity, result.rows).to_pylist() == [vector["payload"]]
    assert identified.column(BK_HASH)[0].as_py().hex() == vector["bk_hash"]
    assert identified.column(DATA_HASH)[0].as_py().hex() == vector["data_hash"]
    # The documented hashes follow from the documented text with the plain libraries.
    assert xxhash.xxh3_128_digest(vector["bk"].encode()).hex() == vector["bk_hash"]
    assert blake3.blake3(vector["payload"].encode()).hexdigest() == vector["data_hash"]


def test_pairs_that_must_hash_alike_or_differ() -> None:
    by_name = {v["name"]: v["data_hash"] for v in VECTORS}
    assert by_name["decimal -0.00 equals 0.00 (negative zero)"] == by_name["decimal -0.00 equals 0.00 (zero)"]
    assert (
        by_name["Unicode NFD input hashes like NFC (NFD)"]
        == by_name["Unicode NFD input hashes like NFC (NFC)"]
    )
    assert by_name["datetime given in Berlin local time"] == by_name["the same instant given with an offset"]
    assert by_name["null is distinct from empty (null)"] != by_name["null is distinct from empty (empty)"]


def test_canonical_text_per_type() -> None:
    assert canonical_text(pa.array([10, -7, None])).to_pylist() == ["10", "-7", None]
    decimals = pa.array([Decimal("0.000000001"), Decimal("-1.5"), Decimal("0"), None], pa.decimal128(38, 9))
    assert canonical_text(decimals).to_pylist() == ["0.000000001", "-1.500000000", "0.000000000", None]
    whole = pa.array([Decimal("12"), Decimal("-3")], pa.decimal128(38, 0))
    assert canonical_text(whole).to_pylist() == ["12", "-3"]
    assert canonical_text(pa.array([True, False])).to_pylist() == ["true", "false"]
    assert canonical_text(pa.array([dt.date(2024, 2, 5)])).to_pylist() == ["2024-02-05"]
    berlin = pa.array(
        [dt.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC)], pa.timestamp("us", tz="Europe/Berlin")
    )
    assert canonical_text(berlin).to_pylist() == ["2024-01-02T03:04:05.000006Z"]
    with pytest.raises(ValueError, match="naive timestamp"):
        canonical_text(pa.array([dt.datetime(2024, 1, 1)], pa.timestamp("us")))


def test_add_identity_columns_and_types() -> None:
    entity = default_catalog().entity("sales_order_lines")
    raw = pa.table(
        {
            "OrderNo": ["so-1", "so-1"],
            "LineNo": ["10", "20"],
            "ItemNo": ["i-1", "i-2"],
            "RowVersion": [1, 2],
            "ModifiedAt": ["2024-01-01T00:00:00Z"] * 2,
        }
    )
    identified = add_identity(entity, normalize(entity, raw).rows)
    assert identified.schema.field(BK_HASH).type == BK_HASH_TYPE
    assert identified.schema.field(DATA_HASH).type == DATA_HASH_TYPE
    assert identified.schema.field(RECIPE).type == RECIPE_TYPE
    assert identified.column(RECIPE).to_pylist() == [RECIPE_VERSION] * 2
    assert identified.column(BK).to_pylist() == [f"SO-1{KEY_SEPARATOR}10", f"SO-1{KEY_SEPARATOR}20"]
    # Re-running identity on its own output replaces, never duplicates, its columns.
    again = add_identity(entity, identified)
    assert again.column_names == identified.column_names
    assert again.column(DATA_HASH).equals(identified.column(DATA_HASH))


def test_key_hash_of_keeps_nulls() -> None:
    hashes = key_hash_of(pa.array(["A", None]))
    assert hashes.type == BK_HASH_TYPE
    assert hashes.to_pylist() == [xxhash.xxh3_128_digest(b"A"), None]


def test_null_key_is_an_error_naming_entity_and_field() -> None:
    entity = default_catalog().entity("items")
    rows = pa.table({"item_no": pa.array([None], pa.string())})
    with pytest.raises(ValueError, match=r"entity 'items': business key field 'item_no' is null in 1 row"):
        canonical_key_text(entity, rows)


def test_length_prefix_of_dates_and_datetimes_outside_four_digit_years() -> None:
    entity = EntitySpec.model_validate(
        {
            "name": "eras",
            "source": "Eras",
            "resource": "eras",
            "business_key": ["code"],
            "fields": [
                {"source": "Code", "target": "code"},
                {"source": "Day", "target": "day", "type": "date"},
                {"source": "At", "target": "at", "type": "datetime"},
            ],
        }
    )
    ancient = pa.table(
        {
            "code": ["a", "b"],
            "day": pa.array([dt.date(2024, 1, 2), None], pa.date32()),
            "at": pa.array([-62135596800 * 10**6 - 1, None], pa.timestamp("us", tz="UTC")),
        }
    )
    payload = canonical_payload(entity, ancient).to_pylist()
    at_text: str = canonical_text(ancient.column("at"))[0].as_py()
    assert payload == [f"1:a10:2024-01-02{len(at_text.encode())}:{at_text}", "1:b~~"]
