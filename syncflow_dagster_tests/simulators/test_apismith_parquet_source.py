"""APISmith over a folder of Parquet files answers exactly like the in-memory store for the same data.

The same generated dataset is served twice over real HTTP: from memory, and
from a folder of Parquet files (several files per source, small row groups,
change times as timestamps for some sources and as text for others, files
listed out of RowVersion order). Windows, paging, snapshots, tombstones, keys
and watermarks must agree, before and after the same change sets, and after
the disk-backed stand-in restarts on the folder. Generated change sets are
drawn by each store from its own live records (the disk store reads only what
it samples): the same seed must give the same change set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from syncflow_dagster.catalog import default_catalog
from syncflow_dagster.simulators.apismith import ARROW_STREAM, create_app
from syncflow_dagster.simulators.datagen import generate_dataset
from syncflow_dagster.simulators.parquet_store import CHANGES_DIR, ParquetErpStore, is_disk_source
from syncflow_dagster.simulators.serve import start_server
from syncflow_dagster_tests import loopback_http

AS_OF = datetime(2024, 5, 10, 12, 0, tzinfo=UTC)
CLIENT = {"c": "apismith-parquet-secret"}
ARROW = {"Accept": ARROW_STREAM}
ROW_GROUP_ROWS = 37


# 400 base rows: rowversions reach past the windows' 300..900 and the big sources span about
# eleven row groups, so windows, paging and pruning are still exercised; with 1200 the one-row
# pages alone made ~80k requests.
BASE_ROWS = 400


@pytest.fixture(scope="module")
def dataset() -> dict[str, pa.Table]:
    return generate_dataset(default_catalog(), BASE_ROWS, seed=11, as_of=AS_OF, history_days=6)


def write_folder(dataset: dict[str, pa.Table], folder: Path) -> None:
    for index, (source, table) in enumerate(dataset.items()):
        if index % 2 == 0:
            # Change times as timestamps: the row groups' statistics prune by time too.
            changed = pc.cast(table.column("ModifiedAt"), pa.timestamp("ms", tz="UTC"))
            table = table.set_column(table.schema.get_field_index("ModifiedAt"), "ModifiedAt", changed)
        if index % 3 == 0:
            pq.write_table(table, folder / f"{source}.parquet", row_group_size=ROW_GROUP_ROWS)
            continue
        (folder / source).mkdir()
        third = -(-table.num_rows // 3)
        # File names sort against RowVersion order: the reader must not trust the listing.
        for part, start in enumerate(range(0, table.num_rows, third)):
            pq.write_table(
                table.slice(start, third),
                folder / source / f"part-{9 - part}.parquet",
                row_group_size=ROW_GROUP_ROWS,
            )


def client(url: str) -> httpx.Client:
    http = loopback_http.client(base_url=url, timeout=60)
    token = http.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "client_id": "c", "client_secret": CLIENT["c"]},
    ).json()["access_token"]
    http.headers["Authorization"] = f"Bearer {token}"
    return http


@pytest.fixture
def servers(
    dataset: dict[str, pa.Table], tmp_path: Path
) -> Iterator[tuple[httpx.Client, httpx.Client, Path]]:
    write_folder(dataset, tmp_path)
    assert is_disk_source(default_catalog(), tmp_path)
    memory = create_app(dataset=dataset, clients=CLIENT, secret="m" * 32)
    disk = create_app(source_dir=tmp_path, clients=CLIENT, secret="d" * 32)
    assert isinstance(disk.state.apismith.store, ParquetErpStore)
    with (
        start_server(memory) as one,
        start_server(disk) as two,
        closing(client(one.url)) as a,
        closing(client(two.url)) as b,
    ):
        yield a, b, tmp_path


def read(
    http: httpx.Client, source: str, kind: str = "changes", **params: Any
) -> tuple[list[Any], int, list[int]]:
    """Every record of one read, the pinned snapshot and the size of each page."""
    records: list[Any] = []
    sizes: list[int] = []
    query = dict(params)
    for _ in range(10_000):  # bounded
        response = http.get(f"/v1/entities/{source}/{kind}", params=query, headers=ARROW)
        assert response.status_code == 200, response.text
        table = pa.ipc.open_stream(response.content).read_all()
        assert int(response.headers["x-row-count"]) == table.num_rows
        records.extend(table.to_pylist())
        sizes.append(table.num_rows)
        if response.headers["x-has-more"] != "true":
            return records, int(response.headers["x-snapshot-rowversion"]), sizes
        query["after_rowversion"] = int(response.headers["x-next-after-rowversion"])
        query["snapshot_rowversion"] = int(response.headers["x-snapshot-rowversion"])
    raise AssertionError("paging did not end")


def windows() -> list[dict[str, Any]]:
    day = AS_OF - timedelta(days=3)
    return [
        {},
        {"limit": 1},
        {"limit": 7},
        {"limit": 50_000},
        {"changed_from": day.isoformat(), "changed_to": (day + timedelta(days=1)).isoformat(), "limit": 13},
        {"changed_from": (AS_OF - timedelta(hours=30)).isoformat(), "limit": 29},
        {"changed_to": (AS_OF - timedelta(days=5)).isoformat()},
        {"after_rowversion": 500, "limit": 41},
        {"after_rowversion": 300, "rowversion_to": 900, "limit": 11},
        {"after_rowversion": 10**9},
    ]


def after_restart() -> list[dict[str, Any]]:
    """The windows read again after the disk-backed stand-in restarts.

    A restart can lose or misorder the change sets it reads back from the folder, which
    any whole read shows: the default page, pages of 7, one page of everything and a
    day's window (row-group pruning). Not the one-row pages, the costliest read (a
    request per row per source, about a thousand per store): they walk the same paging
    code over the same files, and both states were walked that way before the restart.
    """
    return [params for params in windows() if params.get("limit") != 1][:4]


def expected_read(reference: httpx.Client, source: str, kind: str, params: dict[str, Any]) -> Any:
    """What `read(..., **params)` must give on the store under test, from the reference store.

    One-row pages are the test's costliest read (a request per row per source). The store
    under test walks them; the reference (the in-memory store, whose paging
    test_apismith_server.py covers) is read whole, and the walk it would give follows: the
    same records and snapshot, one row per page, or one empty page for an empty window.
    """
    if params.get("limit") != 1:
        return read(reference, source, kind, **params)
    records, snapshot, _ = read(reference, source, kind, **{**params, "limit": 50_000})
    return records, snapshot, [1] * len(records) or [0]


def assert_same(
    a: httpx.Client, b: httpx.Client, sources: list[str], *, reads: list[dict[str, Any]] | None = None
) -> None:
    """`b` answers as the reference `a` does."""
    for source in sources:
        assert (
            a.get(f"/v1/entities/{source}/watermark").json()
            == b.get(f"/v1/entities/{source}/watermark").json()
        )
        for params in windows() if reads is None else reads:
            for kind in ("changes", "tombstones"):
                assert expected_read(a, source, kind, params) == read(b, source, kind, **params), (
                    source,
                    kind,
                    params,
                )
        snapshots = [
            pa.ipc.open_stream(http.get(f"/admin/snapshot/{source}", headers=ARROW).content).read_all()
            for http in (a, b)
        ]
        assert snapshots[0].equals(snapshots[1]), source
        as_json = [orjson.loads(http.get(f"/admin/snapshot/{source}").content) for http in (a, b)]
        assert as_json[0] == as_json[1] == {"records": snapshots[0].to_pylist()}
        keys = [
            sorted(
                map(
                    str,
                    pa.ipc.open_stream(http.get(f"/v1/entities/{source}/keys", headers=ARROW).content)
                    .read_all()
                    .to_pylist(),
                )
            )
            for http in (a, b)
        ]
        assert keys[0] == keys[1]
        lines = [http.get(f"/v1/entities/{source}/keys").content.splitlines() for http in (a, b)]
        assert sorted(lines[0]) == sorted(lines[1])
    assert a.get("/v1/entities").json() == b.get("/v1/entities").json()


def test_a_parquet_folder_answers_like_the_in_memory_store(
    servers: tuple[httpx.Client, httpx.Client, Path], dataset: dict[str, pa.Table]
) -> None:
    memory, disk, folder = servers
    assert_same(memory, disk, list(dataset))
    # A day's window is pruned to the row groups that can hold it, and still exact.
    records, _, sizes = read(
        disk, "ProductionOrders", changed_from=(AS_OF - timedelta(days=1)).isoformat(), limit=5
    )
    assert 0 < len(records) < dataset["ProductionOrders"].num_rows
    assert max(sizes) <= 5

    explicit = {
        "upserts": {
            "Items": [
                {
                    **{
                        k: v
                        for k, v in dataset["Items"].slice(3, 1).to_pylist()[0].items()
                        if k not in ("RowVersion", "ModifiedAt")
                    },
                    "Description": "changed",
                },
                {
                    **{
                        k: v
                        for k, v in dataset["Items"].slice(4, 1).to_pylist()[0].items()
                        if k not in ("RowVersion", "ModifiedAt")
                    },
                    "ItemNo": "IT-NEW-1",
                },
            ]
        },
        "deletes": {
            "Items": [{"ItemNo": dataset["Items"].column("ItemNo")[7].as_py()}, {"ItemNo": "IT-NONE"}]
        },
        "changed_at": AS_OF.isoformat(),
    }
    generated = {
        "updated_pct": 3,
        "inserted_pct": 2,
        "deleted_pct": 1,
        "seed": 4,
        "changed_at": AS_OF.isoformat(),
    }
    for body in (explicit, {**generated, "entities": ["ProductionOrders"]}, generated):
        answers = [http.post("/admin/changesets", json=body) for http in (memory, disk)]
        assert answers[0].status_code == answers[1].status_code == 200, answers[1].text
        assert answers[0].json() == answers[1].json()
    assert memory.get("/v1/entities/Items/watermark").json()["row_count"] == dataset["Items"].num_rows + 1 - 1
    assert len(list((folder / CHANGES_DIR).iterdir())) == 3
    assert_same(memory, disk, list(dataset))

    # The disk-backed stand-in restarts on the folder with its change sets.
    again = create_app(source_dir=folder, clients=CLIENT, secret="e" * 32)
    with start_server(again) as server, closing(client(server.url)) as restarted:
        assert_same(memory, restarted, list(dataset), reads=after_restart())
        for http in (memory, restarted):
            assert http.post("/admin/reset").status_code == 200
        assert not (folder / CHANGES_DIR).exists()
        assert_same(memory, restarted, list(dataset), reads=after_restart())
