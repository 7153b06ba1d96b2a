"""The outside world end to end, small: APISmith → client → ScheduleHub under storms, and the benchmark."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pydantic import SecretStr

from benchmarks import transport
from syncflow_dagster.clients.apismith import ApiSmithClient, ApiSmithSettings
from syncflow_dagster.clients.http import HttpSettings
from syncflow_dagster.clients.schedulehub import ScheduleHubClient, ScheduleHubSettings
from syncflow_dagster.engine.columns import BK, KEY_SEPARATOR
from syncflow_dagster.simulators import schedulehub
from syncflow_dagster.simulators.apismith import create_app
from syncflow_dagster.simulators.serve import start_server
from syncflow_dagster_tests import loopback_http

SECRET = "transport-e2e-secret"
STORM = {
    "rate_limit_probability": 0.3,
    "retry_after_s": 0,
    "server_error_probability": 0.3,
    "max_faults": 25,
    "seed": 5,
}


def _http() -> HttpSettings:
    return HttpSettings(backoff_base_s=0.01, backoff_max_s=0.05, max_attempts=15, read_timeout_s=20)


def _frame(
    rows: pa.Table, key_columns: list[str], attributes: dict[str, str], refs: dict[str, list[str]]
) -> pa.Table:
    """A minimal SyncFlow frame from APISmith rows: `_bk`, attributes, `_ref.<parent>`."""

    def clean(column: str) -> pa.Array:
        return pc.utf8_upper(pc.utf8_trim_whitespace(rows.column(column)))

    def joined(columns: list[str]) -> pa.Array:
        parts = [clean(c) for c in columns]
        return parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, KEY_SEPARATOR)

    columns: dict[str, Any] = {BK: joined(key_columns)}
    for target, source in attributes.items():
        columns[target] = rows.column(source)
    for parent, fk_columns in refs.items():
        columns[f"_ref.{parent}"] = joined(fk_columns)
    return pa.table(columns)


def test_fetch_and_deliver_every_row_exactly_once_through_storms_on_both_sides() -> None:
    erp = create_app(rows=400, seed=8, clients={"syncflow": SECRET}, secret="a" * 32, as_of=datetime.now(UTC))
    hub = schedulehub.create_app(clients={"syncflow": SECRET}, secret="b" * 32)
    with start_server(erp) as erp_server, start_server(hub) as hub_server:
        for url in (erp_server.url, hub_server.url):
            assert loopback_http.put(f"{url}/admin/faults", json=STORM).status_code == 200

        async def run() -> dict[str, Any]:
            source = ApiSmithSettings(
                base_url=erp_server.url, client_id="syncflow", client_secret=SecretStr(SECRET), page_size=7
            )
            target = ScheduleHubSettings(
                base_url=hub_server.url,
                client_id="syncflow",
                client_secret=SecretStr(SECRET),
                delivery_batch_size=11,
            )
            async with ApiSmithClient(source, _http()) as api, ScheduleHubClient(target, _http()) as sh:
                sites = await api.fetch_changes("Sites")
                centers = await api.fetch_changes("WorkCenters")
                center_frame = _frame(
                    centers,
                    ["Site", "WorkCenter"],
                    {"description": "Description"},
                    {"sites": ["Site"]},
                )
                early = await sh.upsert("work_centers", center_frame)  # child before its parent
                site_results = await sh.upsert("sites", _frame(sites, ["SiteCode"], {"name": "SiteName"}, {}))
                center_results = await sh.upsert("work_centers", center_frame)
                again = await sh.upsert("work_centers", center_frame)  # idempotent
                return {
                    "sites": sites,
                    "centers": centers,
                    "early": early,
                    "site_results": site_results,
                    "center_results": center_results,
                    "again": again,
                    "held_sites": await sh.read_all("sites"),
                    "held_centers": await sh.read_all("work_centers"),
                }

        got = asyncio.run(run())
        erp_faults = loopback_http.get(f"{erp_server.url}/admin/faults").json()["total_served"]
        hub_faults = loopback_http.get(f"{hub_server.url}/admin/faults").json()["total_served"]

    assert erp_faults > 0  # the storm hit the reads (a budget of 25 at most)
    assert hub_faults > 0
    assert got["sites"].num_rows == 5
    assert got["centers"].num_rows == 50
    reasons = set(got["early"].column("reason_code").to_pylist())
    assert got["early"].column("status").to_pylist() == ["rejected"] * 50
    assert len(reasons) == 1
    assert "parent" in reasons.pop()
    assert set(got["site_results"].column("status").to_pylist()) == {"accepted"}
    assert set(got["center_results"].column("status").to_pylist()) == {"accepted"}
    assert set(got["again"].column("status").to_pylist()) == {"accepted"}
    held = got["held_centers"].column("external_key").to_pylist()
    assert len(held) == len(set(held)) == 50
    expected = {
        f"{s.strip().upper()}{KEY_SEPARATOR}{w.strip().upper()}"
        for s, w in zip(
            got["centers"].column("Site").to_pylist(),
            got["centers"].column("WorkCenter").to_pylist(),
            strict=True,
        )
    }
    assert set(held) == expected
    assert sorted(got["held_sites"].column("external_key").to_pylist()) == sorted(
        got["sites"].column("SiteCode").to_pylist()
    )


@pytest.mark.slow
def test_transport_benchmark_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "transport.json"
    assert transport.main(["--rows", "3000", "--page-size", "700", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["fetch"]["rows"] == 3000
    assert figures["fetch"]["pages"] == 5
    assert figures["deliver"]["rows"] == 3000
    assert figures["rows_per_s"]["fetch"] > 0
    assert figures["rows_per_s"]["deliver"] > 0
    assert figures["peak_rss_mb"] > 0
