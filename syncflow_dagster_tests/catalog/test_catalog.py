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
            "{entity: sites, fields: [site_code]}",
            "{entity: sites, fields: [site_code], colour: red}",
            r"entity 'work_centers', parent 'sites', key colour: unknown key",
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


def test_ancestors_are_the_parents_parents_and_so_on_parents_first() -> None:
    catalog = load_catalog()
    assert catalog.ancestors_of("sites") == ()
    assert catalog.ancestors_of("sales_order_lines") == ("customers", "items", "sales_orders")
    # operations ← work_orders ← sales_order_lines ← sales_orders ← customers, and the other branches.
    assert catalog.ancestors_of("operations") == (
        "customers",
        "items",
        "sites",
        "sales_orders",
        "work_centers",
        "sales_order_lines",
        "work_orders",
    )


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


DEFAULTS_CATALOG = """
defaults: {rowversion: RV, changed_at: ChangedOn, trim: false, case: upper, timezone: Europe/Berlin}
entities:
  things:
    source: Things
    resource: things
    business_key: [code]
    fields:
      - {source: Code, target: code}
      - {source: Note, target: note, trim: true, case: none}
      - {source: Kind, target: kind, type: enum, values: [A, B]}
      - {source: At, target: at, type: datetime}
      - {source: Qty, target: qty, type: int}
  others:
    source: Others
    resource: others
    business_key: [code]
    rowversion: Version
    fields:
      - {source: Code, target: code}
"""


def test_defaults_fill_in_what_an_entity_or_field_does_not_say() -> None:
    catalog = parse_catalog(DEFAULTS_CATALOG)
    things, others = catalog.entity("things"), catalog.entity("others")
    assert (things.rowversion, things.changed_at) == ("RV", "ChangedOn")
    assert (others.rowversion, others.changed_at) == ("Version", "ChangedOn")  # its own wins
    field = things.field_by_target
    assert (field["code"].trim, field["code"].case.value) == (False, "upper")
    assert (field["note"].trim, field["note"].case.value) == (True, "none")  # its own wins
    assert (field["kind"].trim, field["kind"].case.value) == (False, "upper")  # enums have a string layer
    assert field["at"].timezone == "Europe/Berlin"
    assert field["code"].timezone == "UTC"  # timezone is a datetime default only
    # Without a block, the built-in defaults: the packaged catalog says nothing about trim.
    assert load_catalog().entity("sites").field_by_target["name"].trim is True


def test_defaults_change_the_data_as_the_reference_says() -> None:
    import pyarrow as pa

    from syncflow_dagster.engine.normalize import normalize

    catalog = parse_catalog(DEFAULTS_CATALOG)
    raw = pa.table(
        {
            "Code": ["  ab "],
            "Note": ["  x "],
            "Kind": ["a"],
            "At": ["2024-01-01T12:00:00"],
            "Qty": ["1"],
            "RV": [1],
            "ChangedOn": ["2024-01-01T00:00:00Z"],
        }
    )
    row = normalize(catalog.entity("things"), raw).rows.to_pylist()[0]
    assert row["code"] == "  AB "  # trim: false keeps the spaces
    assert row["note"] == "x"
    assert row["at"].hour == 11  # naive, read in Europe/Berlin


@pytest.mark.parametrize(
    ("defaults", "expected"),
    [
        ("{trim: maybe}", "key defaults.trim: Input should be a valid boolean"),
        ("{stripping: true}", "key defaults.stripping: unknown key"),
        ("{rowversion: 'bad name'}", "key defaults.rowversion: source name 'bad name' is not a plain name"),
    ],
)
def test_a_wrong_defaults_block_is_refused_naming_the_key(defaults: str, expected: str) -> None:
    with pytest.raises(CatalogError, match=expected):
        parse_catalog(f"defaults: {defaults}\n" + DEFAULTS_CATALOG.split("\n", 2)[2])


def test_precision_is_digits_for_decimals_and_a_unit_for_datetimes() -> None:
    def entity(field: str) -> str:
        return (
            "entities:\n  t:\n    source: T\n    resource: t\n    business_key: [k]\n    fields:\n"
            f"      - {{source: K, target: k}}\n      - {field}\n"
        )

    spec = parse_catalog(entity("{source: P, target: p, type: decimal, scale: 2, precision: 6}")).entity("t")
    assert spec.field_by_target["p"].decimal_precision == 6
    stamp = parse_catalog(entity("{source: P, target: p, type: datetime, precision: s}")).entity("t")
    assert stamp.field_by_target["p"].datetime_precision.value == "s"
    for field, expected in [
        ("{source: P, target: p, type: decimal, scale: 2, precision: ms}", "applies to datetime fields"),
        ("{source: P, target: p, type: datetime, precision: 6}", "applies to decimal fields"),
        ("{source: P, target: p, type: decimal, scale: 4, precision: 3}", "at least the scale"),
        ("{source: P, target: p, type: decimal, scale: 2, precision: 39}", "must be 1..38"),
    ]:
        with pytest.raises(CatalogError, match=expected):
            parse_catalog(entity(field))
