"""docs/configuration.md against the code: every settings field is documented with its default, and every
documented SYNCFLOW_* variable takes effect where the code location (or the API) reads it.

The doc is checked against the pydantic settings classes rather than written
from them by hand: a field added to a class without a doc line, a default that
changed, or a variable the doc promises that nothing reads fails here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import os
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
from syncflow_dagster.defs.configuration import ChunkSettings
from syncflow_dagster.deploy.executor import ExecutorSettings
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


@functools.cache
def _instance() -> dg.DagsterInstance:
    """The instance `_resources` builds on: none of SyncFlow's resources reads or writes one, and
    without it dg.build_resources makes an ephemeral instance each time (Dagster stamps the
    migrations of its in-memory storages, reading every revision file), most of what a build cost."""
    return dg.DagsterInstance.ephemeral()


def _resources() -> Any:
    """The code location's resources as definitions.py builds them, from this process's environment."""
    from syncflow_dagster.defs.configuration import build_resources

    return dg.build_resources(build_resources(os.environ, env_vars=True), instance=_instance())


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
    if cls is StoreSettings and field == "merge_work_mem":
        # Read by the state repository's and the first load's commits.
        return _through_resources(lambda r: r.database.state().merge_work_mem)
    if cls is StoreSettings:
        return _through_resources(
            lambda r: (
                getattr(r.database.failures().settings, field),
                getattr(r.database.pending().settings, field),
            )
        )
    if cls is ChunkSettings:
        return _through_resources(lambda r: r.tuning.chunk_size)
    if cls is ExecutorSettings:
        from syncflow_dagster.deploy.executor import executor_settings

        return lambda: getattr(executor_settings(os.environ), field)
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


# ------------------------------------------------------------------------------------------------
# Every doc page against the code: the names of sensors, schedules, jobs, routes, commands, options
# and their defaults that docs/*.md and README.md write are read from the code here, so a rename or
# a changed default that the docs do not follow fails (docs/catalog.md is generated: test_catalog_reference).

ROOT = DOC.parents[1]
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
_CODE = re.compile(r"`([^`\n]+)`")
_ROUTE = re.compile(r"^(GET|POST|PUT|DELETE|PATCH) (/\S*)$")


def _spans() -> list[tuple[str, str]]:
    """(page name, text) of every inline code span of every doc page."""
    return [(page.name, span) for page in PAGES for span in _CODE.findall(page.read_text("utf-8"))]


def _automation() -> tuple[set[str], set[str], set[str]]:
    from syncflow_dagster.definitions import defs

    repository = defs.get_repository_def()
    sensors = {s.name for s in repository.sensor_defs}
    schedules = {s.name for s in repository.schedule_defs}
    jobs = {j.name for j in repository.get_all_jobs() if not j.name.startswith("__")}
    return sensors, schedules, jobs


def test_docs_name_only_sensors_schedules_and_jobs_that_exist() -> None:
    sensors, schedules, jobs = _automation()
    named = [(page, span) for page, span in _spans() if re.fullmatch(r"[a-z_]+_(sensor|schedule)", span)]
    assert len(named) >= 5, "the scan found almost no sensor names: is it still reading the docs?"
    wrong = [(page, span) for page, span in named if span not in sensors | schedules]
    assert wrong == [], f"docs name sensors/schedules the code does not have: {wrong}"
    job_words = [
        (page.name, m.group(1))
        for page in PAGES
        for m in re.finditer(r"`([a-z_]+)` job\b", page.read_text("utf-8"))
    ]
    assert job_words, "no '`name` job' in the docs: is the scan still reading them?"
    assert [(p, j) for p, j in job_words if j not in jobs] == []
    # operations.md's table lists exactly the code's sensors and schedules.
    operations = (ROOT / "docs" / "operations.md").read_text("utf-8")
    table = operations.split("## Sensors and schedules", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", table, re.M))
    assert rows == sensors | schedules


def _routes() -> list[re.Pattern[str]]:
    """Every route of the API and the two stand-ins, as (method, path) patterns."""
    from syncflow_dagster.service.app import create_app as service_app
    from syncflow_dagster.service.settings import ServiceSettings
    from syncflow_dagster.simulators import apismith, schedulehub

    apps = [
        service_app(ServiceSettings(database_url="postgresql://nobody@127.0.0.1:9/none")),  # type: ignore[arg-type]
        apismith.create_app(rows=10, clients={"c": "s"}),
        schedulehub.create_app(clients={"c": "s"}),
    ]
    served: set[tuple[str, str]] = set()
    for app in apps:
        # The OpenAPI document lists routes of included routers too; plain routes outside it are added.
        for path, operations in app.openapi()["paths"].items():
            served.update((method.upper(), path) for method in operations)
        for route in app.routes:
            for method in getattr(route, "methods", None) or ():
                served.add((method, route.path))
    patterns = []
    for method, path in served:
        template = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path))
        patterns.append(re.compile(f"{method} {template}"))
    return patterns


def test_docs_name_only_routes_that_exist() -> None:
    patterns = _routes()
    found = []
    for page, span in _spans():
        match = _ROUTE.match(span)
        if not match:
            continue
        method, path = match.groups()
        path = re.sub(r"<[^>]+>", "x", path.split("?")[0])
        # `POST /failed-records/resolve|dismiss`: each alternative is a route.
        head, _, last = path.rpartition("/")
        for leaf in last.split("|"):
            found.append((page, f"{method} {head}/{leaf}"))
    assert len(found) >= 20, "the scan found almost no routes: is it still reading the docs?"
    missing = [(page, route) for page, route in found if not any(p.fullmatch(route) for p in patterns)]
    assert missing == [], f"docs name routes no app serves: {missing}"


def _cli() -> Any:
    import typer.main

    from syncflow_dagster.cli.main import app

    return typer.main.get_command(app)


def _command_of(words: list[str]) -> tuple[Any, list[str]]:
    """The deepest command the words name, and the words after it."""
    command = _cli()
    rest = list(words)
    while rest and hasattr(command, "commands") and rest[0] in command.commands:
        command = command.commands[rest.pop(0)]
    return command, rest


def test_docs_name_only_commands_and_options_that_exist_with_their_defaults() -> None:
    checked = 0
    problems = []
    for page, span in _spans():
        if not span.startswith("syncflow ") or "/" in span.split()[1]:
            continue  # `syncflow status/failed/...` is prose listing commands
        # `resolve\\|dismiss` (a table cell) or `resolve|dismiss`: the first alternative names the command.
        text = span.replace("\\|", "|")
        words = [w.split("|")[0] for w in text.replace("[", " ").replace("]", " ").split()[1:]]
        command, rest = _command_of(words)
        if hasattr(command, "commands"):
            if rest and not rest[0].startswith("-") and not rest[0].isupper():
                problems.append((page, span, f"{rest[0]!r} is no command"))
            continue  # `syncflow simulate`: a group, named as such
        checked += 1
        options = {opt: param for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        for index, word in enumerate(rest):
            name = word.split("=")[0]
            if not name.startswith("--"):
                continue
            if name not in options:
                problems.append((page, span, f"no option {name}"))
                continue
            value = rest[index + 1] if index + 1 < len(rest) else None
            param = options[name]
            # `[--port 3000]`: a literal (not a PLACEHOLDER, not another option) is the default.
            literal = value is not None and not value.startswith("-") and not value.isupper()
            shown_as_default = literal and "[" + word in span and not param.is_flag
            if shown_as_default and param.default is not None and str(param.default) != value:
                problems.append((page, span, f"{name} defaults to {param.default}, doc says {value}"))
    assert checked >= 30, f"only {checked} commands found in the docs: is the scan still reading them?"
    assert problems == [], problems


def test_every_syncflow_variable_in_any_doc_is_read_by_the_code() -> None:
    # The test suite's own variables (SYNCFLOW_SOAK_*, ...) are read by the tests.
    source = "\n".join(
        p.read_text()
        for package in ("syncflow_dagster", "syncflow_dagster_tests")
        for p in (ROOT / package).rglob("*.py")
    )
    read = {_env_name(cls, field) for cls, field, _ in _settings_fields()}
    named = {
        name
        for page in PAGES
        for name in re.findall(r"\b(SYNCFLOW_[A-Z0-9_]+)\b", page.read_text("utf-8"))
        if not name.endswith("_")
    }
    assert len(named) >= 20
    missing = sorted(
        name
        for name in named
        if name != "SYNCFLOW_TEST_DATABASE_URL" and name not in read and f'"{name}"' not in source
    )
    assert missing == [], f"docs name variables nothing reads: {missing}"
