"""A run asked to stop stops, whatever its steps' retry policies say.

Under the in_process executor (the default, deploy/executor.py) a termination
(`POST /sync/{id}/cancel`, the UI's Terminate, run monitoring's cancel
timeout) interrupts the step in the run worker's own thread, and Dagster
turns an interrupt inside a step that has a retry policy into a retry of that
step (dagster-io/dagster#15026): the step started again and the run went on
to SUCCESS as if nothing had been asked. Under the multiprocess executor the
orchestrating process takes the interrupt itself and stops the run.

`stop_means_stop` wraps a step's body so that an interrupt leaves it as a
`Failure` that no retry policy retries; with the run CANCELING, Dagster then
ends the run CANCELED, and a re-execution continues it as after any failure.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import dagster as dg
from dagster._core.errors import DagsterExecutionInterruptedError

F = TypeVar("F", bound=Callable[..., Any])

_INTERRUPTS = (DagsterExecutionInterruptedError, KeyboardInterrupt)


def _stopped(exc: BaseException) -> dg.Failure:
    return dg.Failure(
        description=f"the run was asked to stop ({type(exc).__name__}): this step is not retried",
        allow_retries=False,
    )


def stop_means_stop(fn: F) -> F:
    """`fn` (an asset or op body, plain or generator), with an interrupt raised as a final Failure."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except _INTERRUPTS as exc:
                raise _stopped(exc) from exc

        return generator  # type: ignore[return-value]

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _INTERRUPTS as exc:
            raise _stopped(exc) from exc

    return call  # type: ignore[return-value]
