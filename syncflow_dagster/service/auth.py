"""Bearer-token authentication of the API: one shared token from SYNCFLOW_API_TOKEN.

Public paths (SYNCFLOW_API_PUBLIC_PATHS, default /health and /metrics) are
served without it. Without a configured token the protected routes answer
503: the service fails closed rather than open.
"""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from syncflow_dagster.service.settings import ServiceSettings

bearer_scheme = HTTPBearer(auto_error=False, description="The token in SYNCFLOW_API_TOKEN.")


def check_bearer(
    request: Request, settings: ServiceSettings, credentials: HTTPAuthorizationCredentials | None
) -> None:
    """Raise 401/503 unless the request may pass; public paths always pass."""
    if request.url.path in settings.public_paths:
        return
    if settings.api_token is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="SYNCFLOW_API_TOKEN is not set: the API refuses every protected request",
        )
    expected = settings.api_token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    # Constant-time compare: the answer's timing says nothing about the token.
    if credentials is None or not hmac.compare_digest(given, expected):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or wrong bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
