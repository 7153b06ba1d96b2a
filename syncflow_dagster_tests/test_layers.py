"""The layer rules of docs/architecture.md, checked on the import graph rather than trusted.

Each layer imports only from the layers above it: the engine never imports
dagster, httpx or sqlalchemy (nor store, clients or defs); store and clients
never import dagster (except the frame IO manager, which is a Dagster class by
nature) nor defs; the catalog imports no other SyncFlow layer.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "syncflow_dagster"

FORBIDDEN = {
    "catalog": {
        "dagster",
        "httpx",
        "sqlalchemy",
        "psycopg",
        "syncflow_dagster.engine",
        "syncflow_dagster.store",
        "syncflow_dagster.clients",
        "syncflow_dagster.defs",
        "syncflow_dagster.service",
        "syncflow_dagster.cli",
    },
    "engine": {
        "dagster",
        "httpx",
        "sqlalchemy",
        "psycopg",
        "syncflow_dagster.store",
        "syncflow_dagster.clients",
        "syncflow_dagster.defs",
        "syncflow_dagster.service",
        "syncflow_dagster.cli",
        "syncflow_dagster.simulators",
    },
    "store": {
        "httpx",
        "syncflow_dagster.clients",
        "syncflow_dagster.defs",
        "syncflow_dagster.service",
        "syncflow_dagster.cli",
        "dagster",
    },
    "clients": {
        "dagster",
        "sqlalchemy",
        "psycopg",
        "syncflow_dagster.store",
        "syncflow_dagster.defs",
        "syncflow_dagster.service",
        "syncflow_dagster.cli",
    },
}
# The frame IO manager is the store's one Dagster class (ARCHITECTURE: "except the IO manager class").
ALLOWED = {("store", "io_manager.py", "dagster")}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_from_layers_above(layer: str) -> None:
    offences = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in _imports(path):
            for banned in FORBIDDEN[layer]:
                if (name == banned or name.startswith(banned + ".")) and (
                    layer,
                    path.name,
                    banned,
                ) not in ALLOWED:
                    offences.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert offences == []


def test_importing_the_engine_loads_no_dagster_httpx_or_sqlalchemy() -> None:
    code = (
        "import sys, syncflow_dagster.engine.normalize, syncflow_dagster.engine.identity, "
        "syncflow_dagster.engine.delta, syncflow_dagster.engine.relations, syncflow_dagster.engine.rowversion;"
        "print(sorted(m for m in ('dagster', 'httpx', 'sqlalchemy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
