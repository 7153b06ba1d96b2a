"""Connecting to SyncFlow's Postgres: URL handling and the SQLAlchemy Core engine."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import sqlalchemy as sa


def sqlalchemy_url(url: str) -> str:
    """Map a libpq-style URL (postgresql://, postgres://) onto the psycopg 3 dialect."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("postgresql", "postgres", "postgresql+psycopg2"):
        scheme = "postgresql+psycopg"
    if scheme != "postgresql+psycopg":
        raise ValueError(f"database URL must be a postgresql:// URL, got scheme {parts.scheme!r}")
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, parts.fragment))


def libpq_url(url: str) -> str:
    """The same URL in plain libpq form (for psycopg.connect and dagster-postgres)."""
    parts = urlsplit(url)
    return urlunsplit(("postgresql", parts.netloc, parts.path, parts.query, parts.fragment))


def redact_url(url: str) -> str:
    """A URL safe to log: any password is replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def make_engine(url: str, **kwargs: object) -> sa.Engine:
    """A pooled SQLAlchemy Core engine on psycopg 3."""
    options: dict[str, object] = {"pool_pre_ping": True, "future": True}
    options.update(kwargs)
    return sa.create_engine(sqlalchemy_url(url), **options)
