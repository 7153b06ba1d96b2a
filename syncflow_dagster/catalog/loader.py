"""Loading the catalog: the packaged default, or the user's file from the environment.

`SYNCFLOW_CATALOG_PATH` names a user's YAML catalog; without it the default
manufacturing catalog shipped in this package is used. A wrong catalog is
refused here, at load time, with a `CatalogError` that names the entity, the
field and what is wrong.
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from syncflow_dagster.catalog.models import Catalog

CATALOG_PATH_ENV = "SYNCFLOW_CATALOG_PATH"
DEFAULT_CATALOG = "default_catalog.yaml"


class CatalogError(ValueError):
    """A catalog that cannot be used; the message names entity, field and fault."""


def _describe_location(raw: dict[str, Any], loc: tuple[int | str, ...]) -> str:
    """Turn a pydantic error location into 'entity X, field Y' using the raw YAML."""
    parts: list[str] = []
    entities = raw.get("entities")
    names = list(entities) if isinstance(entities, dict) else None
    body: Any = None
    i = 0
    if len(loc) >= 2 and loc[0] == "entities" and isinstance(loc[1], int):
        index = loc[1]
        if names is not None and index < len(names):
            name = names[index]
            body = entities[name] if isinstance(entities, dict) else None
        elif isinstance(entities, list) and index < len(entities):
            body = entities[index]
            name = body.get("name", f"#{index}") if isinstance(body, dict) else f"#{index}"
        else:
            name = f"#{index}"
        parts.append(f"entity {name!r}")
        i = 2
    rest = loc[i:]
    if len(rest) >= 2 and rest[0] == "fields" and isinstance(rest[1], int) and isinstance(body, dict):
        fields = body.get("fields") or []
        field = fields[rest[1]] if rest[1] < len(fields) else None
        label = field.get("source", f"#{rest[1]}") if isinstance(field, dict) else f"#{rest[1]}"
        parts.append(f"field {label!r}")
        rest = rest[2:]
    elif len(rest) >= 2 and rest[0] == "parents" and isinstance(rest[1], int) and isinstance(body, dict):
        parents = body.get("parents") or []
        parent = parents[rest[1]] if rest[1] < len(parents) else None
        label = parent.get("entity", f"#{rest[1]}") if isinstance(parent, dict) else f"#{rest[1]}"
        parts.append(f"parent {label!r}")
        rest = rest[2:]
    if rest:
        parts.append("key " + ".".join(str(p) for p in rest))
    return ", ".join(parts) if parts else "catalog"


def _format_errors(raw: dict[str, Any], exc: ValidationError, origin: str) -> str:
    lines = []
    for error in exc.errors():
        where = _describe_location(raw, tuple(error["loc"]))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key (not part of the catalog schema)"
        lines.append(f"{where}: {message}")
    return f"invalid catalog {origin}: " + "; ".join(lines)


def parse_catalog(text: str, origin: str = "<string>") -> Catalog:
    """Parse and validate catalog YAML; raise CatalogError naming what is wrong."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogError(f"invalid catalog {origin}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise CatalogError(f"invalid catalog {origin}: expected a mapping with 'entities'")
    try:
        return Catalog.model_validate(raw)
    except ValidationError as exc:
        raise CatalogError(_format_errors(raw, exc, origin)) from None


def load_catalog(path: str | os.PathLike[str] | None = None) -> Catalog:
    """Load the catalog at `path`, else at $SYNCFLOW_CATALOG_PATH, else the default."""
    chosen = path if path is not None else os.environ.get(CATALOG_PATH_ENV) or None
    if chosen is None:
        text = resources.files("syncflow_dagster.catalog").joinpath(DEFAULT_CATALOG).read_text("utf-8")
        return parse_catalog(text, origin=f"(packaged {DEFAULT_CATALOG})")
    file = Path(chosen)
    try:
        text = file.read_text("utf-8")
    except OSError as exc:
        raise CatalogError(f"cannot read catalog {file}: {exc.strerror or exc}") from None
    return parse_catalog(text, origin=str(file))


@lru_cache(maxsize=4)
def _cached(path: str | None) -> Catalog:
    return load_catalog(path)


def default_catalog() -> Catalog:
    """The catalog in force for this process (cached per path)."""
    return _cached(os.environ.get(CATALOG_PATH_ENV) or None)
