"""Where the package reads its environment: at its edges, and in the few places listed here with why.

Configuration comes in at the edge (docs/configuration.md): `definitions.py`
hands the process environment to `build_resources`, `executor_from_env` and
`warm_workers.install`; the `syncflow` command, the monitoring API and the
stand-ins read their own settings. Everything below them takes values as
arguments or resource config. This test reads every module's syntax tree and
finds each read of `os.environ` / `os.getenv` and each settings class built
with no arguments (pydantic-settings then reads the environment itself). The
places found must be exactly those listed: a new read elsewhere fails here,
and so does a listed one that is gone (the list stays true).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "syncflow_dagster"
ENV_NAMES = {"environ", "environb", "getenv", "getenvb"}

# module (relative to the package) -> why it may read the environment
EDGES = {
    "definitions.py": "the code location's edge: the process environment in, resources and executor out",
    "cli/catalog.py": "the `syncflow` command's edge",
    "cli/demo.py": "the `syncflow` command's edge",
    "cli/dev.py": "the `syncflow` command's edge",
    "cli/ops.py": "the `syncflow` command's edge",
    "cli/simulate.py": "the `syncflow` command's edge",
    "cli/sync.py": "the `syncflow` command's edge",
    "service/app.py": "the monitoring API's edge (its ServiceSettings)",
    "simulators/apismith.py": "the APISmith stand-in's edge (its own settings)",
    "deploy/celery_app.py": "the Celery worker's edge: `celery -A` imports only this module",
}
# Read where the definitions are declared, because Dagster needs them before any resource exists.
DEFINITION_SHAPE = {
    "catalog/loader.py": "SYNCFLOW_CATALOG_PATH: the entity partitions and every stage's entity",
    "defs/partitions.py": "SYNCFLOW_PARTITIONS_START: the date partitions",
    "defs/sensors.py": "SYNCFLOW_AUTOMATION: the sensors' and schedules' default status",
}
# A client or repository built without settings reads its own variables, as a library user expects;
# the code location always passes them (from its resources' config).
LIBRARY_DEFAULTS = {
    "clients/apismith.py": "ApiSmithClient() without settings",
    "clients/schedulehub.py": "ScheduleHubClient() without settings",
    "clients/http.py": "HttpSettings() without settings; SSL_CERT_FILE/SSL_CERT_DIR, read as httpx reads them",
    "store/failures.py": "FailureRepository(engine) without settings",
    "store/pending.py": "PendingRepository(engine) without settings",
    "store/delivery_log.py": "DeliveryLogRepository(engine) without settings",
}
ALLOWED = {**EDGES, **DEFINITION_SHAPE, **LIBRARY_DEFAULTS}


def _reads(tree: ast.AST) -> list[str]:
    """Each environment read in `tree`: `os.environ`/`os.getenv` (also imported by name or under
    another name for `os`), or a *Settings class called with no arguments.

    A settings class given some of its fields still fills the others from the environment; that is
    not told apart here (the code location gives every field: test_configuration's probes).
    """
    os_names = {"os"}
    by_name: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            os_names |= {alias.asname or alias.name for alias in node.names if alias.name == "os"}
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            by_name |= {alias.asname or alias.name for alias in node.names if alias.name in ENV_NAMES}
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in os_names:
            if node.attr in ENV_NAMES:
                found.append((node.lineno, f"os.{node.attr}"))
        elif isinstance(node, ast.Name) and node.id in by_name and isinstance(node.ctx, ast.Load):
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Call) and not node.args and not node.keywords:
            name = node.func.id if isinstance(node.func, ast.Name) else None
            if isinstance(node.func, ast.Attribute):
                name = node.func.attr
            if name is not None and name.endswith("Settings") and name[0].isupper():
                found.append((node.lineno, f"{name}()"))
    return [f"line {line}: {what}" for line, what in sorted(found)]


def _reading_modules() -> dict[str, list[str]]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        reads = _reads(ast.parse(path.read_text("utf-8"), filename=str(path)))
        if reads:
            out[path.relative_to(PACKAGE).as_posix()] = reads
    return out


def test_the_environment_is_read_only_at_the_edges_and_the_listed_places() -> None:
    reading = _reading_modules()
    unexpected = {module: reads for module, reads in reading.items() if module not in ALLOWED}
    assert not unexpected, (
        f"environment read outside the edges: {unexpected}; take the value as an argument or resource "
        "config (defs/configuration.py builds them), or add the module here with the reason"
    )
    stale = sorted(set(ALLOWED) - set(reading))
    assert not stale, f"listed as reading the environment but no longer does: {stale}; take it off the list"


def test_the_finder_sees_each_kind_of_read() -> None:
    """The scan itself: every form it looks for is found, and an argument-free call of other names is not."""
    source = (
        "import os\n"
        "import os as system\n"
        "from os import environ, getenv as read\n"
        "a = os.environ['X']\n"
        "b = os.getenv('Y')\n"
        "c = StoreSettings()\n"
        "d = StoreSettings(retry_jitter=0.1)\n"
        "e = settings_from(StoreSettings, {})\n"
        "f = Catalog()\n"
        "g = system.environ.get('Z')\n"
        "h = dict(environ)\n"
        "i = read('W')\n"
        "j = database.StoreSettings()\n"
    )
    assert _reads(ast.parse(source)) == [
        "line 4: os.environ",
        "line 5: os.getenv",
        "line 6: StoreSettings()",
        "line 10: os.environ",
        "line 11: environ",
        "line 12: read",
        "line 13: StoreSettings()",
    ]
