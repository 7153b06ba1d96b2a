"""`--dist loadgroup` keeps an xdist_group on one worker: the suite's shared deployments depend on it.

make test runs tests that share a module-scoped Dagster deployment in one
xdist group, so the deployment starts once. pytest-xdist 3.8 groups by
rewriting each item's nodeid, which pytest 9 silently ignores: every group was
spread over the workers and each worker started its own deployment. This test
runs a two-worker session of its own on a throw-away test file (nothing of the
suite is imported) and fails if a group is split again.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
