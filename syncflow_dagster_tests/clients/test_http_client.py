"""Tests of the shared HTTP plumbing against a real uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from functools import partial
from typing import Any

import pytest
from fastapi import Depends, FastAPI, Request
from pydantic import SecretStr

from syncflow_dagster.clients.http import (
    AuthenticationError,
    ClientCredentials,
    HttpSettings,
    JwtAuth,
    RequestFailedError,
    make_async_client,
    parse_retry_after,
    send_with_retries,
)
from syncflow_dagster.simulators.faults import FaultConfig, FaultInjector
from syncflow_dagster.simulators.serve import RunningServer, start_server
from syncflow_dagster.simulators.tokens import TokenIssuer
from syncflow_dagster_tests.waiting import token_expired, wait_until_async

CLIENT_SECRET = "s3cr3t-client-value-XYZ"
FAST = HttpSettings(
    backoff_base_s=0.01, backoff_max_s=0.05, max_attempts=6, max_retry_seconds=30, max_retry_after_s=5
)


class Stand:
    def __init__(self) -> None:
        self.faults = FaultInjector()
        self.tokens = TokenIssuer({"cli": CLIENT_SECRET}, "k" * 32, ttl_override=self.faults.token_ttl_s)
        self.in_flight = 0
        self.max_in_flight = 0
        self.hits = 0
        self.requests = 0  # every request that reached the server, answered or refused
        app = FastAPI()
        app.include_router(self.tokens.router())

        @app.middleware("http")
        async def count(request: Request, call_next: Any) -> Any:
            self.requests += 1
            return await call_next(request)

        @app.get("/v1/echo")
        async def echo(claims: dict[str, Any] = Depends(self.tokens.require_token)) -> dict[str, Any]:
            self.hits += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            await asyncio.sleep(0.02)
            self.in_flight -= 1
            return {"sub": claims["sub"], "pad": "x" * 2000}

        self.faults.install(app)
        self.app = app


@pytest.fixture
def stand() -> Iterator[tuple[Stand, RunningServer]]:
    s = Stand()
    with start_server(s.app) as server:
        yield s, server


def creds(server: RunningServer, secret: str = CLIENT_SECRET) -> ClientCredentials:
    return ClientCredentials(
        token_url=f"{server.url}/oauth/token", client_id="cli", client_secret=SecretStr(secret)
    )


async def _get(server: RunningServer, auth: JwtAuth, settings: HttpSettings = FAST, n: int = 1) -> list[int]:
    async with make_async_client(server.url, auth, settings) as client:
        limiter = asyncio.Semaphore(settings.max_concurrency)
        responses = await asyncio.gather(
            *(
                send_with_retries(client, "GET", "/v1/echo", settings=settings, limiter=limiter)
                for _ in range(n)
            )
        )
    await auth.aclose()
    return [r.status_code for r in responses]


def test_parse_retry_after_seconds_and_http_date() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=7), usegmt=True), now=now) == 7.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=7), usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_token_fetched_once_for_many_requests(stand: tuple[Stand, RunningServer]) -> None:
    s, server = stand
    auth = JwtAuth(creds(server), FAST)
    assert asyncio.run(_get(server, auth, n=20)) == [200] * 20
    assert auth.tokens_fetched == 1
    assert s.tokens.issued == 1


def test_revoked_token_is_refreshed_once_after_401(stand: tuple[Stand, RunningServer]) -> None:
    s, server = stand
    auth = JwtAuth(creds(server), FAST)

    async def run() -> list[int]:
        async with make_async_client(server.url, auth, FAST) as client:
            first = await send_with_retries(client, "GET", "/v1/echo", settings=FAST)
            s.tokens.revoke_all()
            second = await send_with_retries(client, "GET", "/v1/echo", settings=FAST)
        return [first.status_code, second.status_code]

    assert asyncio.run(run()) == [200, 200]
    assert auth.tokens_fetched == 2


def test_short_lived_tokens_are_refreshed_during_a_run(stand: tuple[Stand, RunningServer]) -> None:
    s, server = stand
    s.faults.configure(FaultConfig(token_ttl_s=1))
    auth = JwtAuth(creds(server), FAST)
    lifetimes = 3

    async def run() -> list[int]:
        statuses = []
        async with make_async_client(server.url, auth, FAST) as client:
            # Two requests per token lifetime, then the token runs out before the next one.
            for _ in range(lifetimes):
                for _ in range(2):
                    response = await send_with_retries(client, "GET", "/v1/echo", settings=FAST)
                    statuses.append(response.status_code)
                token = auth._token
                await wait_until_async(partial(token_expired, token), "the token to expire", timeout_s=10)
        return statuses

    assert asyncio.run(run()) == [200] * 2 * lifetimes
    # One token per lifetime, fetched before it was needed: no request met a 401 on an expired token.
    assert auth.tokens_fetched == s.tokens.issued == lifetimes


def test_wrong_secret_raises_without_leaking_it(
    stand: tuple[Stand, RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    _, server = stand
    wrong = "wrong-secret-value-QQQ"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(AuthenticationError) as raised:
        asyncio.run(_get(server, JwtAuth(creds(server, wrong), FAST)))
    text = str(raised.value) + repr(raised.value)
    assert "401" in text
    assert wrong not in text
    assert wrong not in caplog.text
    assert repr(creds(server, wrong)).count(wrong) == 0


def test_secrets_and_tokens_never_logged_or_raised(
    stand: tuple[Stand, RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    s, server = stand
    caplog.set_level(logging.DEBUG)
    s.faults.configure(FaultConfig(server_error_probability=1.0))
    auth = JwtAuth(creds(server), HttpSettings(max_attempts=2, backoff_base_s=0.01))
    with pytest.raises(RequestFailedError) as raised:
        asyncio.run(_get(server, auth, HttpSettings(max_attempts=2, backoff_base_s=0.01)))
    token = auth._token
    assert token
    for text in (str(raised.value), repr(raised.value), caplog.text):
        assert CLIENT_SECRET not in text
        assert token not in text
    assert raised.value.retryable
    assert raised.value.status in (500, 502, 503)


def test_rate_limit_storm_is_retried_to_success(stand: tuple[Stand, RunningServer]) -> None:
    s, server = stand
    s.faults.configure(FaultConfig(rate_limit_probability=1.0, retry_after_s=0, max_faults=4))
    assert asyncio.run(_get(server, JwtAuth(creds(server), FAST))) == [200]
    assert s.faults.served["rate_limit"] == 4


def test_retry_after_is_honoured(stand: tuple[Stand, RunningServer]) -> None:
    s, server = stand
    s.faults.configure(FaultConfig(rate_limit_probability=1.0, retry_after_s=1, max_faults=1))
    started = time.monotonic()
    assert asyncio.run(_get(server, JwtAuth(creds(server), FAST))) == [200]
    # A lower bound only: the client must not come back before the server asked.
    assert time.monotonic() - started >= 0.9


def test_retry_after_as_http_date_is_honoured(stand: tuple[Stand, RunningServer]) -> None:
    s, server = stand
    s.faults.configure(
        FaultConfig(rate_limit_probability=1.0, retry_after_s=1, retry_after_as_http_date=True, max_faults=1)
    )
    started = time.monotonic()
    assert asyncio.run(_get(server, JwtAuth(creds(server), FAST))) == [200]
    assert time.monotonic() - started >= 0.9


def test_attempts_are_capped(stand: tuple[Stand, RunningServer]) -> None:
    s, server = stand
    s.faults.configure(FaultConfig(server_error_probability=1.0))
    settings = HttpSettings(max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.02)
    with pytest.raises(RequestFailedError, match="after retries"):
        asyncio.run(_get(server, JwtAuth(creds(server), settings), settings))
    assert s.faults.served["server_error"] == 3


@pytest.mark.parametrize(
    "config",
    [
        FaultConfig(server_error_probability=1.0, max_faults=3),
        FaultConfig(drop_connection_probability=1.0, max_faults=2),
        FaultConfig(slow_probability=1.0, slow_delay_s=2.0, max_faults=1),
    ],
    ids=["5xx", "dropped-connection", "timeout"],
)
def test_transient_faults_are_survived(stand: tuple[Stand, RunningServer], config: FaultConfig) -> None:
    s, server = stand
    s.faults.configure(config)
    settings = FAST.model_copy(update={"read_timeout_s": 0.5})
    assert asyncio.run(_get(server, JwtAuth(creds(server), settings), settings)) == [200]
    assert s.faults.total_served == config.max_faults


def test_concurrency_is_bounded(stand: tuple[Stand, RunningServer]) -> None:
    s, server = stand
    settings = FAST.model_copy(update={"max_concurrency": 2})
    assert asyncio.run(_get(server, JwtAuth(creds(server), settings), settings, n=12)) == [200] * 12
    assert s.hits == 12
    assert s.max_in_flight <= 2


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCFLOW_HTTP_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("SYNCFLOW_HTTP_VERIFY_TLS", "false")
    settings = HttpSettings()
    assert settings.max_attempts == 3
    assert settings.verify_tls is False
    assert HttpSettings.model_fields["verify_tls"].default is True


def test_non_retryable_answer_is_returned(stand: tuple[Stand, RunningServer]) -> None:
    s, server = stand

    async def run() -> int:
        async with make_async_client(server.url, None, FAST) as client:
            return (await send_with_retries(client, "GET", "/v1/echo", settings=FAST)).status_code

    assert asyncio.run(run()) == 401
    # Sent once and handed back: a 401 without auth is not retried, and the route never ran.
    assert (s.requests, s.hits) == (1, 0)
