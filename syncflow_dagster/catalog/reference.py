"""docs/catalog.md, written from the catalog's pydantic models: every key, its type, default and meaning.

`python -m syncflow_dagster.catalog reference > docs/catalog.md` regenerates
it; a test fails when the committed file differs, so the reference cannot
drift from what the loader accepts. The meanings are the models' own field
descriptions (catalog/models.py).
"""

from __future__ import annotations

import types
from enum import Enum
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from syncflow_dagster.catalog.models import (
    KEY_SEPARATOR,
    KEY_SEPARATOR_SHOWN,
    Catalog,
    CatalogDefaults,
    EntitySpec,
    FieldSpec,
    FieldType,
    ParentRelation,
)

COMMAND = "python -m syncflow_dagster.catalog reference > docs/catalog.md"

# What the ERP's text becomes for each field type (the table is checked to cover the enum).
FIELD_TYPES: dict[FieldType, str] = {
    FieldType.STRING: "text, through the string layer (trim, nfc, case, empty_as_null, max_length)",
    FieldType.INT: "a 64-bit integer; a value that is not one rejects the row",
    FieldType.DECIMAL: "a decimal at a fixed `scale` (required), rounded by `rounding`; optional `precision`",
    FieldType.BOOL: "true / false from the spellings in `true_values` / `false_values`",
    FieldType.DATE: "a calendar date: ISO `YYYY-MM-DD` or one of `formats`",
    FieldType.DATETIME: "an instant in UTC: ISO-8601, a bare `YYYY-MM-DD` (midnight UTC) or one of "
    "`formats`; values without an offset are in `timezone`",
    FieldType.ENUM: "one of `values` after the string layer, `aliases` mapped to them",
}

# Field keys whose default, left as it is, rewrites what the ERP sent.
REWRITING_DEFAULTS = ("trim", "nfc", "empty_as_null", "timezone", "precision")

SECTIONS: tuple[tuple[str, type[BaseModel], str], ...] = (
    ("Top-level keys", Catalog, "The file itself."),
    (
        "Defaults keys",
        CatalogDefaults,
        "The `defaults:` block: each key is used by every entity (or field of the named types) that "
        "does not set it; unset, the built-in default of the entity or field key applies.",
    ),
    ("Entity keys", EntitySpec, "One block under `entities:`, named by its key."),
    ("Field keys", FieldSpec, "One item of an entity's `fields:`."),
    ("Parent keys", ParentRelation, "One item of an entity's `parents:`."),
)

EXAMPLE = """\
version: 1
defaults:
  rowversion: RowVersion      # every entity's change counter, unless it names its own
  changed_at: ModifiedAt
  trim: false                 # deliver text exactly as the ERP holds it
entities:
  sites:
    source: Sites
    resource: sites
    business_key: [site_code]
    fields:
      - {source: SiteCode, target: site_code, required: true, case: upper, max_length: 16}
      - {source: SiteName, target: name, max_length: 120}
      - {source: Capacity, target: capacity, type: decimal, scale: 2, precision: 9}
      - {source: OpenedOn, target: opened_on, type: datetime}
"""


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        parts = [_type_name(arg) for arg in get_args(annotation) if arg is not type(None)]
        return " or ".join(parts)
    if origin is tuple:
        args = get_args(annotation)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping of text to text"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return " \\| ".join(f"`{member.value}`" for member in annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return {str: "text", bool: "`true` \\| `false`", int: "integer", float: "number"}.get(
        annotation, str(annotation)
    )


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "(none)"
    else:
        value = info.default
    if value is None or value is PydanticUndefined:
        return "(unset)"
    if value == "":
        return "`''`"
    if isinstance(value, Enum):
        return f"`{value.value}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return "`[" + ", ".join(repr(v) if v == "" else str(v) for v in value) + "]`" if value else "`[]`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    return f"`{value}`"


def _rows(model: type[BaseModel]) -> list[str]:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        if not info.description:
            raise ValueError(f"{model.__name__}.{name} has no description: the reference needs one")
        annotation = info.annotation
        rows.append(f"| `{name}` | {_type_name(annotation)} | {_default(info)} | {info.description} |")
    return rows


def reference() -> str:
    """The whole of docs/catalog.md."""
    missing = set(FieldType) - set(FIELD_TYPES)
    if missing:
        raise ValueError(f"field types without a line in the reference: {sorted(missing)}")
    out = [
        "# The catalog reference",
        "",
        f"<!-- Generated from syncflow_dagster/catalog/models.py by `{COMMAND}`;",
        "     edit the models' descriptions, not this file (a test compares them). -->",
        "",
        "The catalog says what SyncFlow syncs: one YAML file, the packaged",
        "`syncflow_dagster/catalog/default_catalog.yaml` or yours, named by `SYNCFLOW_CATALOG_PATH`",
        "(`syncflow dev --catalog PATH` sets it). `syncflow catalog check [PATH]` validates one with no",
        "database and no server. Unknown keys are refused, so a typo is an error, never a silent default.",
        "docs/adding-an-entity.md walks through adding one.",
        "",
        "```yaml",
        EXAMPLE.rstrip(),
        "```",
        "",
    ]
    for title, model, intro in SECTIONS:
        out += [f"## {title}", "", intro, "", *_rows(model), ""]
    out += ["## Field types", "", "| type | the value delivered |", "|---|---|"]
    out += [f"| `{kind.value}` | {FIELD_TYPES[kind]} |" for kind in FieldType]
    out += [
        "",
        "## What the defaults change in the data",
        "",
        "A field that says nothing about these keys is not delivered byte for byte as the ERP sent it:",
        "",
    ]
    for name in REWRITING_DEFAULTS:
        info = FieldSpec.model_fields[name]
        out.append(f"* `{name}` (default {_default(info)}): {info.description}")
    out += [
        "",
        "Each of them is part of a record's canonical form, so changing one later changes the hash",
        "of every record it touches and the next sync updates them all (docs/identity.md).",
        "",
        "## Composite keys",
        "",
        f"A `business_key` of several fields is one text: the parts in key order, joined by U+{ord(KEY_SEPARATOR):04X}",
        "(the ASCII unit separator, `KEY_SEPARATOR` in catalog/models.py), which a normalised key value",
        "cannot contain. That text is the external key ScheduleHub gets and the key SyncFlow hashes.",
        f"The CLI prints the separator as `{KEY_SEPARATOR_SHOWN}` (`WO-0728{KEY_SEPARATOR_SHOWN}10`) and takes a key",
        f"back with `{KEY_SEPARATOR_SHOWN}` between the parts, or the parts as separate arguments.",
        "",
    ]
    return "\n".join(out)
