"""`syncflow ARGS` run inside the test process: the command's own entry point, its output and exit code.

A `syncflow` subprocess spends about a second of CPU importing Dagster, pandas
and pyarrow before it reads its arguments. A test that checks what a command
does with its arguments (its output, its exit code, its one-line errors, what
it writes to Postgres or asks of Dagster) calls `run_syncflow` instead: the
same `app` the console script runs (`syncflow_dagster.cli.main:app`, so
`SyncflowTyper`'s one-line errors and exit codes are the real ones), with argv,
the environment the test gives and stdout/stderr captured.

What a command run this way could leave behind for the next test is put back
when it returns: environment variables, the working directory, signal
handlers, `sys.excepthook` (Typer installs its own), logging handlers and
levels, warning filters, the catalog cache and the frame store's idle
connections. A command that leaves a thread running fails the test. The
modules that read the environment when imported (the catalog and partitions
of `defs.assets`, the consoles' colours) are imported before the command's
environment is set, so they follow the test process's environment, never one
command's.

The tests that must see a real process (the installed console script starts,
a signal stops it, its children go with it, a stand-in serves on a port) stay
subprocesses and are marked `subprocess`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

# What a terminal-less `syncflow` subprocess of the tests saw: wide enough that no line wraps.
DEFAULT_COLUMNS = 200
# How long a thread the command started may take to end after it returned.
THREAD_GRACE_S = 5.0
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class CliResult:
    """What `subprocess.run(..., capture_output=True, text=True)` gives, for a command run in process."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def command_environment(
    env: Mapping[str, str | None] | None = None,
    *,
    drop_prefixes: tuple[str, ...] = (),
    columns: int = DEFAULT_COLUMNS,
) -> dict[str, str]:
    """The test process's environment without variables starting with `drop_prefixes`, then `env`
    (None removes a variable), with COLUMNS set."""
    environ = {k: v for k, v in os.environ.items() if not (drop_prefixes and k.startswith(drop_prefixes))}
    for name, value in (env or {}).items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    environ["COLUMNS"] = str(columns)
    return environ


def run_syncflow(
    *args: str,
    env: Mapping[str, str | None] | None = None,
    drop_prefixes: tuple[str, ...] = (),
    columns: int = DEFAULT_COLUMNS,
) -> CliResult:
    """`syncflow ARGS` in this process with `command_environment(env, ...)` as its whole environment.

    A known error ends in its one line and exit code, as from the console
    script; any other exception (a bug) propagates to the test with its traceback.
    """
    _import_before_any_command()
    environ = command_environment(env, drop_prefixes=drop_prefixes, columns=columns)
    from syncflow_dagster.cli.main import app

    out, err = io.StringIO(), io.StringIO()
    code: int = 0
    threads_before = set(threading.enumerate())
    with (
        _state_put_back(),
        _environment(environ),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            app(args=list(args), prog_name="syncflow")
        except SystemExit as exc:
            code = _exit_code(exc, err)
    _no_thread_left(threads_before, args)
    return CliResult(tuple(args), code, out.getvalue(), err.getvalue())


def _exit_code(exc: SystemExit, err: io.StringIO) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    err.write(f"{exc.code}\n")  # what the interpreter does with sys.exit("message")
    return 1


_imported = False


def _import_before_any_command() -> None:
    """Import, once, what reads the environment or the terminal at import, under the test process's
    environment and with no terminal: a command's own variables must not become a module's state."""
    global _imported
    if _imported:
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import rich

        import syncflow_dagster.cli.main
        import syncflow_dagster.defs.assets  # noqa: F401 - CATALOG and PARTITIONS are read at import

        rich.get_console()  # rich's global console fixes its width when first made
    _imported = True


@contextlib.contextmanager
def _environment(environ: Mapping[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    _replace_environ(environ)
    try:
        yield
    finally:
        _replace_environ(saved)


def _replace_environ(wanted: Mapping[str, str]) -> None:
    # Only what differs is touched: threads of the test (an in-process stand-in) may read it meanwhile.
    for name in [name for name in os.environ if name not in wanted]:
        del os.environ[name]
    for name, value in wanted.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


@contextlib.contextmanager
def _state_put_back() -> Iterator[None]:
    cwd = os.getcwd()
    excepthook = sys.excepthook
    handlers = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    loggers = _logging_state()
    try:
        with warnings.catch_warnings():
            yield
    finally:
        os.chdir(cwd)
        sys.excepthook = excepthook
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        _restore_logging(loggers)
        _forget_process_caches()


_LoggerState = tuple[list[logging.Handler], int, bool, bool]


def _logging_state() -> dict[str, _LoggerState]:
    state = {"": (list(logging.root.handlers), logging.root.level, True, logging.root.disabled)}
    for name, logger in logging.root.manager.loggerDict.items():
        if isinstance(logger, logging.Logger):
            state[name] = (list(logger.handlers), logger.level, logger.propagate, logger.disabled)
    state["<disable>"] = ([], logging.root.manager.disable, True, False)
    return state


def _restore_logging(state: Mapping[str, _LoggerState]) -> None:
    logging.disable(state["<disable>"][1])
    loggers: dict[str, logging.Logger] = {"": logging.root}
    for name, logger in logging.root.manager.loggerDict.items():
        if isinstance(logger, logging.Logger):
            loggers[name] = logger
    for name, logger in loggers.items():
        handlers, level, propagate, disabled = state.get(name, ([], logging.NOTSET, True, False))
        for handler in [h for h in logger.handlers if h not in handlers]:
            logger.removeHandler(handler)
            with contextlib.suppress(Exception):
                handler.close()
        for handler in handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        if logger.level != level:
            logger.setLevel(level)
        logger.propagate = propagate
        logger.disabled = disabled


def _forget_process_caches() -> None:
    """What a command keeps for the rest of its process: the catalog read from its
    SYNCFLOW_CATALOG_PATH (the frame store's connections end with the command's client or run)."""
    from syncflow_dagster.catalog.loader import _cached

    _cached.cache_clear()


def _no_thread_left(before: set[threading.Thread], args: tuple[str, ...]) -> None:
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    # A pool's worker threads end a moment after the pool is shut down: give them that moment.
    for thread in left:
        thread.join(timeout=THREAD_GRACE_S)
    running = [t.name for t in left if t.is_alive()]
    assert not running, f"`syncflow {' '.join(args)}` left threads running: {running}"


def run_launch_command(command: str, *args: str, dagster_url: str, partitions_start: str) -> CliResult:
    """`syncflow sync|resync ARGS` in process, with what `processes.syncflow_launch_command` gives
    its subprocess: of SyncFlow's settings only the Dagster URL and the partitions' start, 120 columns."""
    return run_syncflow(
        command,
        *args,
        env={"SYNCFLOW_DAGSTER_URL": dagster_url, "SYNCFLOW_PARTITIONS_START": partitions_start},
        drop_prefixes=("SYNCFLOW_",),
        columns=120,
    )
