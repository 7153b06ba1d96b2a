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
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Entity and target field names become SQL identifiers and JSON keys, so they
# are held to a strict, injection-proof shape at load time.
IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
# Source names are the ERP's own spelling; they only travel in URLs and JSON.
SOURCE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}$")
# The parts of a composite business key are joined by this into one text: the external key
# ScheduleHub gets, the `_bk` SyncFlow hashes and stores. The ASCII unit separator, because a
# normalised key value cannot contain it (control characters are refused). The CLI prints it as
# KEY_SEPARATOR_SHOWN (cli/tables.py) and takes it back in either form.
KEY_SEPARATOR = "\x1f"
# What the separator looks like on screen (U+241F SYMBOL FOR UNIT SEPARATOR).
KEY_SEPARATOR_SHOWN = "\u241f"


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

    source: str = Field(description="APISmith's column name (its own spelling).")
    target: str = Field(
        description="ScheduleHub attribute name: lower-case letters, digits and _ (at most 63), "
        "starting with a letter. Business keys and FK fields are written in target names."
    )
    type: FieldType = Field(
        default=FieldType.STRING,
        description="string, int, decimal, bool, date, datetime or enum: what the text the ERP sends "
        "is coerced to. A value that cannot be coerced rejects its row into failed_records.",
    )
    required: bool = Field(
        default=False, description="A null (or empty, see empty_as_null) value rejects the row."
    )
    # string layer (also applied to the text of enums before matching)
    trim: bool = Field(
        default=True,
        description="string and enum fields: remove leading and trailing whitespace. This REWRITES every "
        "value with surrounding spaces (`' A1 '` is delivered as `'A1'`) and changes its hash; "
        "set `trim: false` (or `defaults: {trim: false}`) to deliver values exactly as the ERP holds them.",
    )
    case: Case = Field(
        default=Case.NONE,
        description="string and enum fields: none keeps the case; upper / lower rewrite every value.",
    )
    nfc: bool = Field(
        default=True,
        description="string and enum fields: Unicode NFC normalisation (a decomposed `é` becomes one "
        "code point); visually identical text, different bytes from the source.",
    )
    empty_as_null: bool = Field(
        default=True,
        description="string and enum fields: an empty value (after trim) is delivered as null, not `''`.",
    )
    max_length: int | None = Field(
        default=None, ge=1, description="string fields: a longer value rejects its row (never cut)."
    )
    # numeric layer
    scale: int | None = Field(
        default=None,
        ge=0,
        le=18,
        description="decimal fields (required there): digits after the point; values are rounded to it "
        "with `rounding`.",
    )
    rounding: Rounding = Field(
        default=Rounding.HALF_EVEN,
        description="decimal fields: half_even (banker's), half_up (ties away from zero) or down "
        "(truncate) when a value has more digits than `scale`.",
    )
    # datetime layer
    formats: tuple[str, ...] = Field(
        default=(),
        description="date and datetime fields: strptime formats tried after ISO-8601, in order.",
    )
    timezone: str = Field(
        default="UTC",
        description="datetime fields: the zone of values without an offset; values are delivered in UTC. "
        "A bare date (`2021-07-15`) is that day's midnight UTC.",
    )
    # datetime fields: s | ms | us (default ms); decimal fields: total digits (scale included), optional
    precision: Precision | int | None = Field(
        default=None,
        description="datetime fields: s, ms or us, the unit values are truncated to (unset: ms). "
        "decimal fields: total digits including `scale` (unset: none); a value with more integer "
        "digits than precision - scale rejects its row.",
    )
    # enum layer: allowed values after the string layer, and aliases to them
    values: tuple[str, ...] = Field(
        default=(), description="enum fields (required there): the allowed values after the string layer."
    )
    aliases: dict[str, str] = Field(
        default_factory=dict, description="enum fields: other spellings and the value each one means."
    )
    # bool layer: the spellings that mean true and false (after trim/lower)
    true_values: tuple[str, ...] = Field(
        default=("true", "t", "yes", "y", "1", "x"),
        description="bool fields: spellings read as true (after trim and lower-case).",
    )
    false_values: tuple[str, ...] = Field(
        default=("false", "f", "no", "n", "0", ""),
        description="bool fields: spellings read as false (after trim and lower-case); the empty text is false.",
    )

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

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_kind(cls, value: object) -> object:
        # YAML gives `ms` as text and `12` as an int; "12" is refused rather than read as either.
        if isinstance(value, str) and value not in {p.value for p in Precision}:
            raise ValueError(
                f"precision {value!r} is neither s, ms, us (datetime) nor a digit count (decimal)"
            )
        return value

    @property
    def datetime_precision(self) -> Precision:
        """The precision datetime values are truncated to (ms unless declared)."""
        return self.precision if isinstance(self.precision, Precision) else Precision.MILLISECOND

    @property
    def decimal_precision(self) -> int | None:
        """Total digits a decimal may hold, when declared."""
        if isinstance(self.precision, int) and not isinstance(self.precision, Precision):
            return self.precision
        return None

    @model_validator(mode="after")
    def _layers_fit_type(self) -> FieldSpec:
        if isinstance(self.precision, Precision) and self.type is not FieldType.DATETIME:
            raise ValueError(
                f"'precision: {self.precision.value}' applies to datetime fields, not {self.type}"
            )
        if isinstance(self.precision, int) and not isinstance(self.precision, Precision):
            if self.type is not FieldType.DECIMAL:
                raise ValueError(
                    f"'precision: {self.precision}' (digits) applies to decimal fields, not {self.type}"
                )
            if not 1 <= self.precision <= 38 or self.precision < (self.scale or 0):
                raise ValueError(
                    f"decimal 'precision' {self.precision} must be 1..38 and at least the scale ({self.scale})"
                )
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

    entity: str = Field(description="The parent entity's name in this catalog.")
    fields: tuple[str, ...] = Field(
        min_length=1, description="This entity's target fields that hold the parent's key, in key order."
    )
    key: tuple[str, ...] = Field(
        default=(),
        description="The parent's business-key fields the FK fields match (unset: the parent's whole "
        "business key, which is the only key allowed today).",
    )


class EntitySpec(_Strict):
    """One synced entity: source, target, key, fields, parents, deletes."""

    name: str = Field(
        description="Entity name (the YAML key): lower-case, digits and _ (at most 63); the partition key."
    )
    source: str = Field(description="APISmith's entity name: /v1/entities/<source>/...")
    resource: str = Field(
        description="The ScheduleHub resource its records are delivered to (one per entity)."
    )
    business_key: tuple[str, ...] = Field(
        min_length=1,
        description="Target fields that identify a record, in order. A composite key is sent to "
        "ScheduleHub as one external key, its parts joined by KEY_SEPARATOR.",
    )
    rowversion: str = Field(
        default="RowVersion",
        description="APISmith's change-counter column: what decides that a record is new (not its time).",
    )
    changed_at: str = Field(
        default="ModifiedAt",
        description="APISmith's change-time column: which date partition a change falls in.",
    )
    fields: tuple[FieldSpec, ...] = Field(min_length=1, description="Every synced column (see Field keys).")
    parents: tuple[ParentRelation, ...] = Field(
        default=(),
        description="Foreign keys (see Parent keys): a child whose parent is not in ScheduleHub yet waits.",
    )
    delete_policy: DeletePolicy = Field(
        default=DeletePolicy.TOMBSTONES,
        description="tombstones (APISmith reports deletes), reconcile (a nightly full key scan) or none.",
    )
    delete_guard: float = Field(
        default=0.2,
        gt=0.0,
        le=1.0,
        description="reconcile deletes nothing if more than this share of the entity's records would go.",
    )
    description: str = Field(default="", description="Shown in the Dagster UI.")

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


class CatalogDefaults(_Strict):
    """What most entities share, said once: each key is used where an entity or field does not set it.

    Unset here, the built-in default of the entity or field key applies
    (`RowVersion`, `ModifiedAt`, `trim: true`, ...), as if there were no block.
    """

    rowversion: str | None = Field(default=None, description="Entity `rowversion` column for every entity.")
    changed_at: str | None = Field(default=None, description="Entity `changed_at` column for every entity.")
    trim: bool | None = Field(
        default=None, description="`trim` of every string and enum field (false keeps surrounding spaces)."
    )
    nfc: bool | None = Field(default=None, description="`nfc` of every string and enum field.")
    empty_as_null: bool | None = Field(
        default=None, description="`empty_as_null` of every string and enum field."
    )
    case: Case | None = Field(default=None, description="`case` of every string and enum field.")
    timezone: str | None = Field(default=None, description="`timezone` of every datetime field.")

    # Which field types each field-level default applies to.
    _STRING_KEYS: ClassVar[tuple[str, ...]] = ("trim", "nfc", "empty_as_null", "case")
    _DATETIME_KEYS: ClassVar[tuple[str, ...]] = ("timezone",)

    @field_validator("rowversion", "changed_at")
    @classmethod
    def _source_name(cls, value: str | None) -> str | None:
        if value is not None and not SOURCE_NAME.match(value):
            raise ValueError(f"source name {value!r} is not a plain name")
        return value

    def apply(self, entity: object) -> object:
        """The raw entity mapping with these defaults filled in where it says nothing."""
        if not isinstance(entity, dict):
            return entity
        out = dict(entity)
        for key in ("rowversion", "changed_at"):
            value = getattr(self, key)
            if value is not None:
                out.setdefault(key, value)
        fields = out.get("fields")
        if isinstance(fields, list):
            out["fields"] = [self._apply_field(field) for field in fields]
        return out

    def _apply_field(self, field: object) -> object:
        if not isinstance(field, dict):
            return field
        kind = field.get("type", FieldType.STRING.value)
        keys = (
            self._STRING_KEYS
            if kind in (FieldType.STRING.value, FieldType.ENUM.value)
            else self._DATETIME_KEYS
            if kind == FieldType.DATETIME.value
            else ()
        )
        out = dict(field)
        for key in keys:
            value = getattr(self, key)
            if value is not None:
                out.setdefault(key, value.value if isinstance(value, Case) else value)
        return out


def with_defaults(raw: Any) -> Any:
    """A raw catalog mapping with its `defaults:` block applied to every entity (block kept, validated)."""
    if not isinstance(raw, dict) or raw.get("defaults") is None:
        return raw
    defaults = CatalogDefaults.model_validate(raw["defaults"])
    entities = entity_list(raw.get("entities"))
    if not isinstance(entities, list):
        return raw
    return {**raw, "entities": [defaults.apply(body) for body in entities]}


class Catalog(_Strict):
    """All entities, validated as a whole (parents exist, no cycles)."""

    version: int = Field(default=1, description="The catalog format's version.")
    defaults: CatalogDefaults = Field(
        default_factory=CatalogDefaults, description="What most entities share (see Defaults keys)."
    )
    entities: Annotated[
        tuple[EntitySpec, ...],
        Field(min_length=1, description="Entity name → entity (see Entity keys), or a list with `name`."),
    ]

    @model_validator(mode="before")
    @classmethod
    def _apply_defaults(cls, value: object) -> object:
        try:
            return with_defaults(value)
        except ValidationError:
            return value  # the `defaults` field itself then reports what is wrong

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

    def ancestors_of(self, name: str) -> tuple[str, ...]:
        """Every entity `name` depends on through its parents, their parents and so on, parents first."""
        seen: set[str] = set()
        todo = list(self.entity(name).parent_entities)
        while todo:
            parent = todo.pop()
            if parent not in seen:
                seen.add(parent)
                todo.extend(self.entity(parent).parent_entities)
        return tuple(n for n in self.topological_order if n in seen)


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
