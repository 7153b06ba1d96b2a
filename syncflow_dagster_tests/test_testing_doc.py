"""docs/testing.md promises commands, markers, a worker count and port blocks: they are the code's.

The doc is read as text and each name or number it states is compared with
where the code keeps it (Makefile, pyproject.toml, .ci/run, conftest.py,
isolation.py), so neither can change alone.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from syncflow_dagster.store import embedded
from syncflow_dagster_tests import isolation
from syncflow_dagster_tests.conftest import DAGSTER_PROCESS_FIXTURES

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "testing.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()


def _make_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*[:?]?=\s*(.+)$", MAKEFILE, re.MULTILINE)
    assert match, f"Makefile sets no {name}"
    return match.group(1).strip()


def _marker_rows() -> dict[str, str]:
    """marker → its 'in make test-fast' cell, from the doc's marker table."""
    rows = re.findall(r"^\| `(\w+)` \| .+ \| (yes|no) \|$", DOC, re.MULTILINE)
    assert rows, "docs/testing.md has no marker table"
    return dict(rows)


def test_the_commands_the_doc_names_are_make_targets() -> None:
    targets = set(re.findall(r"^([\w-]+):", MAKEFILE, re.MULTILINE))
    named = set(re.findall(r"`make ([\w-]+)", DOC))
    assert named, "docs/testing.md names no make target"
    assert named <= targets, sorted(named - targets)
    assert "make test-fast" in (ROOT / "README.md").read_text()


def test_the_default_worker_counts_are_the_makefiles() -> None:
    workers = _make_variable("TEST_WORKERS")
    assert f"`TEST_WORKERS` (default {workers})" in DOC
    assert "--dist loadgroup" in _make_variable("PYTEST_PARALLEL")
    fast_workers = _make_variable("FAST_TEST_WORKERS")
    assert f"`FAST_TEST_WORKERS` (default {fast_workers})" in DOC
    assert "--dist loadgroup" in _make_variable("FAST_PARALLEL")
    assert "$(FAST_PARALLEL)" in MAKEFILE.split("\ntest-fast:")[1].split("\n\n")[0]


def test_the_marker_table_is_pyprojects_markers_and_the_fast_lane_leaves_out_the_nos() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = {m.split(":")[0] for m in config["tool"]["pytest"]["ini_options"]["markers"]}
    rows = _marker_rows()
    assert set(rows) == declared
    excluded = set(re.findall(r"\w+", _make_variable("FAST_MARKERS"))) - {"not", "or", "and"}
    assert excluded == {marker for marker, in_fast in rows.items() if in_fast == "no"}


def test_the_fixtures_and_port_blocks_the_doc_describes_are_the_codes() -> None:
    for fixture in DAGSTER_PROCESS_FIXTURES:
        assert f"`{fixture}`" in DOC, fixture
    assert f"a block of {isolation.PORTS_PER_WORKER} ports" in DOC
    assert f"from {isolation.FIRST_PORT} up" in DOC
    assert (
        isolation.FIRST_PORT + isolation.MAX_WORKERS * isolation.PORTS_PER_WORKER <= 32768
    )  # below ephemeral
    assert f"system user `{embedded.PGSERVER_SYSTEM_USER}`" in DOC
    assert f"`$TMPDIR/{embedded.system_user_lock_path().name}`" in DOC


def test_ci_prints_the_slowest_tests() -> None:
    assert "--durations=25" in (ROOT / ".ci" / "run").read_text()
    assert "25 slowest" in DOC
