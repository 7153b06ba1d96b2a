"""Run workers forked from a warm process instead of started cold.

Dagster's code server starts each run's worker with multiprocessing's `spawn`:
a new Python that imports Dagster, pandas, pyarrow and the code location
before it runs a single stage. On the daemon path that import is most of a
small sync's time (figures: docs/benchmarks.md, "Where the figures behind
the code's choices come from").

With `SYNCFLOW_RUN_WORKER_START=forkserver` (opt-in), the code server
starts run workers from a multiprocessing *forkserver* that preloaded Dagster
and `syncflow_dagster.definitions` once: a run's worker is a fork of that warm
process, so the import is paid once per code-server process, not once per run.
Everything else is Dagster's own: the worker runs Dagster's
`start_run_in_subprocess`, reports its pid in the "Started process for run"
engine event (which `SyncflowRunLauncher`'s health check reads), and the code
server's cancel path (a termination event) is unchanged.

The forkserver is a child of the code-server process, started by its first
run. A code location reload replaces the code-server process and with it the
forkserver, so a run never executes code older than its code server's. The
forkserver is started by exec'ing a fresh Python (not by forking the code
server), so it holds no gRPC threads or connections to inherit.

`SYNCFLOW_RUN_WORKER_START=spawn` (the default) keeps Dagster's default.
Why forkserver is not the default yet: with it, a cancel sent within the
first seconds of a run was missed in 2 of 6 tries (the run went on to
SUCCESS; `service/test_service_app.py::test_cancel_a_second_run`), never with
spawn (0 of 3). Until that is understood, the faster start is opt-in.
Ruled out so far (a bare multiprocessing experiment, not a deployment): the
worker's own signal path. With Dagster's termination event set by the parent,
the worker's termination thread sends itself SIGINT and
`raise_execution_interrupts` raises inside an `asyncio.run` that is waiting,
within 0.05 s, alike in forkserver children (3 of 3 preloading dagster; 4 of 4
preloading PRELOAD from a forkserver started by a non-main thread, as a gRPC
handler starts it) and in spawned ones (3 of 3). On 2026-12-07 the same miss
came with spawn too (1 of 10 full test runs), and two ways for it were found
and closed in defs/interrupts.py: an interrupt while the frame IO manager
loads or stores a frame was retried by Dagster under the stage's retry policy,
and an interrupt landing in a finalizer or callback had its exception dropped
by Python. Forkserver has not been measured again since.

How it is done:
the code server keeps its multiprocessing context in the private attribute
`DagsterApiServer._mp_ctx` (dagster/_grpc/server.py, Dagster 1.13.27, pinned);
`install` shadows it with a class-level property, which also covers a server
object created before this module was imported (the code server imports the
code location from inside its constructor). If a Dagster upgrade renames the
attribute, `install` says so and changes nothing: runs are then spawned as by
default, slower but correct (syncflow_dagster_tests/defs/test_warm_workers.py fails
first).
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

log = logging.getLogger(__name__)

START_ENV = "SYNCFLOW_RUN_WORKER_START"
# What a run worker imports before it can run a stage; the code location last.
PRELOAD = ("dagster", "pandas", "pyarrow", "syncflow_dagster.definitions")
_MARK = "_syncflow_warm_workers"


class WorkerStart(StrEnum):
    FORKSERVER = "forkserver"
    SPAWN = "spawn"


def worker_start(environ: Mapping[str, str]) -> WorkerStart:
    """How run workers start, as SYNCFLOW_RUN_WORKER_START in `environ` says (default spawn)."""
    value = environ.get(START_ENV, WorkerStart.SPAWN.value).strip().lower()
    try:
        return WorkerStart(value)
    except ValueError:
        choices = ", ".join(s.value for s in WorkerStart)
        raise ValueError(f"{START_ENV}={value!r} is not one of: {choices}") from None


def warm_context() -> Any:
    """The forkserver context run workers are started from, preloading PRELOAD."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    return context


def install(environ: Mapping[str, str]) -> bool:
    """Make Dagster's code server start run workers from the warm forkserver; True if it does.

    Idempotent; a no-op (False) with SYNCFLOW_RUN_WORKER_START=spawn or if this
    Dagster's code server has no `_mp_ctx` to replace.
    """
    if worker_start(environ) is WorkerStart.SPAWN:
        return False
    from dagster._grpc import server

    api_server = server.DagsterApiServer
    if getattr(api_server, _MARK, False):
        return True
    if "_mp_ctx = multiprocessing.get_context" not in _source_of(api_server.__init__):
        log.warning(
            "%s=forkserver: this Dagster's code server has no _mp_ctx; run workers are spawned "
            "as Dagster does by default",
            START_ENV,
        )
        return False

    def _context(self: Any) -> Any:
        return warm_context()

    def _ignore(self: Any, value: Any) -> None:
        # DagsterApiServer.__init__ assigns spawn; the warm context stands instead.
        return None

    setattr(api_server, "_mp_ctx", property(_context, _ignore))  # noqa: B010 (a class-level property)
    setattr(api_server, _MARK, True)
    return True


def _source_of(function: Any) -> str:
    import inspect

    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""
