"""One-off HTTP calls of the tests (to the stand-ins, the service, a server being waited for).

`httpx.get(...)` and its siblings build a client for each call, and each client
loads certifi's CA bundle into an SSL context of its own: most of the CPU of a
call to a server on loopback, which never uses TLS, and a poll every tenth of a
second spends a good part of a core on it. These calls pass the process's one
verifying context instead (`clients.http.tls_verification`, what the partner
clients use), so they verify exactly as httpx's defaults would.
"""

from __future__ import annotations

from typing import Any

import httpx

from syncflow_dagster.clients.http import tls_verification


def request(method: str, url: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, url, verify=tls_verification(True), **kwargs)


def get(url: str, **kwargs: Any) -> httpx.Response:
    return request("GET", url, **kwargs)


def post(url: str, **kwargs: Any) -> httpx.Response:
    return request("POST", url, **kwargs)


def put(url: str, **kwargs: Any) -> httpx.Response:
    return request("PUT", url, **kwargs)


def delete(url: str, **kwargs: Any) -> httpx.Response:
    return request("DELETE", url, **kwargs)


def client(**kwargs: Any) -> httpx.Client:
    """An `httpx.Client` (for a test that makes many calls) on the shared context."""
    return httpx.Client(verify=tls_verification(True), **kwargs)
