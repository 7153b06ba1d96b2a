"""Stand-ins at scale: APISmith serving an N-row history folder from disk, ScheduleHub holding N records.

`python -m benchmarks standins --rows 10000000 [--source-dir DIR] [--json PATH] [--doc docs/benchmarks.md]`

1. `source`: the history source (`syncflow simulate history-source`: N work
   orders over 365 days plus their parents) is written to a temporary folder,
   timed, unless --source-dir names one already written.
2. `apismith`: `syncflow simulate apismith --source-dir` in a SUBPROCESS
   (served from disk). Timed: start-up until /health answers, one day's
   window, the watermark (mean of 20 calls), the streamed keys listing, and
   every work order read page by page (Arrow, pages of 50 000, snapshot pinned).
3. `deliver`: `syncflow simulate schedulehub --data-dir D` in a SUBPROCESS.
   The sites, then every work order as fetched (key ProdOrderNo, the other
   source columns as text attributes, a reference to its site) go through
   `ScheduleHubClient.upsert` page by page, so this process holds one page.
4. `restart`: ScheduleHub stopped (SIGTERM) and started again on D; every
   record must be there (`GET /v1/resources`), then all N are read back
   page by page (Arrow, 10 000 a page) and one record is read by key.

Each stand-in's peak RSS (VmHWM) is read from /proc before it stops. Prints a
table and writes JSON (`phases`, `peaks_mb`, `targets`, `targets_met`); with
--doc, the table replaces the section between the `standins` markers of that
file, with the machine's load average beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
from pydantic import SecretStr

from benchmarks.transport import STARTUP_TIMEOUT_S, peak_rss_mb_of, start_stand_in, stop, wait_until_healthy
from syncflow_dagster.catalog import default_catalog
from syncflow_dagster.clients.apismith import ApiSmithClient, ApiSmithSettings
from syncflow_dagster.clients.http import HttpSettings
from syncflow_dagster.clients.schedulehub import ScheduleHubClient, ScheduleHubSettings
from syncflow_dagster.simulators.history_source import write_history_source

SOURCE = "ProductionOrders"
RESOURCE = "work_orders"
CLIENT_ID = "bench"
START = datetime(2025, 1, 1, tzinfo=UTC)
PAGE_SIZE = 50_000
READ_BACK_LIMIT = 10_000
TARGET_RSS_MB = 2048.0
BEGIN_MARK = "<!-- standins:begin -->"
END_MARK = "<!-- standins:end -->"


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} / {five:.1f}"


def _n(value: int) -> str:
    """A count with a thin space between thousands, as the docs write them."""
    return f"{value:,}".replace(",", " ")


def _rate(rows: int, seconds: float) -> int | None:
    return round(rows / seconds) if seconds > 0 else None


def _wire(page: pa.Table) -> pa.Table:
    """A fetched page of work orders as SyncFlow frame rows: `_bk`, text attributes, `_ref.sites`."""
    columns: dict[str, Any] = {"_bk": page.column("ProdOrderNo")}
    for name in page.column_names:
        if name not in ("ProdOrderNo", "RowVersion", "ModifiedAt", "Site"):
            columns[name] = page.column(name)
    columns["_ref.sites"] = page.column("Site")
    return pa.table(columns)


async def _apismith_phase(url: str, secret: str, figures: dict[str, Any]) -> None:
    settings = ApiSmithSettings(
        base_url=url, client_id=CLIENT_ID, client_secret=SecretStr(secret), page_size=PAGE_SIZE
    )
    async with ApiSmithClient(settings, HttpSettings()) as api:
        started = time.perf_counter()
        for _ in range(20):
            mark = await api.watermark(SOURCE)
        figures["watermark_ms"] = round((time.perf_counter() - started) / 20 * 1000, 2)
        figures["rows"] = mark.row_count
        day = START + timedelta(days=180)
        started = time.perf_counter()
        day_rows = 0
        async for table in api.iter_changes(SOURCE, changed_from=day, changed_to=day + timedelta(days=1)):
            day_rows += table.num_rows
        figures["day_window_rows"] = day_rows
        figures["day_window_seconds"] = round(time.perf_counter() - started, 3)
        started = time.perf_counter()
        keys = 0
        async for table in api.iter_keys(SOURCE):
            keys += table.num_rows
        figures["keys"] = keys
        figures["keys_seconds"] = round(time.perf_counter() - started, 3)
        figures["keys_rows_per_s"] = _rate(keys, time.perf_counter() - started)


async def _fetch_and_deliver(
    api_url: str, hub_url: str, secret: str, figures: dict[str, Any], delivery: dict[str, Any]
) -> None:
    api_settings = ApiSmithSettings(
        base_url=api_url, client_id=CLIENT_ID, client_secret=SecretStr(secret), page_size=PAGE_SIZE
    )
    hub_settings = ScheduleHubSettings(base_url=hub_url, client_id=CLIENT_ID, client_secret=SecretStr(secret))
    fetch_seconds = deliver_seconds = 0.0
    fetched = accepted = 0
    async with (
        ApiSmithClient(api_settings, HttpSettings()) as api,
        ScheduleHubClient(hub_settings, HttpSettings()) as hub,
    ):
        sites = pa.table(
            {"_bk": [], "name": []}, schema=pa.schema([("_bk", pa.string()), ("name", pa.string())])
        )
        async for table in api.iter_changes("Sites"):
            sites = pa.table({"_bk": table.column("SiteCode"), "name": table.column("SiteName")})
        await hub.upsert("sites", sites)
        pages = api.iter_changes(SOURCE).__aiter__()
        while True:
            started = time.perf_counter()
            try:
                page = await pages.__anext__()
            except StopAsyncIteration:
                fetch_seconds += time.perf_counter() - started
                break
            fetch_seconds += time.perf_counter() - started
            fetched += page.num_rows
            started = time.perf_counter()
            results = await hub.upsert(RESOURCE, _wire(page))
            deliver_seconds += time.perf_counter() - started
            accepted += results.column("status").to_pylist().count("accepted")
        counts = await hub.counts()
    figures["full_read_rows"] = fetched
    figures["full_read_seconds"] = round(fetch_seconds, 3)
    figures["full_read_rows_per_s"] = _rate(fetched, fetch_seconds)
    delivery["rows"] = fetched
    delivery["accepted"] = accepted
    delivery["seconds"] = round(deliver_seconds, 3)
    delivery["rows_per_s"] = _rate(accepted, deliver_seconds)
    delivery["held"] = counts.get(RESOURCE)


async def _read_back(url: str, secret: str, figures: dict[str, Any], expected: int) -> None:
    settings = ScheduleHubSettings(base_url=url, client_id=CLIENT_ID, client_secret=SecretStr(secret))
    async with ScheduleHubClient(settings, HttpSettings()) as hub:
        counts = await hub.counts()
        figures["held_after_restart"] = counts.get(RESOURCE)
        if counts.get(RESOURCE) != expected:
            raise RuntimeError(
                f"after the restart ScheduleHub holds {counts.get(RESOURCE)} of {expected} work orders"
            )
    headers = {"Accept": "application/vnd.apache.arrow.stream"}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        token = (
            await client.post(
                "/oauth/token",
                data={"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": secret},
            )
        ).json()["access_token"]
        headers["Authorization"] = f"Bearer {token}"
        started = time.perf_counter()
        rows = 0
        cursor: str | None = None
        first_key = None
        for _ in range(expected // READ_BACK_LIMIT + 10):  # bounded
            params: dict[str, Any] = {"limit": READ_BACK_LIMIT, **({"cursor": cursor} if cursor else {})}
            response = await client.get(f"/v1/resources/{RESOURCE}/records", params=params, headers=headers)
            response.raise_for_status()
            page = pa.ipc.open_stream(response.content).read_all()
            rows += page.num_rows
            if first_key is None and page.num_rows:
                first_key = page.column("external_key")[0].as_py()
            cursor = response.headers.get("x-next-cursor")
            if not cursor:
                break
        seconds = time.perf_counter() - started
        figures["read_back_rows"] = rows
        figures["read_back_seconds"] = round(seconds, 3)
        figures["read_back_rows_per_s"] = _rate(rows, seconds)
        started = time.perf_counter()
        one = await client.get(
            f"/v1/resources/{RESOURCE}/records/{first_key}",
            headers={"Authorization": headers["Authorization"]},
        )
        figures["one_record_ms"] = round((time.perf_counter() - started) * 1000, 2)
        if one.status_code != 200 or rows != expected:
            raise RuntimeError(
                f"read-back gave {rows} of {expected} records (one record: HTTP {one.status_code})"
            )


def run(rows: int, source_dir: Path | None, workdir: Path) -> dict[str, Any]:
    secret = secrets.token_urlsafe(16)
    phases: dict[str, dict[str, Any]] = {}
    folder = source_dir
    if folder is None:
        folder = workdir / "source"
        started = time.perf_counter()
        write_history_source(default_catalog(), folder, rows=rows, start=START.date())
        seconds = time.perf_counter() - started
        phases["source"] = {
            "rows": rows,
            "seconds": round(seconds, 3),
            "rows_per_s": _rate(rows, seconds),
            "load": _load(),
        }
    data_dir = workdir / "schedulehub"
    started = time.perf_counter()
    api, api_url = start_stand_in("apismith", CLIENT_ID, secret, "--source-dir", str(folder))
    hub, hub_url = start_stand_in("schedulehub", CLIENT_ID, secret, "--data-dir", str(data_dir))
    peaks: dict[str, float | None] = {}
    try:
        wait_until_healthy(api_url, api, STARTUP_TIMEOUT_S)
        apismith: dict[str, Any] = {"startup_seconds": round(time.perf_counter() - started, 3)}
        wait_until_healthy(hub_url, hub, STARTUP_TIMEOUT_S, path="/v1/resources")
        asyncio.run(_apismith_phase(api_url, secret, apismith))
        delivery: dict[str, Any] = {}
        asyncio.run(_fetch_and_deliver(api_url, hub_url, secret, apismith, delivery))
        apismith["load"] = delivery["load"] = _load()
        phases["apismith"] = apismith
        phases["deliver"] = delivery
        peaks["apismith_peak_rss_mb"] = peak_rss_mb_of(api.pid)
        peaks["schedulehub_peak_rss_mb"] = peak_rss_mb_of(hub.pid)
    finally:
        stop(api)
        stop(hub)
    expected = int(phases["deliver"]["accepted"])
    started = time.perf_counter()
    hub, hub_url = start_stand_in("schedulehub", CLIENT_ID, secret, "--data-dir", str(data_dir))
    try:
        wait_until_healthy(hub_url, hub, STARTUP_TIMEOUT_S, path="/v1/resources")
        restart: dict[str, Any] = {"startup_seconds": round(time.perf_counter() - started, 3)}
        asyncio.run(_read_back(hub_url, secret, restart, expected))
        restart["load"] = _load()
        restart["disk_mb"] = round(sum(p.stat().st_size for p in data_dir.iterdir()) / 2**20, 1)
        phases["restart"] = restart
        peaks["schedulehub_restarted_peak_rss_mb"] = peak_rss_mb_of(hub.pid)
    finally:
        stop(hub)
    targets = {"stand_in_peak_rss_mb": TARGET_RSS_MB}
    worst = max((v for v in peaks.values() if v is not None), default=None)
    return {
        "rows": rows,
        "phases": phases,
        "peaks_mb": peaks,
        "targets": targets,
        "targets_met": {"stand_in_peak_rss_mb": worst is not None and worst <= TARGET_RSS_MB},
    }


def table(figures: dict[str, Any]) -> str:
    phases = figures["phases"]
    peaks = figures["peaks_mb"]
    api = phases["apismith"]
    deliver = phases["deliver"]
    restart = phases["restart"]
    lines = [
        f"| {figures['rows']:,} work orders | figure | load (1 / 5 min) |".replace(",", " "),
        "|---|---:|---|",
    ]
    if "source" in phases:
        lines.append(
            f"| history source written (`write_history_source`) | {phases['source']['seconds']} s "
            f"({phases['source']['rows_per_s']:,} rows/s) | {phases['source']['load']} |".replace(",", " ")
        )
    rows = [
        (
            "APISmith start-up on the folder (process start, metadata only)",
            f"{api['startup_seconds']} s",
            api,
        ),
        ("APISmith watermark, mean of 20", f"{api['watermark_ms']} ms", api),
        (
            f"APISmith one day's window ({_n(api['day_window_rows'])} rows)",
            f"{api['day_window_seconds']} s",
            api,
        ),
        (f"APISmith keys listing ({_n(api['keys'])} keys, streamed)", f"{api['keys_seconds']} s", api),
        ("APISmith every work order, pages of 50 000", f"{api['full_read_rows_per_s']:,} rows/s", api),
        ("**APISmith peak RSS**", f"**{peaks['apismith_peak_rss_mb']} MB**", api),
        ("ScheduleHub delivery (Arrow batches of 5 000)", f"{deliver['rows_per_s']:,} rows/s", deliver),
        ("**ScheduleHub peak RSS while receiving**", f"**{peaks['schedulehub_peak_rss_mb']} MB**", deliver),
        (
            f"ScheduleHub restarted on its --data-dir ({restart['disk_mb']} MB on disk): records it holds",
            f"{restart['held_after_restart']:,} of {deliver['accepted']:,} (up in {restart['startup_seconds']} s)",
            restart,
        ),
        (
            "ScheduleHub read-back of every record, pages of 10 000",
            f"{restart['read_back_rows_per_s']:,} rows/s",
            restart,
        ),
        ("ScheduleHub one record by key", f"{restart['one_record_ms']} ms", restart),
        (
            "**ScheduleHub peak RSS after the restart (read-back)**",
            f"**{peaks['schedulehub_restarted_peak_rss_mb']} MB**",
            restart,
        ),
    ]
    for label, value, phase in rows:
        lines.append(f"| {label} | {value.replace(',', ' ')} | {phase['load']} |")
    return "\n".join(lines)


def write_doc(path: Path, text: str) -> None:
    content = path.read_text(encoding="utf-8")
    if BEGIN_MARK not in content or END_MARK not in content:
        raise SystemExit(f"{path} has no {BEGIN_MARK} ... {END_MARK} section to replace")
    head, rest = content.split(BEGIN_MARK, 1)
    _, tail = rest.split(END_MARK, 1)
    path.write_text(f"{head}{BEGIN_MARK}\n{text}\n{END_MARK}{tail}", encoding="utf-8")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks standins", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="work orders in the history source")
    parser.add_argument("--source-dir", type=Path, default=None, help="a history source already written")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    parser.add_argument(
        "--doc", type=Path, default=None, help="replace the standins section of this Markdown file"
    )
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="syncflow-standins-"))
    try:
        figures = run(args.rows, args.source_dir, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = table(figures)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    if args.doc is not None:
        write_doc(args.doc, text)
    return 0 if all(figures["targets_met"].values()) else 1
