"""docs/configuration.md against the code: every settings field is documented with its default, and every
documented SYNCFLOW_* variable takes effect where the code location (or the API) reads it.

The doc is checked against the pydantic settings classes rather than written
from them by hand: a field added to a class without a doc line, a default that
changed, or a variable the doc promises that nothing reads fails here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pytest
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from syncflow_dagster.clients.apismith import ApiSmithSettings
from syncflow_dagster.clients.http import HttpSettings
from syncflow_dagster.clients.schedulehub import ScheduleHubSettings
from syncflow_dagster.deploy.executor import ExecutorSettings
from syncflow_dagster.engine.chunks import ChunkSettings
from syncflow_dagster.service.settings import ServiceSettings
from syncflow_dagster.simulators import apismith, schedulehub
from syncflow_dagster.simulators.serve import start_server
from syncflow_dagster.store.database import StoreSettings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
_VAR = re.compile(r"`([A-Z][A-Z0-9_]+)`")

# Settings classes and the fields that are not variables of their own (the
# code location passes them from its EnvVars, or the class serves the stand-ins).
SETTINGS: list[type[BaseSettings]] = [
    ApiSmithSettings,
    ScheduleHubSettings,
    HttpSettings,
    StoreSettings,
    ChunkSettings,
    ServiceSettings,
    ExecutorSettings,
]


def _doc_rows() -> dict[str, str]:
    """Variable name → the rest of its table row (default and meaning), for every row naming variables."""
    rows: dict[str, str] = {}
    for line in DOC.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for name in _VAR.findall(cells[0]):
            rows.setdefault(name, " | ".join(cells[1:]))
    return rows


def _env_name(cls: type[BaseSettings], field: str) -> str:
    info = cls.model_fields[field]
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        assert isinstance(first, str)
        return first
    if isinstance(alias, str):
        return alias
    prefix = str(cls.model_config.get("env_prefix", ""))
    return (prefix + field).upper()


def _settings_fields() -> list[tuple[type[BaseSettings], str, str]]:
    return [(cls, field, _env_name(cls, field)) for cls in SETTINGS for field in cls.model_fields]


@pytest.mark.parametrize(
    ("cls", "field", "variable"),
    _settings_fields(),
    ids=[f"{cls.__name__}.{field}" for cls, field, _ in _settings_fields()],
)
def test_every_settings_field_is_documented_with_its_default(
    cls: type[BaseSettings], field: str, variable: str
) -> None:
    rows = _doc_rows()
    assert variable in rows, f"{variable} ({cls.__name__}.{field}) is not in docs/configuration.md"
    default = cls.model_fields[field].default
    if default is None or (variable.endswith(("_SECRET", "_URL")) and not isinstance(default, str)):
        return
    shown = getattr(default, "get_secret_value", lambda: default)()
    if shown in ("", None):
        return
    first = rows[variable].split("|")[0]
    values = re.findall(r"`([^`]*)`", first)
    assert values, f"{variable}: the doc gives no default in backticks ({first!r}); the code's is {shown!r}"
    expected = str(shown).lower() if isinstance(shown, bool) else shown
    documented = values[0]
    if isinstance(expected, int | float) and not isinstance(expected, bool):
        assert float(documented.replace("_", "")) == float(expected), (
            f"{variable}: doc {documented}, code {expected}"
        )
    else:
        assert documented == str(getattr(expected, "value", expected)), (
            f"{variable}: doc {documented!r}, code {expected!r}"
        )


# ------------------------------------------------------------------------------------------------
# Every documented SYNCFLOW_* variable takes effect


@pytest.fixture
def code_location(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables the code location's EnvVars need, so build_resources() resolves."""
    for name, value in {
        "SYNCFLOW_DATABASE_URL": database_url,
        "APISMITH_BASE_URL": "http://127.0.0.1:9",
        "APISMITH_CLIENT_ID": "syncflow",
        "APISMITH_CLIENT_SECRET": "not-a-real-secret",
        "SCHEDULEHUB_BASE_URL": "http://127.0.0.1:9",
        "SCHEDULEHUB_CLIENT_ID": "syncflow",
        "SCHEDULEHUB_CLIENT_SECRET": "not-a-real-secret",
    }.items():
        monkeypatch.setenv(name, value)


def _resources() -> Any:
    from syncflow_dagster.definitions import build_resources

    return dg.build_resources(build_resources())


def _through_resources(read: Callable[[Any], Any]) -> Callable[[], Any]:
    def probe() -> Any:
        with _resources() as resources:
            return read(resources)

    return probe


def _other_value(value: Any) -> str:
    """A valid value different from `value`, as the variable's text."""
    if isinstance(value, bool):
        return "false" if value else "true"
    if isinstance(value, int):
        return str(value + 1)
    if isinstance(value, float):
        return str(value / 2 if value else 0.5)
    return {"256MB": "128MB", "/oauth/token": "/oauth2/token", "arrow": "json"}[
        str(getattr(value, "value", value))
    ]


def _field_probe(cls: type[BaseSettings], field: str) -> Callable[[], Any]:
    """How the running code reads the field: through the code location's resources, or the API's settings."""
    if cls is ApiSmithSettings:
        return _through_resources(lambda r: getattr(r.apismith.client().settings, field))
    if cls is ScheduleHubSettings:
        return _through_resources(lambda r: getattr(r.schedulehub.client().settings, field))
    if cls is HttpSettings:
        return _through_resources(
            lambda r: (getattr(r.apismith.client().http, field), getattr(r.schedulehub.client().http, field))
        )
    if cls is StoreSettings:
        return _through_resources(
            lambda r: (
                getattr(r.database.failures().settings, field),
                getattr(r.database.pending().settings, field),
            )
        )
    if cls is ChunkSettings:
        from syncflow_dagster.engine.chunks import chunk_size

        return chunk_size
    if cls is ExecutorSettings:
        from syncflow_dagster.deploy.executor import executor_settings

        return lambda: getattr(executor_settings(), field)
    assert cls is ServiceSettings
    return lambda: getattr(ServiceSettings(), field)  # type: ignore[call-arg]


_NOT_PROBED = {
    # The code location passes these from its EnvVars (tested by the sync end to end) or they are secrets
    # and URLs whose effect is a connection; the settings fields below are probed generically.
    "base_url",
    "client_id",
    "client_secret",
    "database_url",
    "api_token",
    "apismith_base_url",
    "schedulehub_base_url",
    "celery_broker",
    "celery_backend",
    "executor",
}


# Partner-client tunables that are not SYNCFLOW_* but are documented as variables too.
_PARTNER_TUNABLES = {"token_path", "token_url", "format", "garbage_page_retries"}


def _probes() -> list[tuple[str, Any, Callable[[], Any]]]:
    out = []
    for cls, field, variable in _settings_fields():
        if field in _NOT_PROBED:
            continue
        if not variable.startswith("SYNCFLOW_") and field not in _PARTNER_TUNABLES:
            continue
        default = cls.model_fields[field].default
        if field == "public_paths_csv":
            value: Any = "/health"
        elif field == "dagster_graphql_url":
            value = "http://127.0.0.1:3999"
        elif field == "dagster_location":
            value = "elsewhere"
        elif field == "token_url":
            value = "http://127.0.0.1:9/oauth2/token"
        elif field == "celery_queue":
            value = "syncflow-runs"
        else:
            value = _other_value(default)
        out.append((variable, value, _field_probe(cls, field)))
    return out


@pytest.mark.parametrize(("variable", "value", "probe"), _probes(), ids=[v for v, _, _ in _probes()])
def test_a_settings_variable_reaches_the_code_that_reads_it(
    variable: str, value: str, probe: Callable[[], Any], code_location: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = probe()
    monkeypatch.setenv(variable, value)
    after = probe()
    assert after != before, f"{variable}={value} changed nothing the code reads ({before!r})"
    for one in after if isinstance(after, tuple) else (after,):
        assert _same(one, value), f"{variable}={value}: the code reads {one!r}"


def _same(read: Any, text: str) -> bool:
    """Whether the value the code read is the variable's text."""
    if isinstance(read, bool):
        return str(read).lower() == text.lower()
    if isinstance(read, int | float):
        return float(read) == float(text)
    return str(getattr(read, "value", read)) == text


def test_the_variables_read_outside_settings_classes_take_effect(
    code_location: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from syncflow_dagster.catalog import load_catalog
    from syncflow_dagster.defs.partitions import partitions_start
    from syncflow_dagster.defs.sensors import default_status

    monkeypatch.setenv("SYNCFLOW_STAGE_RETENTION_DAYS", "3")
    with _resources() as resources:
        assert resources.frame_io_manager.retention_days == 3
    monkeypatch.setenv("SYNCFLOW_PARTITIONS_START", "2024-06-01")
    assert partitions_start() == "2024-06-01"
    monkeypatch.setenv("SYNCFLOW_AUTOMATION", "running")
    assert default_status() == dg.DefaultSensorStatus.RUNNING
    monkeypatch.delenv("SYNCFLOW_AUTOMATION")
    assert default_status() == dg.DefaultSensorStatus.STOPPED
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        "entities:\n  widgets:\n    source: Widgets\n    resource: widgets\n    business_key: [code]\n"
        "    fields:\n      - {source: Code, target: code, required: true}\n"
    )
    monkeypatch.setenv("SYNCFLOW_CATALOG_PATH", str(catalog))
    assert load_catalog().topological_order == ("widgets",)


def test_every_documented_syncflow_variable_is_read_by_the_code() -> None:
    """No promise in the doc that nothing keeps: each SYNCFLOW_* name occurs in the package's source."""
    package = Path(__file__).resolve().parents[2] / "syncflow_dagster"
    source = "\n".join(p.read_text() for p in package.rglob("*.py"))
    read = {_env_name(cls, field) for cls, field, _ in _settings_fields()}
    missing = [
        name
        for name in _doc_rows()
        if name.startswith("SYNCFLOW_")
        and name != "SYNCFLOW_TEST_DATABASE_URL"  # read by the test suite's conftest
        and name not in read
        and f'"{name}"' not in source
    ]
    assert missing == [], f"documented but read nowhere: {missing}"


# ------------------------------------------------------------------------------------------------
# The two variables the code location ignored before: their effect on the wire


def test_syncflow_page_size_sets_the_pages_the_fetch_reads(
    code_location: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = secrets.token_urlsafe(12)
    source = start_server(apismith.create_app(rows=300, seed=4, clients={"syncflow": secret}))
    try:
        monkeypatch.setenv("APISMITH_BASE_URL", source.url)
        monkeypatch.setenv("APISMITH_CLIENT_SECRET", secret)
        monkeypatch.setenv("SYNCFLOW_PAGE_SIZE", "4")
        start = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
        end = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)

        async def pages(client: Any) -> list[int]:
            async with client:
                return [page.rows.num_rows async for page in client.iter_change_pages("Items", start, end, 0)]

        with _resources() as resources:
            sizes = asyncio.run(pages(resources.apismith.client()))
    finally:
        source.stop()
    assert sum(sizes) > 8  # the seeded items
    assert max(sizes) == 4
    assert len(sizes) == -(-sum(sizes) // 4)


def test_syncflow_delivery_batch_size_sets_the_rows_per_call(
    code_location: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stand-in refuses calls over 40 rows (413); deletes are not split by the client,
    # so a batch size above the limit fails every row and one at it succeeds.
    secret = secrets.token_urlsafe(12)
    hub = start_server(schedulehub.create_app(clients={"syncflow": secret}, max_batch_rows=40))
    keys = pa.array([f"IT-{n}" for n in range(100)])

    async def delete(client: Any) -> list[str]:
        async with client:
            result = await client.delete("items", keys)
        return sorted(set(result.column("status").to_pylist()))

    try:
        monkeypatch.setenv("SCHEDULEHUB_BASE_URL", hub.url)
        monkeypatch.setenv("SCHEDULEHUB_CLIENT_SECRET", secret)
        with _resources() as resources:
            assert asyncio.run(delete(resources.schedulehub.client())) == ["rejected"]
        monkeypatch.setenv("SYNCFLOW_DELIVERY_BATCH_SIZE", "40")
        with _resources() as resources:
            assert asyncio.run(delete(resources.schedulehub.client())) == ["accepted"]
    finally:
        hub.stop()
