"""`cli_runner.run_syncflow` runs the real command in the test process and leaves nothing of it behind.

The CLI tests run `syncflow` in process to save a subprocess's imports; these
tests hold the runner to what the subprocess gave for free: the real exit codes
and one-line errors, and no environment variable, logging handler, signal
handler, excepthook, working directory, cached catalog or module state left
for the next test of the worker.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import pytest

import syncflow_dagster.cli.catalog as catalog_cli
from syncflow_dagster.catalog import default_catalog
from syncflow_dagster_tests.cli.test_cli_ops import CATALOG_OK
from syncflow_dagster_tests.cli_runner import run_syncflow


def test_exit_codes_and_one_line_errors_are_the_console_scripts() -> None:
    ok = run_syncflow("catalog", "check")
    assert (ok.returncode, ok.stderr) == (0, ""), ok.stderr
    assert "valid, 8 entities" in ok.stdout
    missing = run_syncflow("status", env={"SYNCFLOW_DATABASE_URL": None})
    assert missing.returncode == 2  # SyncflowTyper's exit code for a settings problem
    assert missing.stderr.startswith("error: ")
    assert "SYNCFLOW_DATABASE_URL" in missing.stderr
    usage = run_syncflow("status", "--no-such-option")
    assert usage.returncode == 2  # click's usage error
    assert "No such option" in usage.stderr


def test_a_command_leaves_no_state_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG_OK)
    real_text = catalog_cli._catalog_text

    def misbehaving(path: Path | None) -> tuple[str, str]:
        # Everything a command could leave behind in its process, done at once.
        os.environ["SYNCFLOW_LEFT_BY_A_COMMAND"] = "1"
        os.environ.pop("HOME", None)
        logging.getLogger().addHandler(logging.StreamHandler(sys.stderr))
        logging.getLogger("syncflow_dagster").setLevel(logging.DEBUG)
        logging.getLogger("made.by.a.command").addHandler(logging.NullHandler())
        signal.signal(signal.SIGTERM, lambda *_: None)
        sys.excepthook = lambda *_: None
        os.chdir(tmp_path)
        default_catalog()  # caches the catalog of the command's SYNCFLOW_CATALOG_PATH
        return real_text(path)

    monkeypatch.setattr(catalog_cli, "_catalog_text", misbehaving)
    environ = dict(os.environ)
    cwd = os.getcwd()
    hook = sys.excepthook
    term = signal.getsignal(signal.SIGTERM)
    root_handlers = list(logging.getLogger().handlers)
    level = logging.getLogger("syncflow_dagster").level
    entities = set(default_catalog().by_name)
    assert entities != {"sites", "work_centers"}

    result = run_syncflow("catalog", "check", env={"SYNCFLOW_CATALOG_PATH": str(catalog)})

    assert result.returncode == 0, result.stderr
    assert "valid, 2 entities" in result.stdout  # the command saw its own environment
    assert dict(os.environ) == environ
    assert os.getcwd() == cwd
    assert sys.excepthook is hook
    assert signal.getsignal(signal.SIGTERM) is term
    assert logging.getLogger().handlers == root_handlers
    assert logging.getLogger("syncflow_dagster").level == level
    assert logging.getLogger("made.by.a.command").handlers == []
    assert set(default_catalog().by_name) == entities  # the command's catalog is not this process's


def test_a_command_that_leaves_a_thread_running_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real_text = catalog_cli._catalog_text

    def with_a_thread(path: Path | None) -> tuple[str, str]:
        threading.Thread(target=release.wait, name="left-by-a-command").start()
        return real_text(path)

    monkeypatch.setattr(catalog_cli, "_catalog_text", with_a_thread)
    monkeypatch.setattr("syncflow_dagster_tests.cli_runner.THREAD_GRACE_S", 0.1)
    try:
        with pytest.raises(AssertionError, match="left-by-a-command"):
            run_syncflow("catalog", "check")
    finally:
        release.set()
