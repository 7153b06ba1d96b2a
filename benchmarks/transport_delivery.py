"""Transport benchmark, delivery half: how fast the ScheduleHub stand-in accepts rows through the client.

`bench_delivery(rows)` starts the ScheduleHub stand-in on a free loopback port,
delivers `rows` item records (with a reference to one of 100 sites, a decimal,
a timestamp, an integer and a text attribute, like a real SyncFlow frame) in
batches of SYNCFLOW_DELIVERY_BATCH_SIZE through `ScheduleHubClient.upsert`,
reads the counts back to check every row landed once, and returns the figures.
Called by `benchmarks/transport.py` (the fetch half); runnable alone:
`python -m benchmarks.transport_delivery --rows 1000000`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from decimal import Decimal
from typing import Any

import pyarrow as pa
from pydantic import SecretStr

from syncflow_dagster.clients.http import HttpSettings
from syncflow_dagster.clients.schedulehub import ScheduleHubClient, ScheduleHubSettings
from syncflow_dagster.simulators.schedulehub import create_app
from syncflow_dagster.simulators.serve import start_server

SITES = 100


def _items(rows: int) -> pa.Table:
    # Built before the clock starts; plain Python is fine here.
    return pa.table(
        {
            "_bk": [f"ITM-{i}" for i in range(rows)],
            "quantity": pa.array(range(rows), pa.int64()),
            "unit_price": pa.array([Decimal("12.50")] * rows, pa.decimal128(12, 2)),
            "changed": pa.array([1_735_689_600_000_000] * rows, pa.int64()).cast(
                pa.timestamp("us", tz="UTC")
            ),
            "description": [f"item number {i}" for i in range(rows)],
            "_ref.sites": [f"S{i % SITES}" for i in range(rows)],
        }
    )


async def bench_delivery(rows: int) -> dict[str, Any]:
    """Deliver `rows` records to a fresh ScheduleHub stand-in; figures in a dict."""
    secret = secrets.token_urlsafe(16)
    app = create_app(clients={"bench": secret})
    items = _items(rows)
    sites = pa.table({"_bk": [f"S{i}" for i in range(SITES)], "name": [f"site {i}" for i in range(SITES)]})
    with start_server(app) as server:
        settings = ScheduleHubSettings(
            base_url=server.url, client_id="bench", client_secret=SecretStr(secret)
        )
        async with ScheduleHubClient(settings, HttpSettings()) as hub:
            await hub.upsert("sites", sites)
            started = time.perf_counter()
            results = await hub.upsert("items", items)
            seconds = time.perf_counter() - started
            counts = await hub.counts()
    accepted = results.column("status").to_pylist().count("accepted")
    if accepted != rows or counts.get("items") != rows:
        raise RuntimeError(f"delivery incomplete: {accepted} accepted, {counts.get('items')} held of {rows}")
    return {
        "direction": "deliver",
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds) if seconds else None,
        "batch_size": settings.delivery_batch_size,
        "accepted": accepted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(bench_delivery(args.rows))))


if __name__ == "__main__":
    main()
