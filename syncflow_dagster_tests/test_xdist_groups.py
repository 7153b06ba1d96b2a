"""`--dist loadgroup` keeps an xdist_group on one worker: the suite's shared deployments depend on it.

make test runs tests that share a module-scoped Dagster deployment in one
xdist group, so the deployment starts once. pytest-xdist 3.8 groups by
rewriting each item's nodeid, which pytest 9 silently ignores: every group was
spread over the workers and each worker started its own deployment. This test
runs a two-worker session of its own on a throw-away test file (nothing of the
suite is imported) and fails if a group is split again.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from syncflow_dagster_tests.conftest import DAGSTER_PROCESS_FIXTURES

PROBE = """
import pytest

@pytest.mark.xdist_group("one")
@pytest.mark.parametrize("n", range(6))
def test_grouped(n):
    pass

@pytest.mark.parametrize("n", range(6))
def test_free(n):
    pass
"""


def test_a_group_runs_on_one_worker(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # this directory's own config, not the suite's
    options = [
        "-n",
        "3",
        "--dist",
        "loadgroup",
        "-v",
        "-p",
        "no:cacheprovider",
        "-c",
        str(tmp_path / "pytest.ini"),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *options, "--rootdir", str(tmp_path), str(probe)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    workers = set(re.findall(r"\[(gw\d+)\] \[\s*\d+%\] PASSED \S*test_grouped", done.stdout))
    assert len(re.findall(r"PASSED \S*test_grouped", done.stdout)) == 6, done.stdout[-3000:]
    assert len(workers) == 1, f"the group ran on {sorted(workers)}"


GROUP_PRINTER = """
def pytest_collection_finish(session):
    for item in session.items:
        for mark in item.iter_markers("xdist_group"):
            print("GROUP", item.nodeid, mark.args[0])
"""


def test_each_module_with_a_deployment_fixture_is_a_group_of_its_own(tmp_path: Path) -> None:
    """The suite's own collection: every test of a module that starts a deployment is in that
    module's group, and no two such modules share one (they were one group, run on one worker)."""
    (tmp_path / "group_printer.py").write_text(GROUP_PRINTER)
    tests = Path(__file__).parent
    modules = sorted(
        path
        for path in tests.rglob("test_*.py")
        if any(f"def {fixture}(" in path.read_text() for fixture in DAGSTER_PROCESS_FIXTURES)
    )
    assert len(modules) >= 5, modules
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "group_printer", *map(str, modules)],
        cwd=tests.parent,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    groups: dict[str, set[str]] = {}
    for line in done.stdout.splitlines():
        if line.startswith("GROUP "):
            nodeid, group = line.removeprefix("GROUP ").rsplit(" ", 1)
            groups.setdefault(nodeid.split("::")[0], set()).add(group)
    assert sorted(groups) == sorted(p.relative_to(tests.parent).as_posix() for p in modules)
    assert all(len(g) == 1 for g in groups.values()), groups
    names = [next(iter(g)) for g in groups.values()]
    assert len(set(names)) == len(names), groups
    assert groups["syncflow_dagster_tests/cli/test_cli_sync.py"] == {"service-stack:cli/test_cli_sync"}
