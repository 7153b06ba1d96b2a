"""`syncflow demo`: what it starts is stopped, the change set lands, the summary adds up, end to end."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from syncflow_dagster.cli.demo import (
    EntityOutcome,
    apply_change_set,
    outcome_of,
    run_demo,
    start_environment,
    summary_table,
)
from syncflow_dagster_tests import loopback_http


def test_everything_started_is_stopped_even_on_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # No database URL: the demo's own embedded Postgres is started and must be stopped too.
    monkeypatch.delenv("SYNCFLOW_DATABASE_URL", raising=False)
    seen: dict[str, object] = {}

    def start_then_fail() -> None:
        with ExitStack() as stack:
            env = start_environment(stack, rows=50, seed=1, keep=False)
            seen.update(urls=(env.apismith_url, env.schedulehub_url), workdir=env.workdir)
            assert loopback_http.get(f"{env.apismith_url}/health", timeout=10).status_code == 200
            assert (env.workdir / "pgdata").is_dir()
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        start_then_fail()
    urls, workdir = seen["urls"], seen["workdir"]
    assert isinstance(urls, tuple)
    assert isinstance(workdir, Path)
    for url in urls:
        with pytest.raises(httpx.ConnectError):
            loopback_http.get(f"{url}/health", timeout=5)
    assert not workdir.exists()


def test_change_set_lands_and_summary_adds_up(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCFLOW_DATABASE_URL", database_url)
    with ExitStack() as stack:
        env = start_environment(stack, rows=200, seed=2, keep=False)
        applied = apply_change_set(env.apismith_url, seed=2)
    assert applied["current_rowversion"] > 0
    assert sum(counts["updated"] for counts in applied["applied"].values()) > 0

    first = outcome_of(
        "items", {"fetched": 10, "insert": 7, "update": 2, "skip": 1, "seconds_total": 0.5}, 1.234
    )
    second = outcome_of("sites", {"fetched": 3, "insert": 3, "delivered": 3, "entity": "sites"}, 0.5)
    assert first.counts["insert"] == 7
    assert first.counts["skip"] == 1
    assert first.seconds == 1.23
    console = Console(width=200, record=True)
    console.print(summary_table("initial sync", [first, second]))
    text = console.export_text()
    total = next(line for line in text.splitlines() if "total" in line)
    cells = [cell.strip() for cell in total.split("│") if cell.strip()]
    assert cells[:4] == ["total", "13", "10", "2"]  # fetched, insert, update


@pytest.mark.slow
def test_demo_end_to_end_reports_both_phases(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCFLOW_DATABASE_URL", database_url)
    initial, incremental = run_demo(rows=200, seed=3, keep=False)
    assert [o.entity for o in initial][:3] == ["customers", "items", "sites"]
    assert sum(o.counts["fetched"] for o in initial) > 0
    assert sum(o.counts["insert"] for o in initial) > 0
    assert sum(o.counts["delivered"] for o in initial) > 0
    changed = sum(o.counts["update"] + o.counts["insert"] + o.counts["delete"] for o in incremental)
    assert changed > 0
    assert all(isinstance(o, EntityOutcome) for o in incremental)
