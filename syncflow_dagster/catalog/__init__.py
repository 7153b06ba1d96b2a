"""The entity catalog: what SyncFlow syncs, declared in YAML and validated by pydantic."""

from syncflow_dagster.catalog.loader import (
    CATALOG_PATH_ENV,
    CatalogError,
    default_catalog,
    load_catalog,
    parse_catalog,
)
from syncflow_dagster.catalog.models import (
    Catalog,
    DeletePolicy,
    EntitySpec,
    FieldSpec,
    FieldType,
    ParentRelation,
)

__all__ = [
    "CATALOG_PATH_ENV",
    "Catalog",
    "CatalogError",
    "DeletePolicy",
    "EntitySpec",
    "FieldSpec",
    "FieldType",
    "ParentRelation",
    "default_catalog",
    "load_catalog",
    "parse_catalog",
]
