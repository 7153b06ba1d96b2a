"""Waiting on a condition, never on the clock: the one polling loop of the test suite.

A test that needs something to have happened (a port open, a run finished, a
row written, a process gone) asks `wait_until` to poll a probe until it
returns something truthy, and gets that value back. The timeout is an upper
bound for a machine under load, never the expected time: when things work the
wait ends as soon as the condition holds. A timeout fails the test with what
was awaited and the probe's last answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

import jwt

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold within the bound; the message says what was awaited and what was seen."""


def _fail_if_past(
    deadline: float, what: str, timeout_s: float, last: object, describe: Callable[[], str] | None
) -> None:
    if time.monotonic() >= deadline:
        context = f"\n{describe()}" if describe else ""
        raise WaitTimeout(f"timed out after {timeout_s:g} s waiting for {what} (last: {last!r}){context}")


def wait_until(
    probe: Callable[[], T],
    what: str,
    *,
    timeout_s: float,
    interval_s: float = 0.1,
    describe: Callable[[], str] | None = None,
) -> T:
    """Call `probe` until it returns something truthy and return that value.

    `probe` may raise to abort the wait at once (a subprocess that exited, an
    unexpected answer). `describe` adds context to a timeout's message, e.g. the
    tail of a server's log.
    """
    deadline = time.monotonic() + timeout_s
    while not (value := probe()):
        _fail_if_past(deadline, what, timeout_s, value, describe)
        time.sleep(interval_s)
    return value


async def wait_until_async(
    probe: Callable[[], T],
    what: str,
    *,
    timeout_s: float,
    interval_s: float = 0.05,
    describe: Callable[[], str] | None = None,
) -> T:
    """`wait_until` inside a running event loop: polls without blocking the loop's other tasks."""
    deadline = time.monotonic() + timeout_s
    while not (value := probe()):
        _fail_if_past(deadline, what, timeout_s, value, describe)
        await asyncio.sleep(interval_s)
    return value


def token_expired(token: str | None) -> bool:
    """True once the JWT's `exp` has passed (read without verifying: only the time matters here)."""
    assert token, "no token fetched yet"
    return time.time() >= float(jwt.decode(token, options={"verify_signature": False})["exp"])
