"""The entity catalog's shape: what is synced, declared as pydantic models.

A catalog is a set of entities. Each entity names its APISmith source, its
ScheduleHub resource, its ordered business key, its rowversion column, the
mapping of every source field to a target field with the normalisation rules
of that field, its parent relations and its delete policy. The models forbid
unknown keys so that a typo in a catalog is an error, never a silent default.
"""

from __future__ import annotations

import re
from enum import StrEnum
from functools import cached_property
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Entity and target field names become SQL identifiers and JSON keys, so they
# are held to a strict, injection-proof shape at load time.
IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
# Source names are the ERP's own spelling; they only travel in URLs and JSON.
SOURCE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}$")


class FieldType(StrEnum):
    INT = "int"
    DECIMAL = "decimal"
    BOOL = "bool"
    DATE = "date"
    DATETIME = "datetime"
    STRING = "string"
    ENUM = "enum"


class Case(StrEnum):
    NONE = "none"
    UPPER = "upper"
    LOWER = "lower"


class Rounding(StrEnum):
    HALF_EVEN = "half_even"
    HALF_UP = "half_up"
    DOWN = "down"


class Precision(StrEnum):
    SECOND = "s"
    MILLISECOND = "ms"
    MICROSECOND = "us"


class DeletePolicy(StrEnum):
    TOMBSTONES = "tombstones"
    RECONCILE = "reconcile"
    NONE = "none"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldSpec(_Strict):
    """One source field, where it goes and the coercion layers applied to it.

    The layers run in order: type, then string rules, then numeric rules, then
    datetime rules. A value that cannot be coerced rejects its row (with the
    entity, key, field, raw value and reason) and never fails the batch.
    """

    source: str
    target: str
    type: FieldType = FieldType.STRING
    required: bool = False
    # string layer (also applied to the text of enums before matching)
    trim: bool = True
    case: Case = Case.NONE
    nfc: bool = True
    empty_as_null: bool = True
    max_length: int | None = Field(default=None, ge=1)
    # numeric layer
    scale: int | None = Field(default=None, ge=0, le=18)
    rounding: Rounding = Rounding.HALF_EVEN
    # datetime layer
    formats: tuple[str, ...] = ()
    timezone: str = "UTC"
    precision: Precision = Precision.MILLISECOND
    # enum layer: allowed values after the string layer, and aliases to them
    values: tuple[str, ...] = ()
    aliases: dict[str, str] = Field(default_factory=dict)
    # bool layer: the spellings that mean true and false (after trim/lower)
    true_values: tuple[str, ...] = ("true", "t", "yes", "y", "1", "x")
    false_values: tuple[str, ...] = ("false", "f", "no", "n", "0", "")

    @field_validator("source")
    @classmethod
    def _source_name(cls, value: str) -> str:
        if not SOURCE_NAME.match(value):
            raise ValueError(f"source name {value!r} is not a plain field name")
        return value

    @field_validator("target")
    @classmethod
    def _target_name(cls, value: str) -> str:
        if not IDENTIFIER.match(value):
            raise ValueError(
                f"target name {value!r} must be lower-case letters, digits and _ (at most 63), "
                "starting with a letter"
            )
        return value

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {value!r}") from exc
        return value

    @model_validator(mode="after")
    def _layers_fit_type(self) -> FieldSpec:
        if self.type is FieldType.DECIMAL and self.scale is None:
            raise ValueError("a decimal field needs a fixed 'scale'")
        if self.type is not FieldType.DECIMAL and self.scale is not None:
            raise ValueError(f"'scale' applies to decimal fields, not {self.type}")
        if self.type is FieldType.ENUM and not self.values:
            raise ValueError("an enum field needs its allowed 'values'")
        if self.type is not FieldType.ENUM and (self.values or self.aliases):
            raise ValueError(f"'values' and 'aliases' apply to enum fields, not {self.type}")
        unknown = sorted(set(self.aliases.values()) - set(self.values))
        if unknown:
            raise ValueError(f"aliases point at values not in 'values': {unknown}")
        return self


class ParentRelation(_Strict):
    """A foreign key: these target fields of the child hold the parent's key."""

    entity: str
    fields: tuple[str, ...] = Field(min_length=1)
    # The parent's business-key fields the FK fields match, in order; defaults
    # to the parent's whole business key.
    key: tuple[str, ...] = ()


class EntitySpec(_Strict):
    """One synced entity: source, target, key, fields, parents, deletes."""

    name: str
    source: str
    resource: str
    business_key: tuple[str, ...] = Field(min_length=1)
    rowversion: str = "RowVersion"
    changed_at: str = "ModifiedAt"
    fields: tuple[FieldSpec, ...] = Field(min_length=1)
    parents: tuple[ParentRelation, ...] = ()
    delete_policy: DeletePolicy = DeletePolicy.TOMBSTONES
    delete_guard: float = Field(default=0.2, gt=0.0, le=1.0)
    description: str = ""

    @field_validator("name", "resource")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not IDENTIFIER.match(value):
            raise ValueError(
                f"{value!r} must be lower-case letters, digits and _ (at most 63), starting with a letter"
            )
        return value

    @field_validator("source", "rowversion", "changed_at")
    @classmethod
    def _source_name(cls, value: str) -> str:
        if not SOURCE_NAME.match(value):
            raise ValueError(f"source name {value!r} is not a plain name")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> EntitySpec:
        targets: dict[str, str] = {}
        sources: set[str] = set()
        for spec in self.fields:
            if spec.target in targets:
                raise ValueError(
                    f"field {spec.source!r}: target {spec.target!r} is already the target of "
                    f"field {targets[spec.target]!r} (two fields mapped to one target)"
                )
            if spec.source in sources:
                raise ValueError(f"field {spec.source!r}: source field mapped twice")
            # The rowversion and changed-at columns may also be mapped as payload fields:
            # normalize reads them for `_rowversion` / `_changed_at` and for the field alike,
            # and the field is then part of DATA_HASH like any other.
            targets[spec.target] = spec.source
            sources.add(spec.source)
        for key in self.business_key:
            if key not in targets:
                raise ValueError(f"business key field {key!r} is not the target of any field mapping")
        if len(set(self.business_key)) != len(self.business_key):
            raise ValueError("business key lists a field twice")
        for relation in self.parents:
            for fk in relation.fields:
                if fk not in targets:
                    raise ValueError(
                        f"parent {relation.entity!r}: FK field {fk!r} is not the target of any field mapping"
                    )
        return self

    @cached_property
    def targets(self) -> tuple[str, ...]:
        """Target field names in declared order (the canonical payload order)."""
        return tuple(spec.target for spec in self.fields)

    @cached_property
    def field_by_target(self) -> dict[str, FieldSpec]:
        return {spec.target: spec for spec in self.fields}

    @cached_property
    def payload_fields(self) -> tuple[str, ...]:
        """Declared target fields (key included): what DATA_HASH covers."""
        return self.targets

    @property
    def parent_entities(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(rel.entity for rel in self.parents))


def entity_list(value: object) -> object:
    """Accept entities as a mapping name → spec (YAML style) or as a list."""
    if isinstance(value, dict):
        out = []
        for name, body in value.items():
            if not isinstance(body, dict):
                raise ValueError(f"entity {name!r}: expected a mapping, got {type(body).__name__}")
            if "name" in body and body["name"] != name:
                raise ValueError(f"entity {name!r}: 'name' says {body['name']!r}")
            out.append({"name": name, **body})
        return out
    return value


class Catalog(_Strict):
    """All entities, validated as a whole (parents exist, no cycles)."""

    version: int = 1
    entities: Annotated[tuple[EntitySpec, ...], Field(min_length=1)]

    @field_validator("entities", mode="before")
    @classmethod
    def _as_list(cls, value: object) -> object:
        return entity_list(value)

    @model_validator(mode="after")
    def _graph(self) -> Catalog:
        by_name: dict[str, EntitySpec] = {}
        for entity in self.entities:
            if entity.name in by_name:
                raise ValueError(f"entity {entity.name!r} is declared twice")
            by_name[entity.name] = entity
        resources: dict[str, str] = {}
        for entity in self.entities:
            if entity.resource in resources:
                raise ValueError(
                    f"entity {entity.name!r}: resource {entity.resource!r} is already used by "
                    f"{resources[entity.resource]!r}"
                )
            resources[entity.resource] = entity.name
            for relation in entity.parents:
                parent = by_name.get(relation.entity)
                if parent is None:
                    raise ValueError(
                        f"entity {entity.name!r}, parent FK {list(relation.fields)}: "
                        f"unknown entity {relation.entity!r}"
                    )
                key = relation.key or parent.business_key
                if tuple(key) != tuple(parent.business_key):
                    raise ValueError(
                        f"entity {entity.name!r}, parent {relation.entity!r}: key {list(key)} is not "
                        f"the parent's business key {list(parent.business_key)}"
                    )
                if len(key) != len(relation.fields):
                    raise ValueError(
                        f"entity {entity.name!r}, parent {relation.entity!r}: FK fields "
                        f"{list(relation.fields)} do not match the parent's key {list(key)}"
                    )
        _topological_order(self.entities)  # raises on a cycle
        return self

    @cached_property
    def by_name(self) -> dict[str, EntitySpec]:
        return {entity.name: entity for entity in self.entities}

    @cached_property
    def topological_order(self) -> tuple[str, ...]:
        """Entity names with every parent before its children (ties by name)."""
        return _topological_order(self.entities)

    def entity(self, name: str) -> EntitySpec:
        try:
            return self.by_name[name]
        except KeyError:
            raise KeyError(f"unknown entity {name!r}; the catalog has {sorted(self.by_name)}") from None

    def children_of(self, name: str) -> tuple[str, ...]:
        return tuple(e.name for e in self.entities if name in e.parent_entities)


def _topological_order(entities: tuple[EntitySpec, ...]) -> tuple[str, ...]:
    parents = {e.name: set(e.parent_entities) - {e.name} for e in entities}
    for entity in entities:
        if entity.name in entity.parent_entities:
            raise ValueError(f"entity {entity.name!r}: a parent relation points at itself (cycle)")
    order: list[str] = []
    done: set[str] = set()
    pending = dict(parents)
    while pending:
        ready = sorted(name for name, deps in pending.items() if deps <= done)
        if not ready:
            cycle = " → ".join(sorted(pending))
            raise ValueError(f"cycle in the parent graph among entities: {cycle}")
        for name in ready:
            order.append(name)
            done.add(name)
            del pending[name]
    return tuple(order)
