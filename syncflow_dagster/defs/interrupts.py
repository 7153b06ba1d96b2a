"""A run asked to stop stops, whatever its steps' retry policies say and wherever the interrupt lands.

Under the in_process executor (the default, deploy/executor.py) a termination
(`POST /sync/{id}/cancel`, the UI's Terminate, run monitoring's cancel
timeout) reaches the run worker as a SIGINT, which Dagster's handler turns into
a `DagsterExecutionInterruptedError` raised wherever the step's thread is.
Four ways that let a canceled run go on to SUCCESS:

- Dagster turns an interrupt inside a step that has a retry policy into a
  retry of that step (dagster-io/dagster#15026), in the step's body and in
  its IO manager's `load_input` and `handle_output` alike;
- code that handles the interrupt's exception on its way out can raise
  another in its place, which Dagster then retries as any error: SQLAlchemy's
  pool, interrupted in its connection ping, resets the connection and raises
  psycopg's "can't change 'autocommit' now" (seen in a `make test` run);
- Python drops an exception raised inside a finalizer, a weakref callback or
  an asyncio callback ("Exception ignored in ..."), so an interrupt that lands
  there is gone and the step carries on;
- under the multiprocess executor the orchestrating process takes the
  interrupt itself and stops the run (no gap there).

`stop_means_stop` wraps a step's body (and `StageFrameIOManager` the frame IO
manager's two methods) so that an interrupt leaves it as a `Failure` that no
retry policy retries, and so that a SIGINT seen while it ran fails it at its
end even if the exception was dropped or replaced on the way. With the run CANCELING,
Dagster then ends the run CANCELED, and a re-execution continues it as after
any failure.
"""

from __future__ import annotations

import functools
import inspect
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import dagster as dg
from dagster._core.errors import DagsterExecutionInterruptedError

from syncflow_dagster.store.frames.io_manager import PostgresFrameIOManager

F = TypeVar("F", bound=Callable[..., Any])

_INTERRUPTS = (DagsterExecutionInterruptedError, KeyboardInterrupt)
_DROPPED = "a SIGINT whose exception was dropped on the way (in a finalizer or callback)"
_REPLACED = "a SIGINT whose exception became {} on the way"


def _stopped(why: str) -> dg.Failure:
    return dg.Failure(
        description=f"the run was asked to stop ({why}): this step is not retried", allow_retries=False
    )


@contextmanager
def noting_interrupts() -> Iterator[Callable[[], bool]]:
    """While inside, a SIGINT (or SIGTERM) is noted before the handler it replaces runs; yields `noted()`.

    Only on the main thread, where Python runs signal handlers, and only over a
    handler of Python's (Dagster's, which raises): an ignored or default
    disposition stays as it is.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield lambda: False
        return
    previous_term = signal.getsignal(signal.SIGTERM)
    noted = False

    def note(signum: int, frame: Any) -> None:
        nonlocal noted
        noted = True
        previous(signum, frame)

    signal.signal(signal.SIGINT, note)
    signal.signal(signal.SIGTERM, note)  # as Dagster does: SIGTERM (Kubernetes) means SIGINT
    try:
        yield lambda: noted
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)


def _final(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, with an interrupt, raised or dropped on the way, ending it as a final Failure."""
    with noting_interrupts() as interrupted:
        try:
            result = fn(*args)
        except _INTERRUPTS as exc:
            raise _stopped(type(exc).__name__) from exc
        except Exception as exc:
            if interrupted():
                raise _stopped(_REPLACED.format(type(exc).__name__)) from exc
            raise
        if interrupted():
            raise _stopped(_DROPPED)
    return result


_END = object()


def stop_means_stop(fn: F) -> F:
    """`fn` (an asset or op body, plain or generator), with an interrupt ending it as a final Failure."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args: Any, **kwargs: Any) -> Iterator[Any]:
            body = fn(*args, **kwargs)
            try:
                # Each resume of the body on its own: between its yields Dagster's own handlers stand.
                while (item := _final(next, body, _END)) is not _END:
                    yield item
            finally:
                body.close()

        return generator  # type: ignore[return-value]

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return _final(functools.partial(fn, *args, **kwargs))

    return call  # type: ignore[return-value]


class StageFrameIOManager(PostgresFrameIOManager):
    """The frame IO manager of the stage assets, under the stages' rule: an interrupt while a frame is
    loaded or stored fails the step for good, as one inside the stage does (Dagster would retry it)."""

    def load_input(self, context: dg.InputContext) -> Any:
        return _final(super().load_input, context)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        _final(super().handle_output, context, obj)
