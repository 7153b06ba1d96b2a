"""A run asked to stop stops: an interrupt inside a step with a retry policy is final (defs/interrupts.py).

Under the in_process executor Dagster retries a step interrupted by a
termination when the step has a retry policy (dagster-io/dagster#15026), in
its body and in its IO manager; and an interrupt whose exception Python drops
(raised in a finalizer or a callback) lets the step go on. The end-to-end case
(a run canceled through the API stays CANCELED) is
service/test_service_app.py::test_cancel_a_second_run; here the wrapper itself.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from typing import Any

import dagster as dg
import pytest
from dagster._core.errors import DagsterExecutionInterruptedError

from syncflow_dagster.defs.assets import STAGE_ASSETS
from syncflow_dagster.defs.configuration import build_resources
from syncflow_dagster.defs.interrupts import StageFrameIOManager, stop_means_stop
from syncflow_dagster.store.frames.io_manager import PostgresFrameIOManager

RETRY = dg.RetryPolicy(max_retries=2)


def _materialize_with_retries(body: Any, name: str = "plain") -> dg.ExecuteInProcessResult:
    """`body` as an asset with RETRY's policy, materialized in process; a failed step is in the result."""
    return dg.materialize([dg.asset(name=name, retry_policy=RETRY)(body)], raise_on_error=False)


def _step_events(result: dg.ExecuteInProcessResult) -> list[str]:
    return [
        e.event_type_value
        for e in result.all_events
        if e.event_type_value in {"STEP_START", "STEP_UP_FOR_RETRY", "STEP_RESTARTED", "STEP_FAILURE"}
    ]


def _failure_message(result: dg.ExecuteInProcessResult) -> str:
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert failure is not None
    return failure.message


def _interrupted() -> int:
    raise DagsterExecutionInterruptedError()


def test_without_it_dagster_retries_an_interrupted_step() -> None:
    # The behaviour the wrapper exists for; if Dagster fixes it, this test says so.
    result = _materialize_with_retries(_interrupted)
    assert _step_events(result).count("STEP_UP_FOR_RETRY") == 2


def test_an_interrupted_step_fails_without_a_retry() -> None:
    result = _materialize_with_retries(stop_means_stop(_interrupted))
    assert _step_events(result) == ["STEP_START", "STEP_FAILURE"]
    assert "the run was asked to stop (DagsterExecutionInterruptedError)" in _failure_message(result)


def test_generator_bodies_too() -> None:
    def body() -> Iterator[dg.Output[int]]:
        yield from ()
        raise KeyboardInterrupt

    result = _materialize_with_retries(stop_means_stop(body), name="generator")
    assert _step_events(result) == ["STEP_START", "STEP_FAILURE"]


def _interrupt_replaced_on_its_way_out() -> int:
    """A SIGINT whose exception cleanup code replaces with its own, as SQLAlchemy's pool did when
    interrupted in its connection ping ("can't change 'autocommit' now")."""
    _refuse_outside_dagsters_handler()
    try:
        signal.raise_signal(signal.SIGINT)
    except DagsterExecutionInterruptedError:
        raise RuntimeError("cleanup failed while the interrupt was handled") from None
    return 1


def test_without_it_an_interrupt_replaced_on_its_way_out_is_retried() -> None:
    result = _materialize_with_retries(_interrupt_replaced_on_its_way_out)
    assert _step_events(result).count("STEP_UP_FOR_RETRY") == 2


def test_an_interrupt_replaced_on_its_way_out_still_ends_the_step() -> None:
    result = _materialize_with_retries(stop_means_stop(_interrupt_replaced_on_its_way_out))
    assert _step_events(result) == ["STEP_START", "STEP_FAILURE"]
    assert "a SIGINT whose exception became RuntimeError on the way" in _failure_message(result)


def test_an_error_with_no_interrupt_is_left_to_the_retry_policy() -> None:
    def body() -> int:
        raise RuntimeError("an ordinary failure")

    result = _materialize_with_retries(stop_means_stop(body))
    assert _step_events(result).count("STEP_UP_FOR_RETRY") == 2


def test_every_stage_asset_is_wrapped() -> None:
    for asset in STAGE_ASSETS:
        compute = asset.op.compute_fn.decorated_fn  # type: ignore[union-attr]
        assert getattr(compute, "__wrapped__", None) is not None, asset.key


# The point of these tests: Python reports the dropped exception as unraisable, and pytest warns of it.
DROPS_AN_EXCEPTION = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class _SignalsInItsFinalizer:
    """Sends this process SIGINT from `__del__`: Dagster's handler raises there, and Python drops the exception."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)


def _refuse_outside_dagsters_handler() -> None:
    # Only where Dagster's raising handler stands: anywhere else SIGINT would stop the test session.
    handler = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or handler in (
        signal.default_int_handler,
        signal.SIG_DFL,
        signal.SIG_IGN,
    ):
        raise AssertionError(f"not under Dagster's interrupt handler ({handler!r}): refusing to send SIGINT")


def _interrupt_dropped_in_a_finalizer() -> int:
    _refuse_outside_dagsters_handler()
    finalized = _SignalsInItsFinalizer()
    del finalized  # the interrupt's exception is raised, and dropped, inside __del__
    return 1


@DROPS_AN_EXCEPTION
def test_without_it_an_interrupt_dropped_in_a_finalizer_lets_the_step_succeed() -> None:
    # The gap the noting closes; if Python or Dagster ever stop dropping it, this test says so.
    asset = dg.asset(name="plain")(_interrupt_dropped_in_a_finalizer)
    result = dg.materialize([asset], raise_on_error=False)
    assert result.success
    assert _step_events(result) == ["STEP_START"]


@DROPS_AN_EXCEPTION
def test_an_interrupt_dropped_in_a_finalizer_still_ends_the_step() -> None:
    result = _materialize_with_retries(stop_means_stop(_interrupt_dropped_in_a_finalizer))
    assert _step_events(result) == ["STEP_START", "STEP_FAILURE"]
    assert "dropped on the way" in _failure_message(result)


@DROPS_AN_EXCEPTION
def test_the_generator_form_notes_a_dropped_interrupt_too() -> None:
    def body() -> Iterator[dg.Output[int]]:
        yield dg.Output(_interrupt_dropped_in_a_finalizer())

    result = _materialize_with_retries(stop_means_stop(body), name="generator")
    assert _step_events(result) == ["STEP_START", "STEP_FAILURE"]


def test_a_step_that_saw_no_interrupt_is_untouched() -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    asset = dg.asset(name="plain", retry_policy=RETRY)(stop_means_stop(lambda: 7))
    result = dg.materialize([asset])
    assert result.output_for_node("plain") == 7
    # The handlers of before the run stand again: the noting handler went with the step.
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def _interrupted_while_storing(self: Any, context: dg.OutputContext, obj: Any) -> None:
    raise DagsterExecutionInterruptedError()


@pytest.mark.parametrize(
    ("manager", "events"),
    [
        # Dagster's behaviour the subclass exists for: the step stored again, and again.
        (PostgresFrameIOManager, ["STEP_START", "STEP_UP_FOR_RETRY", "STEP_RESTARTED", "STEP_UP_FOR_RETRY"]),
        (StageFrameIOManager, ["STEP_START", "STEP_FAILURE"]),
    ],
)
def test_an_interrupt_while_a_frame_is_stored_is_final_with_the_stage_io_manager(
    manager: type[PostgresFrameIOManager],
    events: list[str],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(PostgresFrameIOManager, "handle_output", _interrupted_while_storing)
    asset = dg.asset(name="stored", retry_policy=RETRY, io_manager_key="frames")(lambda: 1)
    result = dg.materialize(
        [asset], resources={"frames": manager(database_url=database_url)}, raise_on_error=False
    )
    assert _step_events(result)[: len(events)] == events
    assert not result.success


def test_the_deployment_stores_stage_frames_with_the_stage_io_manager() -> None:
    resources = build_resources({}, env_vars=True)
    assert type(resources["frame_io_manager"]) is StageFrameIOManager
