"""The Dagster UI as a person uses it: the asset graph and a stage asset's partitions, in headless Chromium.

dagster-webserver runs the repository's workspace.yaml on loopback with a
Postgres-backed instance; Debian's chromium (scripts/install-chromium.sh),
driven by Playwright through `executable_path`, opens the pages. Nothing here
downloads a browser. Screenshots go to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from syncflow_dagster.catalog import default_catalog
from syncflow_dagster.defs.assets import STAGE_ASSETS as stage_asset_defs
from syncflow_dagster_tests.webserver import (
    ARTIFACTS_DIR,
    CHROMIUM,
    CODE_LOCATION,
    PAGE_TIMEOUT_MS,
    SET_NUX_SEEN,
    STAGE_ASSETS,
    WORKSPACE_YAML,
    DagsterDeployment,
    dagster_deployment,
    launch_chromium,
)

pytestmark = [pytest.mark.ui, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def webserver(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterDeployment]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: run scripts/install-chromium.sh (Debian's chromium package)")
    with dagster_deployment(
        server_database_url=database_url, dagster_home=tmp_path_factory.mktemp("dagster_home_ui")
    ) as deployment:
        deployment.graphql(SET_NUX_SEEN)
        yield deployment


@pytest.fixture
def page(webserver: DagsterDeployment) -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 900})
            context.set_default_timeout(PAGE_TIMEOUT_MS)
            yield context.new_page()
        finally:
            browser.close()


def _screenshot(page: Page, name: str) -> Path:
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    path = ARTIFACTS_DIR / name
    page.screenshot(path=str(path))
    return path


def test_workspace_is_the_repository_one() -> None:
    # The UI must load what operators load, not a test-only location.
    text = WORKSPACE_YAML.read_text()
    assert "syncflow_dagster.definitions" in text
    assert f"location_name: {CODE_LOCATION}" in text


def test_asset_graph_shows_the_nine_stage_assets(webserver: DagsterDeployment, page: Page) -> None:
    page.goto(f"{webserver.url}/locations/{CODE_LOCATION}/asset-groups/sync")
    # The group page renders the lineage graph (and its list); each asset is labelled by its key.
    for asset in STAGE_ASSETS:
        expect(page.get_by_text(asset, exact=True).first).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    # No stray dialog over the graph in the screenshot a reader will see.
    expect(page.get_by_role("dialog")).to_have_count(0)
    _screenshot(page, "dagster-asset-graph.png")


@pytest.mark.parametrize("asset", ["delta_plan", "committed"])
def test_a_stage_page_shows_its_description_and_its_checks(
    webserver: DagsterDeployment, page: Page, asset: str
) -> None:
    """What SyncFlow writes for the UI: the stage's description and the checks that judge it, by name."""
    (stage,) = [a for a in stage_asset_defs if a.key.to_user_string() == asset]
    description = next(iter(stage.specs)).description
    assert description
    (check,) = stage.check_specs  # each of these stages has one check; the page opens on it
    assert check.description
    page.goto(f"{webserver.url}/assets/{asset}")
    # The first words of the description, as the overview renders them (markdown keeps them whole).
    expect(page.get_by_text(description[:40]).first).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    page.goto(f"{webserver.url}/assets/{asset}?view=checks")
    # The name in full (the list may truncate it in the middle), what it checks, and whether it blocks.
    name = page.get_by_text(check.name, exact=True).filter(visible=True).first
    expect(name).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    expect(page.get_by_text(check.description[:40]).filter(visible=True).first).to_be_visible()
    blocking = page.get_by_text("blocking", exact=True).filter(visible=True)
    expect(blocking).to_have_count(1 if check.blocking else 0)


def test_stage_asset_partitions_page_shows_entity_and_date(webserver: DagsterDeployment, page: Page) -> None:
    page.goto(f"{webserver.url}/assets/extracted?view=partitions")
    # A multi-partitioned asset gets one column per dimension, each with its own filter box.
    expect(page.get_by_placeholder("Filter by entity…")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    expect(page.get_by_placeholder("Filter by date…")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    # Every catalog entity is a key of the entity dimension...
    for entity in default_catalog().topological_order:
        expect(page.get_by_text(entity, exact=True).first).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    # ...and today's (UTC) day is a key of the date dimension (end_offset=1 keeps today open).
    today = dt.datetime.now(dt.UTC).date().isoformat()
    expect(page.get_by_text(today, exact=True).first).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    # Nothing has run on this deployment: every entity × day is missing, none materialised or failed.
    expect(page.get_by_text("Materialized (0)")).to_be_visible()
    expect(page.get_by_text("Failed (0)")).to_be_visible()
    _screenshot(page, "dagster-extracted-partitions.png")


def test_materialize_dialog_selects_days_by_entities(webserver: DagsterDeployment, page: Page) -> None:
    """The launch dialog a person uses for a backfill: one selector per dimension, 3 days × all entities."""
    page.goto(f"{webserver.url}/locations/{CODE_LOCATION}/asset-groups/sync")
    page.get_by_text("Materialize all…").click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_text("Launch runs to materialize 9 assets")).to_be_visible(timeout=PAGE_TIMEOUT_MS)
    expect(dialog.get_by_text("date", exact=True)).to_be_visible()
    expect(dialog.get_by_text("entity", exact=True)).to_be_visible()

    today = dt.datetime.now(dt.UTC).date()
    first = (today - dt.timedelta(days=2)).isoformat()
    date_range = dialog.get_by_placeholder(re.compile(r"^ex: "))
    date_range.fill(f"[{first}...{today.isoformat()}]")
    date_range.press("Enter")
    # The entity dimension's "All" is the second "All" button (the first belongs to date).
    dialog.get_by_role("button", name="All", exact=True).nth(1).click()
    entities = len(default_catalog().topological_order)
    expect(dialog.get_by_text(f"{3 * entities} partitions", exact=True)).to_be_visible()
    expect(dialog.get_by_role("button", name="Launch backfill")).to_be_visible()
    _screenshot(page, "dagster-backfill-dialog.png")
