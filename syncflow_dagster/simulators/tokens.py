"""OAuth2 client-credentials token endpoint and bearer-token check for the stand-in servers.

Both stand-ins (APISmith and ScheduleHub) issue HS256 JWTs with `sub`, `iat` and
`exp` claims from `POST /oauth/token`, and guard their API routes with
`require_token`. The lifetime of newly issued tokens can be shortened at
runtime through the fault state (`token_ttl_s`) so clients can be tested
against tokens that expire mid-run; `revoke_all` invalidates every token issued
so far, which is how a test forces the 401-then-refresh path deterministically.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

import jwt
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse

ALGORITHM = "HS256"
# The generation claim lets `revoke_all` invalidate every earlier token without
# keeping a list of them.
GENERATION_CLAIM = "gen"

_TOKEN_FORM_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "required": ["grant_type", "client_id", "client_secret"],
                    "properties": {
                        "grant_type": {"type": "string", "enum": ["client_credentials"]},
                        "client_id": {"type": "string"},
                        "client_secret": {"type": "string", "format": "password"},
                    },
                }
            }
        },
    }
}


def _invalid_token(description: str) -> HTTPException:
    # The description names the kind of failure, never the token itself.
    return HTTPException(
        status_code=401,
        detail={"error": "invalid_token", "error_description": description},
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


class TokenIssuer:
    """Issues and verifies bearer tokens for a fixed set of API clients.

    `clients` maps client id to client secret. `ttl_override`, when given, is
    asked at every issue for a shorter lifetime (the fault state's
    `token_ttl_s`); None means the normal `ttl_s`.
    """

    def __init__(
        self,
        clients: Mapping[str, str],
        secret: str,
        ttl_s: float = 900,
        *,
        ttl_override: Callable[[], float | None] | None = None,
    ) -> None:
        if not secret:
            raise ValueError("TokenIssuer needs a non-empty signing secret")
        if ttl_s <= 0:
            raise ValueError(f"TokenIssuer ttl_s must be positive, got {ttl_s!r}")
        self._clients = dict(clients)
        self._secret = secret
        self.ttl_s = ttl_s
        self._ttl_override = ttl_override
        self._generation = 0
        self.issued = 0

    def effective_ttl_s(self) -> float:
        override = self._ttl_override() if self._ttl_override is not None else None
        return override if override is not None and override > 0 else self.ttl_s

    def issue(self, client_id: str, client_secret: str) -> tuple[str, int]:
        """A signed token and its lifetime in seconds; ValueError on unknown credentials."""
        expected = self._clients.get(client_id)
        # compare_digest keeps the check constant-time for a known client id.
        if expected is None or not hmac.compare_digest(expected.encode(), client_secret.encode()):
            raise ValueError("invalid_client")
        now = time.time()
        ttl = self.effective_ttl_s()
        # Whole seconds: JWT NumericDate is compared as an integer by verifiers,
        # so round the expiry up to keep the token alive for at least `ttl`.
        iat = int(now)
        exp = math.ceil(now + ttl)
        claims = {"sub": client_id, "iat": iat, "exp": exp, GENERATION_CLAIM: self._generation}
        self.issued += 1
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM), max(1, int(exp - now))

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims; raises HTTPException(401) if it is bad, expired or revoked."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": ["sub", "iat", "exp"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise _invalid_token("token expired") from exc
        except jwt.InvalidTokenError as exc:
            raise _invalid_token("token invalid") from exc
        if claims.get(GENERATION_CLAIM) != self._generation:
            raise _invalid_token("token revoked")
        return claims

    def revoke_all(self) -> None:
        """Invalidate every token issued so far (clients must fetch a new one)."""
        self._generation += 1

    async def require_token(self, request: Request) -> dict[str, Any]:
        """FastAPI dependency: the bearer token's claims, or 401 with WWW-Authenticate."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(
                status_code=401,
                detail={"error": "invalid_token", "error_description": "bearer token required"},
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return self.verify(token.strip())

    def router(self) -> APIRouter:
        router = APIRouter(tags=["auth"])

        @router.post(
            "/oauth/token",
            summary="Issue an access token (OAuth2 client credentials)",
            openapi_extra=_TOKEN_FORM_SCHEMA,
            responses={401: {"description": "unknown client or wrong secret"}},
        )
        async def issue_token(request: Request) -> JSONResponse:
            # Parsed by hand: the form is three fields and python-multipart is not
            # a dependency of the project.
            form = parse_qs((await request.body()).decode("utf-8", "replace"))

            def field(name: str) -> str:
                values = form.get(name)
                return values[0] if values else ""

            if field("grant_type") != "client_credentials":
                return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
            try:
                token, expires_in = self.issue(field("client_id"), field("client_secret"))
            except ValueError:
                return JSONResponse(
                    {"error": "invalid_client"},
                    status_code=401,
                    headers={"WWW-Authenticate": 'Basic realm="token"'},
                )
            return JSONResponse(
                {"access_token": token, "token_type": "Bearer", "expires_in": expires_in},
                headers={"Cache-Control": "no-store"},
            )

        return router
