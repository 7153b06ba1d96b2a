"""Tests of the fault injector and its admin routes, over a real server, and of the token issuer."""

from __future__ import annotations

from collections.abc import Iterator
from email.utils import parsedate_to_datetime

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from syncflow_dagster.simulators.faults import FaultConfig, FaultInjector
from syncflow_dagster.simulators.serve import RunningServer, start_server
from syncflow_dagster.simulators.tokens import TokenIssuer
from syncflow_dagster_tests import loopback_http


@pytest.fixture
def served() -> Iterator[tuple[FaultInjector, RunningServer]]:
    injector = FaultInjector()
    issuer = TokenIssuer({"c": "pw"}, "k" * 32, ttl_override=injector.token_ttl_s)
    app = FastAPI()
    app.include_router(issuer.router())

    @app.get("/v1/thing")
    async def thing() -> dict[str, str]:
        return {"payload": "p" * 4000}

    injector.install(app)
    with start_server(app) as server:
        yield injector, server


def test_config_is_off_by_default_and_validated() -> None:
    config = FaultConfig()
    assert config.rate_limit_probability == config.server_error_probability == 0.0
    assert config.max_faults is None
    with pytest.raises(ValidationError):
        FaultConfig(rate_limit_probability=1.5)
    with pytest.raises(ValidationError, match="5xx"):
        FaultConfig(server_error_statuses=(404,))
    with pytest.raises(ValidationError):
        FaultConfig(unknown_fault=1)  # type: ignore[call-arg]


def test_budget_ends_the_storm_and_seed_repeats_it() -> None:
    injector = FaultInjector(FaultConfig(max_faults=3))
    assert [injector.roll("x", 1.0) for _ in range(5)] == [True, True, True, False, False]
    assert injector.budget_left() == 0

    def decisions() -> list[bool]:
        seeded = FaultInjector(FaultConfig(seed=42))
        return [seeded.roll("x", 0.5) for _ in range(50)]

    first = decisions()
    assert first == decisions()
    assert 0 < sum(first) < 50


def test_admin_routes_replace_report_and_clear(served: tuple[FaultInjector, RunningServer]) -> None:
    injector, server = served
    put = loopback_http.put(
        f"{server.url}/admin/faults", json={"server_error_probability": 1.0, "max_faults": 2}
    )
    assert put.status_code == 200
    assert injector.config.server_error_probability == 1.0
    statuses = [loopback_http.get(f"{server.url}/v1/thing").status_code for _ in range(3)]
    assert all(s in (500, 502, 503) for s in statuses[:2])
    assert statuses[2] == 200
    state = loopback_http.get(f"{server.url}/admin/faults").json()
    assert state["faults_served"] == {"server_error": 2}
    assert state["budget_left"] == 0
    assert loopback_http.delete(f"{server.url}/admin/faults").json()["config"] == FaultConfig().model_dump(
        mode="json"
    )
    bad = loopback_http.put(f"{server.url}/admin/faults", json={"slow_probability": 7})
    assert bad.status_code == 422


def test_rate_limit_fault_sends_retry_after_in_both_forms(
    served: tuple[FaultInjector, RunningServer],
) -> None:
    injector, server = served
    injector.configure(FaultConfig(rate_limit_probability=1.0, retry_after_s=3))
    limited = loopback_http.get(f"{server.url}/v1/thing")
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "3"
    injector.configure(
        FaultConfig(rate_limit_probability=1.0, retry_after_s=3, retry_after_as_http_date=True)
    )
    dated = loopback_http.get(f"{server.url}/v1/thing")
    assert parsedate_to_datetime(dated.headers["retry-after"]).tzinfo is not None


def test_admin_and_token_routes_are_never_faulted(served: tuple[FaultInjector, RunningServer]) -> None:
    injector, server = served
    injector.configure(FaultConfig(server_error_probability=1.0, rate_limit_probability=1.0))
    assert loopback_http.get(f"{server.url}/admin/faults").status_code == 200
    token = loopback_http.post(
        f"{server.url}/oauth/token",
        data={"grant_type": "client_credentials", "client_id": "c", "client_secret": "pw"},
    )
    assert token.status_code == 200
    assert loopback_http.get(f"{server.url}/v1/thing").status_code in (429, 500, 502, 503)


def test_dropped_connection_cuts_the_body(served: tuple[FaultInjector, RunningServer]) -> None:
    injector, server = served
    injector.configure(FaultConfig(drop_connection_probability=1.0, max_faults=1))
    with pytest.raises(httpx.RemoteProtocolError):
        loopback_http.get(f"{server.url}/v1/thing")
    assert loopback_http.get(f"{server.url}/v1/thing").status_code == 200


def test_slow_response_becomes_a_timeout(served: tuple[FaultInjector, RunningServer]) -> None:
    injector, server = served
    injector.configure(FaultConfig(slow_probability=1.0, slow_delay_s=2.0, max_faults=1))
    with pytest.raises(httpx.ReadTimeout):
        loopback_http.get(f"{server.url}/v1/thing", timeout=httpx.Timeout(5.0, read=0.3))
    assert injector.served["slow"] == 1


def test_token_ttl_fault_shortens_new_tokens(served: tuple[FaultInjector, RunningServer]) -> None:
    injector, server = served
    form = {"grant_type": "client_credentials", "client_id": "c", "client_secret": "pw"}
    assert loopback_http.post(f"{server.url}/oauth/token", data=form).json()["expires_in"] == 900
    injector.configure(FaultConfig(token_ttl_s=2))
    assert loopback_http.post(f"{server.url}/oauth/token", data=form).json()["expires_in"] <= 2


def test_token_issuer_checks_and_revokes() -> None:
    issuer = TokenIssuer({"c": "pw"}, "k" * 32)
    token, expires_in = issuer.issue("c", "pw")
    assert expires_in == 900
    assert issuer.verify(token)["sub"] == "c"
    with pytest.raises(ValueError, match="invalid_client"):
        issuer.issue("c", "wrong")
    issuer.revoke_all()
    with pytest.raises(Exception, match="401"):
        issuer.verify(token)
    with pytest.raises(ValueError):
        TokenIssuer({}, "")
