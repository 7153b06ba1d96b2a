"""The catalog: the default loads and is realistic; a wrong catalog is refused by name."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from syncflow_dagster.catalog import CATALOG_PATH_ENV, CatalogError, load_catalog, parse_catalog
from syncflow_dagster.catalog.models import DeletePolicy, FieldType

GOOD = """
entities:
  sites:
    source: Sites
    resource: sites
    business_key: [site_code]
    fields:
      - {source: SiteCode, target: site_code, required: true}
      - {source: Name, target: name}
  work_centers:
    source: WorkCenters
    resource: work_centers
    business_key: [site_code, code]
    fields:
      - {source: Site, target: site_code, required: true}
      - {source: Code, target: code, required: true}
    parents:
      - {entity: sites, fields: [site_code]}
"""


def _depth(catalog, name: str) -> int:
    entity = catalog.entity(name)
    return 1 + max((_depth(catalog, p) for p in entity.parent_entities), default=0)


def test_default_catalog_is_a_realistic_manufacturing_erp() -> None:
    catalog = load_catalog()
    assert len(catalog.entities) >= 7
    assert max(_depth(catalog, e.name) for e in catalog.entities) >= 3
    assert any(len(e.business_key) > 1 for e in catalog.entities), "no composite business key"
    order = catalog.topological_order
    for entity in catalog.entities:
        for parent in entity.parent_entities:
            assert order.index(parent) < order.index(entity.name), (parent, entity.name)
    types = {f.type for e in catalog.entities for f in e.fields}
    assert types == set(FieldType), f"the default catalog should exercise every type, has {types}"
    assert {e.delete_policy for e in catalog.entities} >= {DeletePolicy.TOMBSTONES, DeletePolicy.RECONCILE}


def test_catalog_from_environment_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(GOOD)
    monkeypatch.setenv(CATALOG_PATH_ENV, str(path))
    catalog = load_catalog()
    assert catalog.topological_order == ("sites", "work_centers")
    assert catalog.entity("work_centers").business_key == ("site_code", "code")
    assert catalog.children_of("sites") == ("work_centers",)


def test_missing_catalog_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=r"cannot read catalog .*nope\.yaml"):
        load_catalog(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "{source: Name, target: name}",
            "{source: Name, target: name, colour: red}",
            r"entity 'sites', field 'Name', key colour: unknown key",
        ),
        (
            "resource: work_centers",
            "resource: work_centers\n    ownr: me",
            r"entity 'work_centers', key ownr: unknown key",
        ),
        (
            "{entity: sites, fields: [site_code]}",
            "{entity: plants, fields: [site_code]}",
            r"entity 'work_centers', parent FK \['site_code'\]: unknown entity 'plants'",
        ),
        (
            "business_key: [site_code, code]",
            "business_key: [site_code, wc_code]",
            r"entity 'work_centers'.*business key field 'wc_code' is not the target of any field mapping",
        ),
        (
            "{source: Name, target: name}",
            "{source: Name, target: site_code}",
            r"entity 'sites'.*field 'Name': target 'site_code' is already the target of field 'SiteCode'",
        ),
        (
            "{source: Name, target: name}",
            "{source: Name, target: name, type: decimal}",
            r"entity 'sites', field 'Name'.*decimal field needs a fixed 'scale'",
        ),
        (
            "{source: Name, target: name}",
            '{source: Name, target: "name; DROP TABLE x"}',
            r"entity 'sites', field 'Name', key target.*must be lower-case letters",
        ),
    ],
)
def test_wrong_catalog_is_refused_naming_entity_and_field(old: str, new: str, expected: str) -> None:
    assert old in GOOD
    with pytest.raises(CatalogError, match=expected):
        parse_catalog(GOOD.replace(old, new, 1))


def test_cycle_in_parent_graph_is_refused() -> None:
    text = GOOD + textwrap.indent(
        textwrap.dedent(
            """
            a:
              source: A
              resource: a
              business_key: [k]
              fields: [{source: K, target: k}, {source: B, target: b}]
              parents: [{entity: b, fields: [b]}]
            b:
              source: B
              resource: b
              business_key: [k]
              fields: [{source: K, target: k}, {source: A, target: a}]
              parents: [{entity: a, fields: [a]}]
            """
        ),
        "  ",
    )
    with pytest.raises(CatalogError, match=r"cycle in the parent graph among entities: a → b"):
        parse_catalog(text)


def test_injection_in_entity_name_is_refused() -> None:
    with pytest.raises(CatalogError, match=r"must be lower-case letters"):
        parse_catalog(GOOD.replace("  sites:\n", '  "sites; drop schema syncflow":\n', 1))


def test_fk_arity_must_match_parent_key() -> None:
    bad = GOOD.replace("{entity: sites, fields: [site_code]}", "{entity: sites, fields: [site_code, code]}")
    with pytest.raises(CatalogError, match=r"entity 'work_centers'.*FK fields \['site_code', 'code'\]"):
        parse_catalog(bad)


def test_invalid_yaml_is_one_clear_error() -> None:
    with pytest.raises(CatalogError, match="not valid YAML"):
        parse_catalog("entities: [unclosed")
