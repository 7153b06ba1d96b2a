"""Tests of ScheduleHubClient against the ScheduleHub stand-in over real sockets."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pydantic import SecretStr

from syncflow_dagster.clients import schedulehub
from syncflow_dagster.clients.http import HttpSettings
from syncflow_dagster.clients.schedulehub import ScheduleHubClient, ScheduleHubSettings, wire_timestamp_text
from syncflow_dagster.simulators.faults import FaultConfig, FaultInjector
from syncflow_dagster.simulators.schedulehub import create_app
from syncflow_dagster.simulators.serve import RunningServer, start_server
from syncflow_dagster_tests.waiting import token_expired, wait_until_async

SECRET = "delivery-secret-Z9"
FAST = HttpSettings(backoff_base_s=0.01, backoff_max_s=0.05, max_attempts=10, max_concurrency=3)
ROWS = 3000


class Hub:
    def __init__(self, server: RunningServer, faults: FaultInjector, app: Any) -> None:
        self.server = server
        self.faults = faults
        self.app = app

    def client(self, batch_size: int = 500, http: HttpSettings = FAST) -> ScheduleHubClient:
        settings = ScheduleHubSettings(
            base_url=self.server.url,
            client_id="syncflow",
            client_secret=SecretStr(SECRET),
            delivery_batch_size=batch_size,
        )
        return ScheduleHubClient(settings, http)


@pytest.fixture
def hub() -> Iterator[Hub]:
    app = create_app(clients={"syncflow": SECRET}, secret="s" * 32)
    with start_server(app) as server:
        yield Hub(server, app.state.faults, app)


def sites(n: int = 10) -> pa.Table:
    return pa.table({"_bk": [f"S{i}" for i in range(n)], "name": [f"site {i}" for i in range(n)]})


def items(n: int = ROWS) -> pa.Table:
    return pa.table(
        {
            "_bk": [f"I{i:05d}" for i in range(n)],
            "_bk_hash": pa.array([i.to_bytes(16, "big") for i in range(n)], pa.binary(16)),
            "qty": list(range(n)),
            "price": pa.array([Decimal(i) / 100 for i in range(n)], pa.decimal128(12, 2)),
            "_ref.sites": [f"S{i % 10}" for i in range(n)],
        }
    )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def deliver(hub: Hub, *tables: tuple[str, pa.Table], batch_size: int = 500) -> list[pa.Table]:
    async with hub.client(batch_size) as client:
        return [await client.upsert(resource, table) for resource, table in tables]


async def read(hub: Hub, resource: str) -> pa.Table:
    async with hub.client() as client:
        return await client.read_all(resource)


def assert_all_accepted(results: pa.Table, n: int) -> None:
    assert results.num_rows == n
    assert set(results.column("status").to_pylist()) == {"accepted"}


@pytest.mark.parametrize(
    "storm",
    [
        FaultConfig(rate_limit_probability=0.3, retry_after_s=0, max_faults=12, seed=1),
        FaultConfig(server_error_probability=0.3, max_faults=12, seed=2),
        FaultConfig(drop_connection_probability=0.3, max_faults=6, seed=3),
    ],
    ids=["429-storm", "5xx-storm", "dropped-connections"],
)
def test_delivery_under_a_storm_lands_every_row_exactly_once(hub: Hub, storm: FaultConfig) -> None:
    hub.faults.configure(storm)
    site_results, item_results = run(deliver(hub, ("sites", sites()), ("items", items())))
    assert_all_accepted(site_results, 10)
    assert_all_accepted(item_results, ROWS)
    assert hub.faults.total_served > 0
    hub.faults.configure(FaultConfig())
    back = run(read(hub, "items"))
    keys = back.column("external_key").to_pylist()
    assert sorted(keys) == items().column("_bk").to_pylist()
    assert len(set(keys)) == len(keys) == ROWS
    assert len(set(back.column("id").to_pylist())) == ROWS
    assert sorted(item_results.column("_bk").to_pylist()) == sorted(keys)


def test_resend_creates_nothing_new(hub: Hub) -> None:
    first, second = run(deliver(hub, ("sites", sites()), ("sites", sites())))
    assert set(first.column("outcome").to_pylist()) == {"created"}
    assert set(second.column("outcome").to_pylist()) == {"unchanged"}
    assert first.column("schedulehub_id").to_pylist() == second.column("schedulehub_id").to_pylist()

    async def counts() -> dict[str, int]:
        async with hub.client() as client:
            return await client.counts()

    assert run(counts()) == {"sites": 10}


def test_child_before_parent_is_rejected_for_that_row(hub: Hub) -> None:
    (results,) = run(deliver(hub, ("items", items(5))))
    assert results.column("reason_code").to_pylist() == ["parent_missing"] * 5
    assert results.column("retryable").to_pylist() == [False] * 5
    assert results.column("_bk").to_pylist() == items(5).column("_bk").to_pylist()


def test_partial_failures_come_back_for_exactly_those_rows(hub: Hub) -> None:
    hub.faults.configure(FaultConfig(partial_failure_probability=0.05, seed=11))
    run(deliver(hub, ("sites", sites())))
    hub.faults.configure(FaultConfig(partial_failure_probability=0.05, seed=11))
    (results,) = run(deliver(hub, ("items", items())))
    rejected = results.filter(pa.compute.equal(results.column("status"), pa.scalar("rejected")))
    assert rejected.num_rows == hub.faults.served["partial_failure"] > 0
    assert set(rejected.column("reason_code").to_pylist()) == {"transient_failure"}
    assert all(rejected.column("retryable").to_pylist())
    held = set(run(read(hub, "items")).column("external_key").to_pylist())
    assert held.isdisjoint(rejected.column("_bk").to_pylist())
    assert len(held) == ROWS - rejected.num_rows


def test_a_row_without_business_key_is_reported_and_the_rest_delivered(hub: Hub) -> None:
    table = pa.table({"_bk": ["S1", None, "S2", ""], "name": ["a", "b", "c", "d"]})
    (results,) = run(deliver(hub, ("sites", table)))
    assert results.num_rows == 4
    by_status = sorted(
        zip(results.column("status").to_pylist(), results.column("reason_code").to_pylist(), strict=True),
        key=str,
    )
    assert by_status.count(("rejected", "invalid_record")) == 2
    assert by_status.count(("accepted", None)) == 2


def test_wire_batches_are_built_only_for_the_batches_in_flight(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wire form of a batch exists only while it is sent: never more than max_concurrency at once."""
    alive = {"now": 0, "most": 0, "built": 0}
    to_wire = schedulehub.to_wire
    upsert_batch = ScheduleHubClient._upsert_batch

    def counting_to_wire(records: pa.Table) -> pa.Table:
        alive["now"] += 1
        alive["built"] += 1
        alive["most"] = max(alive["most"], alive["now"])
        return to_wire(records)

    async def counting_upsert_batch(self: ScheduleHubClient, url: str, batch: pa.Table) -> pa.Table:
        try:
            return await upsert_batch(self, url, batch)
        finally:
            alive["now"] -= 1

    monkeypatch.setattr(schedulehub, "to_wire", counting_to_wire)
    monkeypatch.setattr(ScheduleHubClient, "_upsert_batch", counting_upsert_batch)
    run(deliver(hub, ("sites", sites())))
    (results,) = run(deliver(hub, ("items", items()), batch_size=100))
    assert_all_accepted(results, ROWS)
    assert sorted(results.column("_bk").to_pylist()) == items().column("_bk").to_pylist()
    assert alive["built"] == 1 + ROWS // 100
    assert 1 < alive["most"] <= FAST.max_concurrency
    assert alive["now"] == 0


def test_token_expiring_mid_run_is_survived(hub: Hub) -> None:
    hub.faults.configure(FaultConfig(token_ttl_s=1))

    async def run_across_token_lifetimes() -> tuple[list[pa.Table], int]:
        async with hub.client(batch_size=100) as client:
            out = [await client.upsert("sites", sites())]
            for start in range(0, 600, 100):
                if start == 200:
                    # The short TTL: the token runs out between two batches (the refresh path).
                    token = client._auth._token
                    await wait_until_async(partial(token_expired, token), "the token to expire", timeout_s=10)
                if start == 400:
                    # Revoked mid-run: the next batch meets a 401 and refreshes once.
                    hub.app.state.tokens.revoke_all()
                out.append(await client.upsert("items", items(600).slice(start, 100)))
            return out, client.tokens_fetched

    results, fetched = run(run_across_token_lifetimes())
    for table in results:
        assert set(table.column("status").to_pylist()) == {"accepted"}
    # The first token, its refresh after expiry, and the one after the revocation's 401.
    assert fetched >= 3


def test_batch_still_failing_after_retries_yields_retryable_rejections(hub: Hub) -> None:
    hub.faults.configure(FaultConfig(server_error_probability=1.0, server_error_statuses=(503,)))
    http = HttpSettings(max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.02)

    async def go() -> pa.Table:
        async with hub.client(http=http) as client:
            return await client.upsert("sites", sites(4))

    results = run(go())
    assert results.column("reason_code").to_pylist() == ["http_503"] * 4
    assert results.column("retryable").to_pylist() == [True] * 4
    assert results.column("_bk").to_pylist() == ["S0", "S1", "S2", "S3"]


def test_batches_larger_than_the_server_limit_are_split(hub: Hub) -> None:
    small = create_app(clients={"syncflow": SECRET}, max_batch_rows=64)
    with start_server(small) as server:
        (results,) = run(
            deliver(Hub(server, small.state.faults, small), ("sites", sites(300)), batch_size=300)
        )
    assert_all_accepted(results, 300)


def test_attributes_are_sent_canonically(hub: Hub) -> None:
    table = pa.table(
        {
            "_bk": ["S1"],
            "amount": pa.array([Decimal("-0.50")], pa.decimal128(10, 2)),
            "at": pa.array([datetime(2025, 3, 1, 8, 0, 1, 5, tzinfo=UTC)], pa.timestamp("us", tz="UTC")),
            "on": pa.array([datetime(2025, 3, 1).date()], pa.date32()),
            "note": [None],
            "_data_hash": pa.array([b"x" * 32], pa.binary(32)),
        }
    )
    run(deliver(hub, ("sites", table)))
    record = hub.app.state.store.get("sites", "S1")
    assert record is not None
    assert record.attributes == {
        "amount": "-0.50",
        "at": "2025-03-01T08:00:01.000005Z",
        "on": "2025-03-01",
        "note": None,
    }


# Microseconds since the epoch of edge instants: year 1, years below 1000, 9999, and
# beyond (Arrow allows years 0, negative and five-digit ones), around the epoch.
EDGE_MICROS = [
    -62135596800 * 10**6,  # 0001-01-01T00:00:00
    -62135596800 * 10**6 - 1,  # 0000-12-31T23:59:59.999999
    -2 * 62135596800 * 10**6,  # a negative year
    -30610310400 * 10**6 + 123456,  # 0999-12-31 + microseconds
    253402300799 * 10**6 + 999999,  # 9999-12-31T23:59:59.999999
    253402300800 * 10**6 + 10,  # 10000-01-01
    -1,
    0,
    1,
    1764419696 * 10**6 + 5,
]


def _strftime_wire(column: pa.Array) -> pa.Array:
    """The wire text as the client used to build it (the reference)."""
    value = column if column.type.tz is not None else pc.assume_timezone(column, "UTC")
    return pc.strftime(value.cast(pa.timestamp("us", tz="UTC")), format="%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize("tz", [None, "UTC", "Europe/Berlin", "America/St_Johns", "+05:45"])
def test_wire_timestamps_equal_strftime(tz: str | None) -> None:
    rng = np.random.default_rng(11)
    spread = rng.integers(-(2**60), 2**60, 5000, dtype=np.int64) // 16  # years about -2600..5600
    micros = pa.array([*EDGE_MICROS, None, *spread.tolist(), None], pa.int64())
    column = micros.cast(pa.timestamp("us", tz=tz))
    expected = _strftime_wire(column)
    assert wire_timestamp_text(column).equals(expected)
    assert wire_timestamp_text(column).null_count == 2
    assert wire_timestamp_text(pa.chunked_array([column.slice(0, 7), column.slice(7)])).equals(
        pa.chunked_array([expected.slice(0, 7), expected.slice(7)])
    )
    for unit in ("s", "ms"):
        coarse = pc.divide(micros, 10**6 if unit == "s" else 10**3).cast(pa.timestamp(unit, tz=tz))
        assert wire_timestamp_text(coarse).equals(_strftime_wire(coarse))
    assert wire_timestamp_text(column.slice(0, 0)).to_pylist() == []


def test_wire_timestamp_examples() -> None:
    column = pa.array(EDGE_MICROS[:6], pa.int64()).cast(pa.timestamp("us", tz="Europe/Berlin"))
    assert wire_timestamp_text(column).to_pylist() == [
        "0001-01-01T00:00:00.000000Z",
        "0000-12-31T23:59:59.999999Z",
        "-1968-01-02T00:00:00.000000Z",
        "0999-12-31T00:00:00.123456Z",
        "9999-12-31T23:59:59.999999Z",
        "10000-01-01T00:00:00.000010Z",
    ]


def test_delete_read_counts_and_health(hub: Hub) -> None:
    run(deliver(hub, ("sites", sites(3))))

    async def go() -> tuple[pa.Table, dict[str, int], float]:
        async with hub.client() as client:
            deleted = await client.delete("sites", pa.array(["S0", "S9"]))
            return deleted, await client.counts(), await client.health()

    deleted, counts, latency = run(go())
    assert deleted.column("outcome").to_pylist() == ["deleted", "not_found"]
    assert counts == {"sites": 2}
    assert latency > 0


def test_secrets_never_reach_logs_or_errors(hub: Hub, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    hub.faults.configure(FaultConfig(server_error_probability=1.0))
    http = HttpSettings(max_attempts=2, backoff_base_s=0.01)

    async def go() -> tuple[pa.Table, str]:
        client = hub.client(http=http)
        async with client:
            results = await client.upsert("sites", sites(2))
            return results, repr(client) + repr(client.settings)

    results, reprs = run(go())
    wrong = ScheduleHubSettings(
        base_url=hub.server.url, client_id="syncflow", client_secret=SecretStr("bad-Q7")
    )

    async def refused() -> pa.Table:
        async with ScheduleHubClient(wrong, http) as client:
            return await client.upsert("sites", sites(1))

    refused_results = run(refused())
    assert refused_results.column("reason_code").to_pylist() == ["auth_failed"]
    texts = [
        caplog.text,
        reprs,
        *results.column("detail").to_pylist(),
        *refused_results.column("detail").to_pylist(),
    ]
    for text in texts:
        assert SECRET not in text
        assert "bad-Q7" not in text
        assert "eyJ" not in text  # no JWT


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHEDULEHUB_BASE_URL", "http://hub.example:9000")
    monkeypatch.setenv("SCHEDULEHUB_CLIENT_ID", "me")
    monkeypatch.setenv("SCHEDULEHUB_CLIENT_SECRET", "env-secret")
    monkeypatch.setenv("SYNCFLOW_DELIVERY_BATCH_SIZE", "1234")
    settings = ScheduleHubSettings()
    assert settings.delivery_batch_size == 1234
    assert settings.credentials().token_url == "http://hub.example:9000/oauth/token"
    assert settings.client_secret.get_secret_value() == "env-secret"
    assert "env-secret" not in repr(settings)
