"""Transport benchmark: fetch N rows from the APISmith stand-in, deliver N to the ScheduleHub stand-in.

`python -m benchmarks transport --rows 1000000 --json PATH`

- fetch: `syncflow simulate apismith --rows N` runs in a SUBPROCESS (its own
  GIL) on a free loopback port; `ApiSmithClient.iter_changes` reads every
  work order (the entity `rows` sizes) page by page over the Arrow fast path.
  The clock runs from the first request to the last page; generating the
  dataset at server start is not timed.
- deliver: `benchmarks.transport_delivery.bench_delivery(N)` (the ScheduleHub
  half) upserts N records in batches and reads the counts back.

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
from pydantic import SecretStr

from syncflow_dagster.clients.apismith import ApiSmithClient, ApiSmithSettings
from syncflow_dagster.clients.http import HttpSettings

FETCH_TARGET = 100_000
DELIVER_TARGET = 50_000
STARTUP_TIMEOUT_S = 600.0
SOURCE = "ProductionOrders"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"APISmith stand-in exited with code {process.returncode} during startup")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"APISmith stand-in at {url} not healthy within {timeout_s}s")


def peak_rss_mb_of(pid: int) -> float | None:
    """VmHWM of another process (Linux), in MB; None where /proc is not available."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def start_apismith(rows: int, seed: int, client_id: str, secret: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "APISMITH_CLIENT_ID": client_id, "APISMITH_CLIENT_SECRET": secret}
    command = [
        sys.executable,
        "-m",
        "syncflow_dagster.cli.main",
        "simulate",
        "apismith",
        "--port",
        str(port),
        "--rows",
        str(rows),
        "--seed",
        str(seed),
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, f"http://127.0.0.1:{port}"


async def bench_fetch(rows: int, seed: int = 1, page_size: int = 50_000) -> dict[str, Any]:
    """Read every work order from a fresh APISmith stand-in subprocess; figures in a dict."""
    secret = secrets.token_urlsafe(16)
    process, url = start_apismith(rows, seed, "bench", secret)
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
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
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


def run(rows: int, page_size: int) -> dict[str, Any]:
    from benchmarks.transport_delivery import bench_delivery

    fetch = asyncio.run(bench_fetch(rows, page_size=page_size))
    deliver = asyncio.run(bench_delivery(rows))
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
        f"peak RSS (benchmark process): {result['peak_rss_mb']} MB; "
        f"APISmith server: {result['fetch']['apismith_server_peak_rss_mb']} MB"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks transport", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per direction")
    parser.add_argument("--page-size", type=int, default=50_000, help="APISmith page size (max 50000)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    args = parser.parse_args(argv)
    result = run(args.rows, args.page_size)
    print_table(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
