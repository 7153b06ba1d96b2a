"""Run workers forked from a warm forkserver (deploy/warm_workers.py).

The daemon-path tests (service/, cli/, reliability/ with the `daemon` marker)
run every one of their runs through workers started this way; these tests pin
the mechanism itself against the pinned Dagster.
"""

from __future__ import annotations

import inspect
import os

import pytest
from dagster._grpc import server

from syncflow_dagster.deploy import warm_workers


def test_dagster_code_server_still_starts_run_workers_from_its_mp_ctx() -> None:
    """The attribute install() shadows is the one StartRun uses: an upgrade that renames it fails here."""
    assert "self._mp_ctx = multiprocessing.get_context" in inspect.getsource(server.DagsterApiServer.__init__)
    start_run = inspect.getsource(server.DagsterApiServer.StartRun)
    assert "self._mp_ctx.Process(" in start_run
    assert "start_run_in_subprocess" in start_run


def test_the_code_server_starts_workers_from_a_forkserver_preloading_the_code_location(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(warm_workers.START_ENV, "forkserver")
    assert warm_workers.install(os.environ) is True
    assert warm_workers.install(os.environ) is True  # idempotent
    # A server object (as the code server built it before importing the code location) sees the
    # warm context, whatever its constructor stored.
    api_server = object.__new__(server.DagsterApiServer)
    api_server._mp_ctx = "spawn context set by the constructor"  # the property's setter ignores it
    context = api_server._mp_ctx
    assert context.get_start_method() == "forkserver"
    from multiprocessing import forkserver

    assert forkserver._forkserver._preload_modules == list(warm_workers.PRELOAD)  # type: ignore[attr-defined]
    assert warm_workers.PRELOAD[-1] == "syncflow_dagster.definitions"


def test_spawn_keeps_dagsters_default_and_a_wrong_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(warm_workers.START_ENV, "spawn")
    assert warm_workers.worker_start(os.environ) is warm_workers.WorkerStart.SPAWN
    assert warm_workers.install(os.environ) is False
    monkeypatch.setenv(warm_workers.START_ENV, "fork")
    with pytest.raises(
        ValueError, match=r"SYNCFLOW_RUN_WORKER_START='fork' is not one of: forkserver, spawn"
    ):
        warm_workers.worker_start(os.environ)


def test_spawn_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(warm_workers.START_ENV, raising=False)
    assert warm_workers.worker_start(os.environ) is warm_workers.WorkerStart.SPAWN
