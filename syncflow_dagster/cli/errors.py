"""How the `syncflow` command fails: one clear line on stderr and a non-zero exit, never a traceback.

`SyncflowTyper` is the command's Typer app class. It turns the errors a user
can cause or fix (a bad URL or catalog, a server that is down, a missing
variable) into one line naming what is wrong; anything else is a bug and keeps
its traceback, but without local variables, which could hold secrets.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import httpx
import pydantic
import sqlalchemy as sa
import typer
from rich.console import Console

from syncflow_dagster.catalog import CatalogError

EXIT_USER_ERROR = 2
EXIT_UNAVAILABLE = 3

_URL_PASSWORD = re.compile(r"(\w+://[^:/@\s]+:)[^@\s]+@")

err_console = Console(stderr=True, highlight=False)


def redact(text: str) -> str:
    """Hide passwords of any URL inside `text`."""
    return _URL_PASSWORD.sub(r"\1***@", text)


def _settings_problem(exc: pydantic.ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or exc.title
        parts.append(f"{where.upper()}: {error['msg']}")
    return "configuration: " + "; ".join(parts)


def describe(exc: BaseException) -> tuple[str, int] | None:
    """The one-line message and exit code of a known error, or None for a bug."""
    from syncflow_dagster.service.dagster_gateway import DagsterRefused, DagsterUnavailable

    if isinstance(exc, CatalogError):
        return f"catalog: {exc}", EXIT_USER_ERROR
    if isinstance(exc, pydantic.ValidationError):
        return _settings_problem(exc), EXIT_USER_ERROR
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        # The driver's first line says what failed (refused, auth, no such database) without SQL.
        detail = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
        return f"database unreachable: {redact(detail)}", EXIT_UNAVAILABLE
    if isinstance(exc, sa.exc.ArgumentError):
        return f"database URL: {redact(str(exc))}", EXIT_USER_ERROR
    if isinstance(exc, sa.exc.ProgrammingError):
        return "database: schema missing or outdated; run `syncflow db upgrade`", EXIT_USER_ERROR
    if isinstance(exc, httpx.HTTPError):
        where = getattr(getattr(exc, "request", None), "url", None) if _has_request(exc) else None
        return f"HTTP: {type(exc).__name__} {redact(str(where or exc))}", EXIT_UNAVAILABLE
    if isinstance(exc, DagsterUnavailable):
        return f"Dagster: {exc} (is the webserver up? see SYNCFLOW_DAGSTER_URL)", EXIT_UNAVAILABLE
    if isinstance(exc, DagsterRefused):
        return f"Dagster refused: {exc}", EXIT_USER_ERROR
    if isinstance(exc, ValueError | FileNotFoundError | PermissionError):
        return redact(str(exc)), EXIT_USER_ERROR
    return None


def _has_request(exc: httpx.HTTPError) -> bool:
    try:
        exc.request  # noqa: B018 - raises RuntimeError when the error carries no request
    except RuntimeError:
        return False
    return True


class SyncflowTyper(typer.Typer):
    """A Typer app whose known errors end the process with one line and an exit code."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("pretty_exceptions_show_locals", False)
        super().__init__(**kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            known = describe(exc)
            if known is None:
                raise
            message, code = known
            err_console.print(f"[red]error:[/red] {message}", markup=True, soft_wrap=True)
            sys.exit(code)
