"""Shared fixtures: a real Postgres for every test that needs one.

`SYNCFLOW_TEST_DATABASE_URL` points at a server when one is available (CI sets
it to the machine's 127.0.0.1:5432); otherwise an embedded Postgres is started
from the pgserver wheel for the session. Each test session works in a database
of its own, created here and dropped at the end, so parallel sessions on one
server never see each other's rows. Under pytest-xdist every worker is a
session of its own: it gets its own database on the configured server, or its
own embedded server (a Unix socket in its own data directory, no TCP port), and
database names carry the worker's name (`isolation.py`).

Tests that stop, restart or cut the connections of their Postgres use
`dedicated_postgres_server` (or `dedicated_postgres`, its database URL): an
embedded server of the test's own, never the shared one.
"""

from __future__ import annotations

import gc
import inspect
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from _pytest.mark import MarkMatcher
from _pytest.mark.expression import Expression
from schemathesis.pytest.plugin import SchemathesisCase

from syncflow_dagster.store.database import libpq_url
from syncflow_dagster.store.embedded import EmbeddedPostgres, start_embedded_postgres
from syncflow_dagster_tests.isolation import (
    DatabaseDropper,
    scratch_database,
    scratch_database_dropped_later,
    scratch_name,
    with_database,
    worker_id,
)

TEST_DATABASE_ENV = "SYNCFLOW_TEST_DATABASE_URL"

__all__ = ["TEST_DATABASE_ENV", "DedicatedPostgres", "scratch_database"]


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A libpq URL to a running Postgres server (shared or embedded)."""
    configured = os.environ.get(TEST_DATABASE_ENV)
    if configured:
        yield libpq_url(configured)
        return
    # Not under pytest's tmp_path: its 0700 parents are not traversable by the
    # unprivileged user pgserver runs postgres as when the tests run as root.
    data_dir = Path(tempfile.mkdtemp(prefix=f"syncflow-test-pg-{worker_id()}-"))
    server = start_embedded_postgres(data_dir / "data", keep_data=False)
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url(pg_server_url: str) -> Iterator[str]:
    """A fresh database for this test session, dropped afterwards."""
    with scratch_database(pg_server_url) as url:
        yield url


@pytest.fixture(scope="session")
def database_dropper(pg_server_url: str) -> Iterator[DatabaseDropper]:
    """Drops the tests' own databases in the background; all are gone before the server stops."""
    dropper = DatabaseDropper()
    try:
        yield dropper
    finally:
        dropper.close()


@pytest.fixture
def fresh_database_url(pg_server_url: str, database_dropper: DatabaseDropper) -> Iterator[str]:
    """A database of this test's own, for tests whose state must start empty (a new deployment).

    Dropped after the test, on the dropper's thread: the test does not wait for Postgres's checkpoint.
    """
    with scratch_database_dropped_later(pg_server_url, database_dropper) as url:
        yield url


@dataclass(frozen=True)
class DedicatedPostgres:
    """An embedded server of one test's own and the URL of the database created on it."""

    server: EmbeddedPostgres
    url: str

    def url_of(self, dbname: str) -> str:
        return with_database(self.url, dbname)


@contextmanager
def _dedicated_server() -> Iterator[EmbeddedPostgres]:
    data_dir = Path(tempfile.mkdtemp(prefix=f"syncflow-fault-pg-{worker_id()}-"))
    server = start_embedded_postgres(data_dir / "data", keep_data=False)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def dedicated_postgres_server() -> Iterator[DedicatedPostgres]:
    """A Postgres of this test's own (never the shared server): the test cuts, stops or restarts it."""
    with _dedicated_server() as server:
        # Not dropped afterwards: the whole server goes, whatever state the test left it in.
        name = scratch_name("syncflow_fault")
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        yield DedicatedPostgres(server, with_database(server.url, name))


@pytest.fixture(scope="module")
def module_postgres_server() -> Iterator[EmbeddedPostgres]:
    """A Postgres of this module's own, for tests that restart it one after another.

    Each test makes a database of its own on it (`scratch_database`); starting a
    server costs seconds, so the tests of a module share one. Keep such a
    module's tests on one worker (an xdist_group), or each worker starts its own.
    """
    with _dedicated_server() as server:
        yield server


@pytest.fixture
def dedicated_postgres(dedicated_postgres_server: DedicatedPostgres) -> str:
    """The URL of a database on a Postgres of this test's own."""
    return dedicated_postgres_server.url


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoffs in milliseconds: the fault and soak tests check outcomes, not waiting."""
    monkeypatch.setenv("SYNCFLOW_STORE_RETRY_BASE_SECONDS", "0.01")
    monkeypatch.setenv("SYNCFLOW_STORE_RETRY_JITTER", "0")
    monkeypatch.setenv("SYNCFLOW_HTTP_BACKOFF_BASE_S", "0.01")
    monkeypatch.setenv("SYNCFLOW_HTTP_BACKOFF_MAX_S", "0.1")
    monkeypatch.setenv("SYNCFLOW_HTTP_MAX_RETRY_SECONDS", "20")


TESTS = Path(__file__).parent

# Module fixtures that start Dagster's own processes (a webserver, a daemon) for every test of
# their module, and what they start. The tests of one module that use one share an xdist group
# (xdist_group_of): with `--dist loadgroup` they run on one worker, so the module's deployment is
# started once. Their tests are marked `daemon` (make test-fast leaves them out) without each test
# saying so.
DAGSTER_PROCESS_FIXTURES = {
    "stack": "service-stack",  # service/, cli/test_cli_sync*.py, reliability/test_reliability_run_monitoring.py
    "webserver": "ui-webserver",  # ui/test_ui.py
    "sync_deployment": "backfill-deployment",  # ui/test_graphql_backfill.py
}


def xdist_group_of(fixture: str, module: Path) -> str:
    """The xdist group of the tests in the file `module` that use `fixture`, e.g.
    `service-stack:cli/test_cli_sync`.

    One group per module, not per fixture name: five modules have a `stack` fixture of their
    own, each a deployment of its own, and one group for all of them ran the five one after
    another on one worker, the longest chain of the suite, while the other workers had finished.
    """
    return f"{DAGSTER_PROCESS_FIXTURES[fixture]}:{module.relative_to(TESTS).with_suffix('').as_posix()}"


def _lane_markers(collector: pytest.Collector, function: object) -> list[pytest.Mark]:
    """The markers a test function will carry once collected: its own, its module's and class's, and
    `daemon` when it uses a DAGSTER_PROCESS_FIXTURES fixture (pytest_itemcollected adds that one)."""
    marks = [*collector.iter_markers(), *getattr(function, "pytestmark", [])]
    parameters = inspect.signature(function).parameters if callable(function) else {}
    if any(fixture in parameters for fixture in DAGSTER_PROCESS_FIXTURES):
        marks.append(pytest.mark.daemon.mark)
    return marks


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> Iterator[None]:
    """A schemathesis test that `-m` deselects is not expanded into its cases.

    Schemathesis builds a test's cases while the test is collected (its coverage phase walks
    every operation's schema), before `-m` deselects anything: every xdist worker of
    `make test-fast` built the cases of the service stack's OpenAPI fuzz test (`daemon`), which
    the lane never runs. Such a test is left out at collection instead; without `-m`, or with
    one that selects it, nothing changes.
    """
    outcome = yield
    markexpr = collector.config.option.markexpr
    if not markexpr or not isinstance(outcome.get_result(), SchemathesisCase):
        return
    matcher = MarkMatcher.from_markers(_lane_markers(collector, obj))
    if not Expression.compile(markexpr).evaluate(matcher):
        outcome.force_result([])


def pytest_itemcollected(item: pytest.Item) -> None:
    """Mark each test as it is collected: before `-m` deselects and before xdist reads the groups.

    (In pytest_collection_modifyitems, even tryfirst, xdist's own hook ran first and never
    saw the groups.)
    """
    fixtures = set(getattr(item, "fixturenames", ()))
    for fixture in DAGSTER_PROCESS_FIXTURES:
        if fixture in fixtures:
            item.add_marker(pytest.mark.daemon)
            item.add_marker(pytest.mark.xdist_group(xdist_group_of(fixture, item.path)))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move what collection created out of the garbage collector's sight for the rest of the session.

    Collection imports Dagster, pandas, pyarrow and every test module: about half a million
    objects that live as long as the worker. Each full collection during the tests, and
    the several that pytest makes at the end of the session, walked all of them again;
    frozen (`gc.freeze`), they are never walked, and never freed, which they would not
    be anyway. What the tests create is collected as before.
    """
    gc.freeze()
