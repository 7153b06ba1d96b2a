"""docs/catalog.md is generated from the catalog models, and the committed file is what they generate now."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

from syncflow_dagster.catalog.models import (
    Catalog,
    CatalogDefaults,
    EntitySpec,
    FieldSpec,
    FieldType,
    ParentRelation,
)

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "catalog.md"


def test_the_committed_reference_is_what_the_models_generate() -> None:
    generated = subprocess.run(
        [sys.executable, "-m", "syncflow_dagster.catalog", "reference"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert DOC.read_text("utf-8") == generated, (
        "docs/catalog.md is stale: python -m syncflow_dagster.catalog reference > docs/catalog.md"
    )


def test_the_reference_names_every_key_and_field_type() -> None:
    text = DOC.read_text("utf-8")
    for model in (Catalog, CatalogDefaults, EntitySpec, FieldSpec, ParentRelation):
        for name in model.model_fields:
            assert f"| `{name}` |" in text, f"{model.__name__}.{name} is not in docs/catalog.md"
    for kind in FieldType:
        assert f"| `{kind.value}` |" in text
    assert "| `trim` | `true` \\| `false` | `true` |" in text  # the default a reader must see


def test_the_reference_example_is_a_valid_catalog_with_its_defaults_applied() -> None:
    from syncflow_dagster.catalog import parse_catalog

    text = DOC.read_text("utf-8")
    example = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert example is not None
    catalog = parse_catalog(example.group(1))
    assert catalog.entity("sites").field_by_target["name"].trim is False
    assert catalog.entity("sites").field_by_target["capacity"].decimal_precision == 9


def test_the_default_catalog_points_at_docs_that_exist() -> None:
    header = resources.files("syncflow_dagster.catalog").joinpath("default_catalog.yaml").read_text("utf-8")
    named = re.findall(r"docs/[\w./-]+\.md", header)
    assert named, "the default catalog's header names no doc"
    for doc in named:
        assert (ROOT / doc).is_file(), f"default_catalog.yaml points at {doc}, which does not exist"


def test_the_reference_command_refuses_other_arguments() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "syncflow_dagster.catalog", "nonsense"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "usage: python -m syncflow_dagster.catalog reference" in result.stderr


def test_the_packaged_catalog_states_its_string_handling() -> None:
    """Trimming is a choice the catalog states, not a default nobody saw."""
    from syncflow_dagster.catalog import load_catalog

    defaults = load_catalog().defaults
    assert (defaults.trim, defaults.nfc, defaults.empty_as_null) == (True, True, True)
    assert (defaults.rowversion, defaults.changed_at) == ("RowVersion", "ModifiedAt")
