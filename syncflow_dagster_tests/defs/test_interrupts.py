"""A run asked to stop stops: an interrupt inside a step with a retry policy is final (defs/interrupts.py).

Under the in_process executor Dagster retries a step interrupted by a
termination when the step has a retry policy (dagster-io/dagster#15026). The
end-to-end case (a run canceled through the API stays CANCELED) is
service/test_service_app.py::test_cancel_a_second_run; here the wrapper itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg
from dagster._core.errors import DagsterExecutionInterruptedError

from syncflow_dagster.defs.assets import STAGE_ASSETS
from syncflow_dagster.defs.interrupts import stop_means_stop

RETRY = dg.RetryPolicy(max_retries=2)


def _step_events(result: dg.ExecuteInProcessResult) -> list[str]:
    return [
        e.event_type_value
        for e in result.all_events
        if e.event_type_value in {"STEP_START", "STEP_UP_FOR_RETRY", "STEP_RESTARTED", "STEP_FAILURE"}
    ]


def _interrupted() -> int:
    raise DagsterExecutionInterruptedError()


def test_without_it_dagster_retries_an_interrupted_step() -> None:
    # The behaviour the wrapper exists for; if Dagster fixes it, this test says so.
    asset = dg.asset(name="plain", retry_policy=RETRY)(_interrupted)
    result = dg.materialize([asset], raise_on_error=False)
    assert _step_events(result).count("STEP_UP_FOR_RETRY") == 2


def test_an_interrupted_step_fails_without_a_retry() -> None:
    asset = dg.asset(name="plain", retry_policy=RETRY)(stop_means_stop(_interrupted))
    result = dg.materialize([asset], raise_on_error=False)
    assert _step_events(result) == ["STEP_START", "STEP_FAILURE"]
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert failure is not None
    assert "the run was asked to stop (DagsterExecutionInterruptedError)" in failure.message


def test_generator_bodies_too() -> None:
    def body() -> Iterator[dg.Output[int]]:
        yield from ()
        raise KeyboardInterrupt

    asset = dg.asset(name="generator", retry_policy=RETRY)(stop_means_stop(body))
    result = dg.materialize([asset], raise_on_error=False)
    assert _step_events(result) == ["STEP_START", "STEP_FAILURE"]


def test_every_stage_asset_is_wrapped() -> None:
    for asset in STAGE_ASSETS:
        compute = asset.op.compute_fn.decorated_fn  # type: ignore[union-attr]
        assert getattr(compute, "__wrapped__", None) is not None, asset.key
