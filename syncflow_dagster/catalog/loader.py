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

from syncflow_dagster.catalog.models import Catalog, EntitySpec, entity_list, with_defaults

CATALOG_PATH_ENV = "SYNCFLOW_CATALOG_PATH"
DEFAULT_CATALOG = "default_catalog.yaml"


class CatalogError(ValueError):
    """A catalog that cannot be used; the message names entity, field and fault."""


# An entity's lists whose items an error names: list → (what an item is, the key that names it).
_NAMED_ITEMS = {"fields": ("field", "source"), "parents": ("parent", "entity")}


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
    if len(rest) >= 2 and rest[0] in _NAMED_ITEMS and isinstance(rest[1], int) and isinstance(body, dict):
        what, named_by = _NAMED_ITEMS[str(rest[0])]
        items = body.get(str(rest[0])) or []
        item = items[rest[1]] if rest[1] < len(items) else None
        label = item.get(named_by, f"#{rest[1]}") if isinstance(item, dict) else f"#{rest[1]}"
        parts.append(f"{what} {label!r}")
        rest = rest[2:]
    if rest:
        parts.append("key " + ".".join(str(p) for p in rest))
    return ", ".join(parts) if parts else "catalog"


def _error_lines(raw: dict[str, Any], errors: list[Any]) -> list[str]:
    """One line per mistake pydantic found, without the ones that only follow from another.

    A field (an entity) that is wrong is dropped from its entity's `fields`
    (the catalog's `entities`), so pydantic also reports the list as too short
    when every element was wrong: that is no mistake of its own and is left
    out. A line said twice is said once.
    """
    broken = {_list_of(e["loc"], name) for e in errors for name in ("fields", "entities")} - {None}
    lines: list[str] = []
    for error in errors:
        loc = tuple(error["loc"])
        if error["type"] == "too_short" and loc in broken:
            continue
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key (not part of the catalog schema)"
        line = f"{_describe_location(raw, loc)}: {message}"
        if line not in lines:
            lines.append(line)
    return lines


def _list_of(loc: tuple[int | str, ...], name: str) -> tuple[int | str, ...] | None:
    """The location of list `name` when the error is inside one of its elements, else None."""
    if name not in loc:
        return None
    at = loc.index(name)
    return tuple(loc[: at + 1]) if at + 1 < len(loc) and isinstance(loc[at + 1], int) else None


def check_catalog(text: str) -> tuple[Catalog | None, list[str]]:
    """Validate catalog YAML: the catalog, or every mistake found, one line each.

    Entities are checked one by one, so a mistake in one entity neither hides
    the mistakes of the others nor drags in errors about fields that are fine;
    the relations between entities (keys that match, no cycles) are checked
    once every entity is valid, and a parent naming no declared entity is
    reported either way.
    """
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return None, [f"not valid YAML ({exc})"]
    if not isinstance(raw, dict):
        return None, ["expected a mapping with 'entities'"]
    try:
        return Catalog.model_validate(raw), []
    except ValidationError as exc:
        whole = _error_lines(raw, exc.errors())
    try:
        entities = entity_list(with_defaults(raw).get("entities"))
    except ValidationError:
        return None, whole  # the defaults block is wrong: said in `whole`
    except ValueError as exc:
        return None, [f"catalog: {exc}"]
    if not isinstance(entities, list):
        return None, whole
    # Mistakes outside the entities (an unknown top-level key, ...) stand as they are.
    lines = [line for line in whole if not line.startswith("entity ")]
    declared = {body.get("name") for body in entities if isinstance(body, dict)}
    every_entity_valid = True
    for index, body in enumerate(entities):
        try:
            EntitySpec.model_validate(body)
        except ValidationError as exc:
            every_entity_valid = False
            located = [{**e, "loc": ("entities", index, *e["loc"])} for e in exc.errors()]
            lines.extend(line for line in _error_lines(raw, located) if line not in lines)
        parents = body.get("parents") if isinstance(body, dict) else None
        for parent in parents if isinstance(parents, list) else []:
            if isinstance(parent, dict) and parent.get("entity") not in declared:
                line = (
                    f"entity {body.get('name')!r}, parent {parent.get('entity')!r}: "
                    "unknown entity (not declared in this catalog)"
                )
                if line not in lines:
                    lines.append(line)
    if every_entity_valid:
        # Then the whole catalog's own checks said what is wrong.
        lines.extend(line for line in whole if line not in lines)
    return None, lines or whole


def parse_catalog(text: str, origin: str = "<string>") -> Catalog:
    """Parse and validate catalog YAML; raise CatalogError naming every mistake (one each)."""
    catalog, problems = check_catalog(text)
    if catalog is None:
        raise CatalogError(f"invalid catalog {origin}: " + "; ".join(problems))
    return catalog


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
