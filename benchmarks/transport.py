"""Transport benchmark: fetch N rows from the APISmith stand-in, deliver N to the ScheduleHub stand-in.

`python -m benchmarks transport --rows 1000000 --json PATH`

- fetch: `syncflow simulate apismith --rows N` runs in a SUBPROCESS (its own
  GIL) on a free loopback port; `ApiSmithClient.iter_changes` reads every
  work order (the entity `rows` sizes) page by page over the Arrow fast path.
  The clock runs from the first request to the last page; generating the
  dataset at server start is not timed.
- deliver: `syncflow simulate schedulehub` runs in a SUBPROCESS too; N item
  records (a text key, an integer, a decimal, a timestamp, a text and a
  reference to one of 100 sites, built with Arrow before the clock starts) are
  upserted through `ScheduleHubClient.upsert` in batches of
  SYNCFLOW_DELIVERY_BATCH_SIZE, and the counts are read back. With
  `--in-process-delivery` the ScheduleHub half is
  `benchmarks.transport_delivery.bench_delivery(N)` instead, whose server
  shares this process's GIL.

Prints a table and writes JSON with `rows_per_s` per direction and
`peak_rss_mb` (this process; the APISmith server's own peak is reported as
`apismith_server_peak_rss_mb`). Targets: fetch >= 100K rows/s, deliver >= 50K rows/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import SecretStr

from syncflow_dagster.clients.apismith import ApiSmithClient, ApiSmithSettings
from syncflow_dagster.clients.http import HttpSettings
from syncflow_dagster.clients.schedulehub import ScheduleHubClient, ScheduleHubSettings
from syncflow_dagster.simulators.datagen import key_codes

FETCH_TARGET = 100_000
DELIVER_TARGET = 50_000
STARTUP_TIMEOUT_S = 600.0
SOURCE = "ProductionOrders"
SITES = 100


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_healthy(
    url: str, process: subprocess.Popen[bytes], timeout_s: float, path: str = "/health"
) -> None:
    """Poll until the server answers (a 401 also proves it is serving), bounded in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"stand-in at {url} exited with code {process.returncode} during startup")
        try:
            if httpx.get(f"{url}{path}", timeout=2.0).status_code in (200, 401):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"stand-in at {url} not serving within {timeout_s}s")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


def peak_rss_mb_of(pid: int) -> float | None:
    """VmHWM of another process (Linux), in MB; None where /proc is not available."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def start_stand_in(
    system: str, client_id: str, secret: str, *args: str
) -> tuple[subprocess.Popen[bytes], str]:
    """`syncflow simulate <system> --port P ...` in a subprocess; returns it and its base URL."""
    port = free_port()
    prefix = system.upper()
    env = {**os.environ, f"{prefix}_CLIENT_ID": client_id, f"{prefix}_CLIENT_SECRET": secret}
    command = [
        sys.executable,
        "-m",
        "syncflow_dagster.cli.main",
        "simulate",
        system,
        "--port",
        str(port),
        *args,
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, f"http://127.0.0.1:{port}"


async def bench_fetch(rows: int, seed: int = 1, page_size: int = 50_000) -> dict[str, Any]:
    """Read every work order from a fresh APISmith stand-in subprocess; figures in a dict."""
    secret = secrets.token_urlsafe(16)
    process, url = start_stand_in("apismith", "bench", secret, "--rows", str(rows), "--seed", str(seed))
    try:
        wait_until_healthy(url, process, STARTUP_TIMEOUT_S)
        settings = ApiSmithSettings(
            base_url=url, client_id="bench", client_secret=SecretStr(secret), page_size=page_size
        )
        async with ApiSmithClient(settings, HttpSettings()) as api:
            expected = (await api.watermark(SOURCE)).row_count
            fetched = 0
            pages = 0
            started = time.perf_counter()
            async for table in api.iter_changes(SOURCE):
                fetched += table.num_rows
                pages += 1
            seconds = time.perf_counter() - started
        server_rss = peak_rss_mb_of(process.pid)
    finally:
        stop(process)
    if fetched != expected:
        raise RuntimeError(f"fetch incomplete: {fetched} of {expected} rows")
    return {
        "direction": "fetch",
        "rows": fetched,
        "pages": pages,
        "page_size": page_size,
        "seconds": round(seconds, 3),
        "rows_per_s": round(fetched / seconds) if seconds else None,
        "apismith_server_peak_rss_mb": server_rss,
    }


def delivery_frames(rows: int) -> tuple[pa.Table, pa.Table]:
    """Sites and `rows` items as SyncFlow frames (`_bk`, attributes, `_ref.sites`), built columnar."""
    numbers = np.arange(rows, dtype=np.int64)
    site_numbers = pa.array(numbers % SITES)
    text: Any = pc.cast(pa.array(numbers), pa.string())
    items = pa.table(
        {
            "_bk": key_codes("ITM-", numbers, 7),
            "quantity": pa.array(numbers),
            "unit_price": pa.array(np.full(rows, 12, dtype=np.int32)).cast(pa.decimal128(12, 2)),
            "changed": pa.array(np.full(rows, 1_735_689_600_000_000, dtype=np.int64)).cast(
                pa.timestamp("us", tz="UTC")
            ),
            "description": pc.binary_join_element_wise(pa.scalar("item number "), text, ""),
            "_ref.sites": key_codes("S", site_numbers.to_numpy(), 3),
        }
    )
    sites = pa.table(
        {
            "_bk": key_codes("S", np.arange(SITES), 3),
            "name": [f"site {i}" for i in range(SITES)],
        }
    )
    return sites, items


async def bench_deliver(rows: int) -> dict[str, Any]:
    """Upsert `rows` items into a fresh ScheduleHub stand-in subprocess; figures in a dict."""
    secret = secrets.token_urlsafe(16)
    sites, items = delivery_frames(rows)
    process, url = start_stand_in("schedulehub", "bench", secret)
    try:
        wait_until_healthy(url, process, STARTUP_TIMEOUT_S, path="/v1/resources")
        settings = ScheduleHubSettings(base_url=url, client_id="bench", client_secret=SecretStr(secret))
        async with ScheduleHubClient(settings, HttpSettings()) as hub:
            await hub.upsert("sites", sites)
            started = time.perf_counter()
            results = await hub.upsert("items", items)
            seconds = time.perf_counter() - started
            counts = await hub.counts()
        server_rss = peak_rss_mb_of(process.pid)
    finally:
        stop(process)
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
        "schedulehub_server_peak_rss_mb": server_rss,
    }


def run(rows: int, page_size: int, in_process_delivery: bool = False) -> dict[str, Any]:
    fetch = asyncio.run(bench_fetch(rows, page_size=page_size))
    if in_process_delivery:
        from benchmarks.transport_delivery import bench_delivery

        deliver = asyncio.run(bench_delivery(rows))
    else:
        deliver = asyncio.run(bench_deliver(rows))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    return {
        "benchmark": "transport",
        "rows": rows,
        "fetch": fetch,
        "deliver": deliver,
        "rows_per_s": {"fetch": fetch["rows_per_s"], "deliver": deliver["rows_per_s"]},
        "targets": {"fetch": FETCH_TARGET, "deliver": DELIVER_TARGET},
        "peak_rss_mb": round(peak, 1),
        "cpu_count": os.cpu_count(),
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"{'direction':<10}{'rows':>12}{'seconds':>10}{'rows/s':>12}{'target':>10}  ok")
    for direction in ("fetch", "deliver"):
        figures = result[direction]
        target = result["targets"][direction]
        ok = "yes" if (figures["rows_per_s"] or 0) >= target else "NO"
        print(
            f"{direction:<10}{figures['rows']:>12,}{figures['seconds']:>10.2f}"
            f"{figures['rows_per_s']:>12,}{target:>10,}  {ok}"
        )
    print(
        f"peak RSS: benchmark process {result['peak_rss_mb']} MB, "
        f"APISmith server {result['fetch']['apismith_server_peak_rss_mb']} MB, "
        f"ScheduleHub server {result['deliver'].get('schedulehub_server_peak_rss_mb')} MB"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks transport", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per direction")
    parser.add_argument("--page-size", type=int, default=50_000, help="APISmith page size (max 50000)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    parser.add_argument(
        "--in-process-delivery",
        action="store_true",
        help="deliver through benchmarks.transport_delivery (ScheduleHub in this process)",
    )
    args = parser.parse_args(argv)
    result = run(args.rows, args.page_size, args.in_process_delivery)
    print_table(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
