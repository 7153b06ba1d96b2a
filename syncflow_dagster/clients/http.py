"""The HTTP plumbing both partner clients share: settings, JWT auth, retries and bounded concurrency.

- `HttpSettings`: timeouts, retry caps, backoff and concurrency from `SYNCFLOW_HTTP_*`.
- `JwtAuth`: an `httpx.Auth` that fetches a token with OAuth2 client credentials,
  refreshes it shortly before its `exp`, and after a 401 refreshes once and
  retries the request (the gap dlt's REST client leaves open).
- `retrying`: tenacity's `AsyncRetrying` with exponential backoff and full
  jitter that honours Retry-After (seconds or HTTP date), capped in attempts
  and in total time.
- `send_with_retries`: one logical request, retried on 429/5xx and transport
  errors, each attempt holding a slot of a `asyncio.Semaphore`.

Errors raised to callers name the method, path and status, never a secret or
a token: credentials travel only in form bodies and Authorization headers,
which no message here includes.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import os
import random
import ssl
import time
from collections.abc import AsyncGenerator, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
)

log = logging.getLogger(__name__)

USER_AGENT = "syncflow/1"
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
# Transport failures worth another attempt: refused/reset connections, timeouts
# and a peer that closed mid-body. Protocol misuse (bad URL scheme) is not.
RETRYABLE_TRANSPORT_ERRORS = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)


class HttpSettings(BaseSettings):
    """Transport settings shared by the APISmith and ScheduleHub clients (env prefix SYNCFLOW_HTTP_)."""

    model_config = SettingsConfigDict(env_prefix="SYNCFLOW_HTTP_", extra="ignore")

    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)
    write_timeout_s: float = Field(default=60.0, gt=0)
    pool_timeout_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=8, ge=1, le=100)
    max_retry_seconds: float = Field(default=120.0, gt=0)
    backoff_base_s: float = Field(default=0.25, ge=0)
    backoff_max_s: float = Field(default=20.0, ge=0)
    # A Retry-After longer than this is treated as this long: a partner asking
    # for an hour's pause should fail the run, not hang it.
    max_retry_after_s: float = Field(default=60.0, ge=0)
    max_concurrency: int = Field(default=4, ge=1, le=256)
    max_connections: int = Field(default=16, ge=1, le=1024)
    token_refresh_margin_s: float = Field(default=30.0, ge=0)
    verify_tls: bool = True


class ClientCredentials(BaseModel):
    """OAuth2 client-credentials for one partner system; the secret never prints."""

    model_config = ConfigDict(frozen=True)

    token_url: str
    client_id: str
    client_secret: SecretStr


class HttpClientError(Exception):
    """Base of the errors the partner clients raise; messages carry no secrets."""


class AuthenticationError(HttpClientError):
    """The token endpoint refused the credentials or did not answer with a token."""


class RetryableStatusError(HttpClientError):
    """A 429 or 5xx answer; carries the partner's Retry-After, if any, in seconds."""

    def __init__(self, method: str, path: str, status: int, retry_after_s: float | None) -> None:
        super().__init__(f"{method} {path} answered HTTP {status}")
        self.status = status
        self.retry_after_s = retry_after_s


class RequestFailedError(HttpClientError):
    """A request that still failed after its retries, or failed in a way not worth retrying."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header given as delta-seconds or an HTTP date."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _full_jitter_wait(settings: HttpSettings) -> Callable[[RetryCallState], float]:
    # Full jitter (AWS architecture blog): uniform(0, min(cap, base * 2^n)) spreads
    # a herd of retrying clients better than equal or decorrelated jitter.
    # The generator only spreads retries; nothing secret depends on it.
    jitter = random.Random()  # noqa: S311

    def wait(state: RetryCallState) -> float:
        ceiling = min(settings.backoff_max_s, settings.backoff_base_s * (2 ** (state.attempt_number - 1)))
        delay = jitter.uniform(0.0, ceiling)
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, RetryableStatusError) and exc.retry_after_s is not None:
            delay = max(delay, min(exc.retry_after_s, settings.max_retry_after_s))
        remaining = settings.max_retry_seconds - (state.seconds_since_start or 0.0)
        return max(0.0, min(delay, remaining))

    return wait


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    log.warning(
        "attempt %d failed (%s: %s); retrying in %.2fs",
        state.attempt_number,
        type(exc).__name__,
        exc,
        wait,
    )


def retrying(settings: HttpSettings) -> AsyncRetrying:
    """Retry policy: 429/5xx and transport errors, full-jitter backoff, Retry-After, capped."""
    return AsyncRetrying(
        stop=stop_after_attempt(settings.max_attempts) | stop_after_delay(settings.max_retry_seconds),
        wait=_full_jitter_wait(settings),
        retry=retry_if_exception_type((RetryableStatusError, *RETRYABLE_TRANSPORT_ERRORS)),
        before_sleep=_log_retry,
        reraise=True,
    )


def tls_verification(verify_tls: bool) -> ssl.SSLContext | bool:
    """What a client passes as httpx's `verify`: this process's one verifying context, or False.

    httpx builds a new SSL context for every client it makes, and loading certifi's CA
    bundle into it is most of the CPU of making a client. Every stage run makes its
    partner clients anew, so they share one context instead: the one httpx would build
    (certifi's bundle, or `SSL_CERT_FILE` / `SSL_CERT_DIR` when set), built again when
    those variables change. A context is safe to share between clients and threads.
    """
    if not verify_tls:
        return False
    return _verifying_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.cache
def _verifying_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    # The arguments are the cache key: httpx reads the same two variables itself.
    return httpx.create_ssl_context(verify=True, trust_env=True)


def make_async_client(base_url: str, auth: httpx.Auth | None, settings: HttpSettings) -> httpx.AsyncClient:
    """A pooled httpx client with the settings' timeouts, limits and TLS verification."""
    return httpx.AsyncClient(
        base_url=base_url,
        auth=auth,
        timeout=httpx.Timeout(
            connect=settings.connect_timeout_s,
            read=settings.read_timeout_s,
            write=settings.write_timeout_s,
            pool=settings.pool_timeout_s,
        ),
        limits=httpx.Limits(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_connections,
        ),
        verify=tls_verification(settings.verify_tls),
        headers={"User-Agent": USER_AGENT},
    )


class JwtAuth(httpx.Auth):
    """Bearer-token auth from OAuth2 client credentials, refreshed before `exp` and once after a 401."""

    requires_response_body = False

    def __init__(self, credentials: ClientCredentials, settings: HttpSettings | None = None) -> None:
        self._credentials = credentials
        self._settings = settings or HttpSettings()
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock: asyncio.Lock | None = None
        self._token_client: httpx.AsyncClient | None = None
        self.tokens_fetched = 0

    def __repr__(self) -> str:
        return (
            f"JwtAuth(token_url={self._credentials.token_url!r}, client_id={self._credentials.client_id!r})"
        )

    async def aclose(self) -> None:
        if self._token_client is not None:
            await self._token_client.aclose()
            self._token_client = None

    def _refresh_deadline(self, token: str, expires_in: float | None) -> float:
        now = time.time()
        try:
            # Decoded without verification only to read `exp`: the signature is
            # the issuer's business, the client only needs to know when to refresh.
            claims = jwt.decode(token, options={"verify_signature": False})
            exp = float(claims["exp"])
            iat = float(claims.get("iat", now))
        except (jwt.InvalidTokenError, KeyError, TypeError, ValueError):
            exp = now + (expires_in if expires_in is not None else 60.0)
            iat = now
        # The margin shrinks for short-lived tokens so that a 2-second token is
        # still used for most of its life rather than refreshed on every call.
        margin = min(self._settings.token_refresh_margin_s, max(0.0, exp - iat) * 0.1)
        return exp - margin

    async def _fetch_token(self) -> None:
        if self._token_client is None:
            self._token_client = make_async_client("", None, self._settings)
        creds = self._credentials
        form = {
            "grant_type": "client_credentials",
            "client_id": creds.client_id,
            "client_secret": creds.client_secret.get_secret_value(),
        }
        try:
            async for attempt in retrying(self._settings):
                with attempt:
                    response = await self._token_client.post(creds.token_url, data=form)
                    if response.status_code in RETRYABLE_STATUSES:
                        raise RetryableStatusError(
                            "POST",
                            httpx.URL(creds.token_url).path,
                            response.status_code,
                            parse_retry_after(response.headers.get("retry-after")),
                        )
        except (RetryableStatusError, *RETRYABLE_TRANSPORT_ERRORS) as exc:
            raise AuthenticationError(
                f"token endpoint {creds.token_url} unreachable for client {creds.client_id!r}: "
                f"{type(exc).__name__}"
            ) from None
        if response.status_code != 200:
            raise AuthenticationError(
                f"token endpoint {creds.token_url} answered HTTP {response.status_code} "
                f"for client {creds.client_id!r}"
            )
        try:
            body = response.json()
            token = str(body["access_token"])
            expires_in = float(body["expires_in"]) if body.get("expires_in") is not None else None
        except (ValueError, KeyError, TypeError):
            raise AuthenticationError(
                f"token endpoint {creds.token_url} answered without an access_token"
            ) from None
        self._token = token
        self._refresh_at = self._refresh_deadline(token, expires_in)
        self.tokens_fetched += 1

    async def _current_token(self, *, stale: str | None = None) -> str:
        """A valid token; with `stale`, replace it unless another request already did."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            must_refresh = (
                self._token is None
                or time.time() >= self._refresh_at
                or (stale is not None and self._token == stale)
            )
            if must_refresh:
                await self._fetch_token()
            assert self._token is not None
            return self._token

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = await self._current_token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            # Once: a second 401 with a fresh token is a real refusal, not expiry.
            log.info("401 from %s %s; refreshing the token once", request.method, request.url.path)
            token = await self._current_token(stale=token)
            request.headers["Authorization"] = f"Bearer {token}"
            yield request


async def send_with_retries(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    settings: HttpSettings,
    limiter: asyncio.Semaphore | None = None,
    **kwargs: Any,
) -> httpx.Response:
    """Send one request, retrying 429/5xx/transport errors; other answers are returned as they are.

    The body (`content=`/`json=`) must be re-sendable (bytes, not a stream). Each
    attempt holds a slot of `limiter`, the backoff sleeps do not. After the last
    attempt a `RequestFailedError` with `retryable=True` is raised.
    """
    path = httpx.URL(url).path or url
    try:
        async for attempt in retrying(settings):
            with attempt:
                if limiter is not None:
                    async with limiter:
                        response = await client.request(method, url, **kwargs)
                else:
                    response = await client.request(method, url, **kwargs)
                if response.status_code in RETRYABLE_STATUSES:
                    raise RetryableStatusError(
                        method,
                        path,
                        response.status_code,
                        parse_retry_after(response.headers.get("retry-after")),
                    )
    except RetryableStatusError as exc:
        raise RequestFailedError(
            f"{method} {path} still answered HTTP {exc.status} after retries",
            status=exc.status,
            retryable=True,
        ) from None
    except RETRYABLE_TRANSPORT_ERRORS as exc:
        raise RequestFailedError(
            f"{method} {path} failed after retries: {type(exc).__name__}", retryable=True
        ) from None
    return response


def error_detail(response: httpx.Response, limit: int = 300) -> str:
    """A short, printable account of an error answer for an exception message."""
    text = response.text[:limit] if response.content else ""
    return f"HTTP {response.status_code} {text}".strip()
