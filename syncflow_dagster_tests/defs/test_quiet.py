"""The code location says nothing about Dagster's beta, preview and superseded APIs it chose to use."""

from __future__ import annotations

import os
import subprocess
import sys

# Import the code location and resolve its repository, as a code server and a run worker do.
LOAD = "import syncflow_dagster.definitions as d\nd.defs.get_repository_def()\n"
UNFILTERED = (
    "import warnings\n"
    "import syncflow_dagster.defs\n"
    "warnings.resetwarnings()\n"  # drops the code location's filter again
    "warnings.simplefilter('always')\n" + LOAD
)
CATEGORIES = ("BetaWarning", "PreviewWarning", "SupersessionWarning")


def _load(code: str, *options: str) -> str:
    env = {**os.environ, "SYNCFLOW_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none"}
    result = subprocess.run(
        [sys.executable, *options, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def test_loading_the_code_location_prints_no_beta_preview_or_supersession_warning() -> None:
    # -W always: every warning raised is printed, unless the code location filters it.
    stderr = _load(LOAD, "-W", "always")
    assert not [c for c in CATEGORIES if c in stderr], stderr[-2000:]


def test_without_the_filter_the_same_load_warns() -> None:
    """The test above can fail: the definitions do use such APIs (`owners` on sensors)."""
    assert "BetaWarning" in _load(UNFILTERED)
