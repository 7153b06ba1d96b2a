"""Switchable fault injection for the stand-in servers: the misbehaviour of real partner APIs.

`FaultConfig` declares which faults are on (all off by default) and
`FaultInjector` applies them. Transport faults (429 with Retry-After, 5xx,
slow responses, connections dropped mid-body) are applied by an ASGI
middleware to every route except `/admin/*` and `/oauth/*`, so a test can
always switch the storm off again and clients can always fetch a token.
Application faults (malformed rows, garbage pages, partial batch failures,
a keys listing that silently omits a share, early-expiring tokens) are asked
for by the server code through `roll()` and `config`.

A `max_faults` budget makes a storm end: once that many faults were served,
no more are injected until the configuration is replaced. With a `seed`, the
sequence of decisions is reproducible for a given sequence of requests.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Routes that faults never touch: the switchboard itself and the token endpoint.
EXEMPT_PREFIXES = ("/admin", "/oauth", "/docs", "/openapi.json", "/health")

Probability = float


class FaultConfig(BaseModel):
    """Which faults are on, and how strongly; everything is off by default."""

    model_config = ConfigDict(extra="forbid")

    rate_limit_probability: Probability = Field(default=0.0, ge=0.0, le=1.0)
    retry_after_s: float = Field(default=1.0, ge=0.0, le=3600.0)
    retry_after_as_http_date: bool = False
    server_error_probability: Probability = Field(default=0.0, ge=0.0, le=1.0)
    server_error_statuses: tuple[int, ...] = (500, 502, 503)
    slow_probability: Probability = Field(default=0.0, ge=0.0, le=1.0)
    slow_delay_s: float = Field(default=5.0, ge=0.0, le=600.0)
    drop_connection_probability: Probability = Field(default=0.0, ge=0.0, le=1.0)
    token_ttl_s: float | None = Field(default=None, gt=0.0)
    malformed_row_probability: Probability = Field(default=0.0, ge=0.0, le=1.0)
    garbage_page_probability: Probability = Field(default=0.0, ge=0.0, le=1.0)
    partial_failure_probability: Probability = Field(default=0.0, ge=0.0, le=1.0)
    keys_drop_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    max_faults: int | None = Field(default=None, ge=0)
    seed: int | None = None

    def model_post_init(self, context: Any, /) -> None:
        bad = [code for code in self.server_error_statuses if not 500 <= code <= 599]
        if bad:
            raise ValueError(f"server_error_statuses must be 5xx codes, got {bad}")


class FaultState(BaseModel):
    """What `GET /admin/faults` reports: the configuration and the faults served under it."""

    config: FaultConfig
    faults_served: dict[str, int]
    total_served: int
    budget_left: int | None


class FaultInjector:
    """Holds the fault configuration of one server and decides, request by request, what goes wrong."""

    def __init__(self, config: FaultConfig | None = None) -> None:
        self.configure(config or FaultConfig())

    def configure(self, config: FaultConfig) -> None:
        """Replace the configuration; the budget and the counters start again."""
        self.config = config
        # Fault decisions are simulation, not security: a seeded PRNG is the point.
        self._random = random.Random(config.seed)  # noqa: S311
        self.served: Counter[str] = Counter()

    @property
    def total_served(self) -> int:
        return sum(self.served.values())

    def budget_left(self) -> int | None:
        if self.config.max_faults is None:
            return None
        return max(0, self.config.max_faults - self.total_served)

    def roll(self, kind: str, probability: float) -> bool:
        """True when a fault of `kind` should happen now; counts it against the budget."""
        if probability <= 0.0 or self.budget_left() == 0:
            return False
        if probability < 1.0 and self._random.random() >= probability:
            return False
        self.served[kind] += 1
        return True

    def count(self, kind: str, n: int = 1) -> None:
        """Record `n` faults the server applied itself (e.g. rows left out of a listing)."""
        if n > 0:
            self.served[kind] += n

    def random(self) -> random.Random:
        """The seeded generator, for servers that pick which rows a fault touches."""
        return self._random

    def token_ttl_s(self) -> float | None:
        return self.config.token_ttl_s

    def state(self) -> FaultState:
        return FaultState(
            config=self.config,
            faults_served=dict(self.served),
            total_served=self.total_served,
            budget_left=self.budget_left(),
        )

    def retry_after_value(self) -> str:
        seconds = self.config.retry_after_s
        if self.config.retry_after_as_http_date:
            # An HTTP date has whole-second resolution: round up so the client
            # never comes back early.
            when = datetime.now(UTC) + timedelta(seconds=seconds + 1)
            return email.utils.format_datetime(when, usegmt=True)
        return str(max(0, round(seconds)))

    def router(self) -> APIRouter:
        router = APIRouter(prefix="/admin", tags=["admin"])

        @router.get("/faults", summary="Current fault configuration and faults served")
        async def get_faults() -> FaultState:
            return self.state()

        @router.put("/faults", summary="Replace the fault configuration")
        async def put_faults(config: FaultConfig) -> FaultState:
            self.configure(config)
            return self.state()

        @router.delete("/faults", summary="Switch every fault off")
        async def delete_faults() -> FaultState:
            self.configure(FaultConfig())
            return self.state()

        return router

    def install(self, app: FastAPI) -> None:
        """Add the admin routes and the transport-fault middleware to `app`."""
        app.include_router(self.router())
        app.add_middleware(FaultMiddleware, injector=self)


def _json_body(payload: dict[str, Any]) -> bytes:
    return orjson.dumps(payload)


class FaultMiddleware:
    """ASGI middleware applying transport faults to non-exempt HTTP routes."""

    def __init__(self, app: ASGIApp, injector: FaultInjector) -> None:
        self.app = app
        self.injector = injector

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or str(scope.get("path", "")).startswith(EXEMPT_PREFIXES):
            await self.app(scope, receive, send)
            return
        injector = self.injector
        config = injector.config
        if injector.roll("rate_limit", config.rate_limit_probability):
            await _send_json(
                send,
                429,
                {"error": "rate_limited", "detail": "too many requests (injected fault)"},
                [(b"retry-after", injector.retry_after_value().encode())],
            )
            return
        if injector.roll("server_error", config.server_error_probability):
            status = injector.random().choice(config.server_error_statuses or (500,))
            await _send_json(send, status, {"error": "server_error", "detail": "injected fault"}, [])
            return
        if injector.roll("slow", config.slow_probability):
            await asyncio.sleep(config.slow_delay_s)
        if injector.roll("drop_connection", config.drop_connection_probability):
            await self.app(scope, receive, _truncating_send(send))
            return
        await self.app(scope, receive, send)


async def _send_json(
    send: Send, status: int, payload: dict[str, Any], headers: list[tuple[bytes, bytes]]
) -> None:
    body = _json_body(payload)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _truncating_send(send: Send) -> Send:
    """A `send` that forwards the headers and half of the first body chunk, then nothing.

    The real handler still runs (an upsert is applied), but the client sees the
    connection close mid-body: exactly the case where a retry must be idempotent.
    The server logs that the response was not completed and closes the socket.
    """
    state = {"body_sent": False}

    async def truncating(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"content-length"]
            # Announce more than will arrive so the client notices the cut.
            headers.append((b"content-length", b"1048576"))
            await send({**message, "headers": headers})
        elif message["type"] == "http.response.body" and not state["body_sent"]:
            state["body_sent"] = True
            body: bytes = message.get("body", b"")
            await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})

    return truncating
