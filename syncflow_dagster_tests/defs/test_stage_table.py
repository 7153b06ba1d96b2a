"""The stage table (engine/stage_table.py) against the code, and the code and docs against the table.

One name per stage in events, the API, the metrics and the report; the asset
key in one place; one set of count names. These tests hold it: the assets are
the table's rows in its order, each stage function exists, no stage name or
asset key is spelt as a literal elsewhere in the package, stage events with a
name or count the table does not list are refused, and docs/architecture.md
shows the table as the code has it.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import dagster as dg
import pytest

from syncflow_dagster.defs.assets import STAGE_ASSETS
from syncflow_dagster.engine import columns as c
from syncflow_dagster.engine import stage_table as st
from syncflow_dagster.service.models import BatchMetrics
from syncflow_dagster.service.store_views import BATCH_METRICS

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "syncflow_dagster"
DOCS = ROOT / "docs"

# Literals that equal a stage name or an asset key but mean something else: a homonym
# is not a second spelling of the stage. (`rowversion` the source column and catalog
# field; `normalized`, `identified`, `delivered`, `committed` the counts; `resolved` and
# `delivered` states of a failed record.)
HOMONYMS = {"rowversion", "normalized", "identified", "delivered", "committed", "resolved"}
# (file, literal): a heading that happens to read like a stage name.
ALLOWED = {("cli/ops.py", "fetch")}


def test_the_table_has_nine_stages_each_named_once() -> None:
    assert [s.number for s in st.STAGES] == list(range(1, 10))
    names = [s.name for s in st.STAGES]
    assets = [s.asset for s in st.STAGES]
    assert len(set(names)) == len(set(assets)) == 9
    assert not set(names) & {j.name for j in st.JOB_EVENTS}
    assert all(re.fullmatch(r"[a-z][a-z_]*", n) for n in names + assets)
    assert st.BY_NAME["parent_child"] is st.PARENT_CHILD
    assert st.BY_ASSET["resolved"] is st.PARENT_CHILD


def test_each_stage_function_exists_and_is_named_for_its_stage() -> None:
    for stage in st.STAGES:
        if stage.function is None:
            assert stage is st.REPORT  # the report's work is the batch close (bookkeeping.finish_from_events)
            continue
        # parent-child's kernel resolves one chunk's parents; releasing parked children is
        # once per stage (streamed.parent_child), so no function runs the whole stage on a frame.
        module, name = stage.function.split(".")
        assert name == ("resolve_parents" if stage is st.PARENT_CHILD else f"{stage.name}_stage")
        assert callable(getattr(importlib.import_module(f"syncflow_dagster.defs.{module}"), name))


def test_the_assets_are_the_tables_rows_in_its_order_each_reading_the_one_before() -> None:
    assert [a.key.to_user_string() for a in STAGE_ASSETS] == [s.asset for s in st.STAGES]
    for asset, stage in zip(STAGE_ASSETS, st.STAGES, strict=True):
        key = dg.AssetKey(stage.asset)
        assert asset.descriptions_by_key[key] == f"{stage.number} · {stage.name}: {stage.description}"
        upstream = {k.to_user_string() for k in asset.asset_deps[key]}
        previous = st.STAGES[stage.number - 2].asset if stage.number > 1 else None
        assert upstream == ({previous} if previous else set())


def test_count_names_are_one_vocabulary() -> None:
    # The delta stage counts its actions under the action names the frame carries.
    assert set(c.ACTIONS) <= set(st.DELTA.counts)
    assert tuple(n for s in st.STAGES for n in s.counts) == st.BATCH_COUNTS
    everything = [n for s in st.STAGES for n in s.reports]
    assert len(everything) == len(set(everything)), "a count name reported by two stages"
    # The API's batch metrics are the table's batch counts, field for field.
    assert BATCH_METRICS == st.BATCH_COUNTS
    assert set(st.BATCH_COUNTS) <= set(BatchMetrics.model_fields)
    assert not {"inserted", "updated", "deleted", "skipped"} & set(BatchMetrics.model_fields)


def test_a_stage_event_outside_the_table_is_refused() -> None:
    st.check_counts("delta", {"insert": 1, "skip": 2, "duplicates": 0})
    st.check_counts("retry", {"retried": 1, "delivered": 1, "pending": 0})
    with pytest.raises(ValueError, match=r"stage 'delta' reports counts \['inserted'\]"):
        st.check_counts("delta", {"inserted": 1})
    with pytest.raises(ValueError, match="stage event 'identified' is not in the stage table"):
        st.check_counts("identified", {})


def _count_keys(function: ast.FunctionDef) -> set[str]:
    """The count names a stage function writes: `counts = {...}`, `StageResult(frame, {...})`, `counts[...] =`."""
    keys: set[str] = set()

    def of(node: ast.expr) -> None:
        if isinstance(node, ast.Dict):
            keys.update(
                k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)
            )

    for node in ast.walk(function):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id == "counts":
                    of(node.value)
                named = isinstance(target, ast.Subscript) and (
                    (isinstance(target.value, ast.Name) and target.value.id == "counts")
                    or (isinstance(target.value, ast.Attribute) and target.value.attr == "counts")
                )
                if named and isinstance(target.slice, ast.Constant):
                    keys.add(str(target.slice.value))
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "StageResult"
            and len(node.args) > 1
        ):
            of(node.args[1])
    return keys


def test_the_stage_functions_report_only_the_tables_counts() -> None:
    """Each whole-frame stage's counts (read from its source) are among its row's."""
    # Stages whose counts come from a helper they call (in the same module).
    helpers = {"stages.rowversion_stage": ["fresh_with_stored"]}
    for stage in st.STAGES:
        if stage.function is None:
            continue
        module, function = stage.function.split(".")
        source = ast.parse((PACKAGE / "defs" / f"{module}.py").read_text("utf-8"))
        functions = {n.name: n for n in ast.walk(source) if isinstance(n, ast.FunctionDef)}
        keys: set[str] = set()
        for name in [function, *helpers.get(stage.function, [])]:
            keys |= _count_keys(functions[name])
        if stage is st.DELTA:
            keys |= set(c.ACTIONS)  # counted per action: {action: 0 for action in c.ACTIONS}
        assert keys, stage.name
        assert keys <= set(stage.reports), (stage.name, sorted(keys - set(stage.reports)))


def _literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text("utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
        ):
            docstrings.add(id(body[0].value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_no_stage_name_or_asset_key_is_spelt_outside_the_table() -> None:
    spelt = {s.name for s in st.STAGES} | {s.asset for s in st.STAGES} | {j.name for j in st.JOB_EVENTS}
    # Job event names are also batch kinds and job names (`retry`, `reconcile`): only the
    # stage names and asset keys are held to one spelling here.
    spelt -= {j.name for j in st.JOB_EVENTS}
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative == "engine/stage_table.py":
            continue
        for line, value in _literals(path):
            if value in spelt and value not in HOMONYMS and (relative, value) not in ALLOWED:
                offences.append(f"{relative}:{line} spells {value!r}; use engine/stage_table.py")
    assert offences == []


def _render_stages() -> str:
    def code(names: tuple[str, ...]) -> str:
        return ", ".join(f"`{n}`" for n in names) or "—"

    lines = [
        "| # | stage (events, API, metrics, report, logs) | asset key | stage function (in `defs/`) "
        "| counts (batch columns) | other counts (event detail) | what it does |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in st.STAGES:
        function = (s.function,) if s.function else ()
        lines.append(
            f"| {s.number} | `{s.name}` | `{s.asset}` | {code(function)} | "
            f"{code(s.counts)} | {code(s.detail_counts)} | {s.description} |"
        )
    return "\n".join(lines)


def _render_jobs() -> str:
    lines = ["| job event | its own counts | with the counts of the stages |", "|---|---|---|"]
    for j in st.JOB_EVENTS:
        own = ", ".join(f"`{n}`" for n in j.own_counts)
        lines.append(f"| `{j.name}` | {own} | {', '.join(f'`{s.name}`' for s in j.stages)} |")
    return "\n".join(lines)


def _block(text: str, marker: str) -> str:
    found = re.search(rf"<!-- {marker}:[^\n]*-->\n(.*?)\n<!-- /{marker} -->", text, re.S)
    assert found, f"docs/architecture.md has no {marker} block"
    return found.group(1)


def test_architecture_doc_shows_the_stage_table_as_the_code_has_it() -> None:
    text = (DOCS / "architecture.md").read_text("utf-8")
    assert _block(text, "stage-table") == _render_stages(), "regenerate the block:\n" + _render_stages()
    assert _block(text, "job-events") == _render_jobs(), "regenerate the block:\n" + _render_jobs()


def _listed(line: str) -> list[str]:
    """The comma-separated words of a doc line's list, code marks dropped."""
    return [w.strip(" `.") for w in line.split(",")]


def test_operations_doc_names_the_tables_counts() -> None:
    text = (DOCS / "operations.md").read_text("utf-8")
    api = next(line for line in text.splitlines() if line.startswith("| `GET /sync/{run_id}` |"))
    listed = re.search(r"`kind`, (.*?), `counts`", api)
    assert listed, api
    assert tuple(_listed(listed.group(1))) == st.BATCH_COUNTS
    metrics = next(line for line in text.splitlines() if line.startswith("| `syncflow_rows_total` |"))
    named = re.search(r"\"The stage table\": (.*?), \.\.\.\)", metrics)
    assert named, metrics
    known = {n for counts in st.EVENT_COUNTS.values() for n in counts}
    assert set(_listed(named.group(1))) <= known
    stages_line = next(
        line for line in text.splitlines() if line.startswith("| `syncflow_stage_seconds_total` |")
    )
    assert all(f"`{s.name}`" in stages_line for s in st.STAGES[:-1])


def test_no_doc_names_the_old_count_vocabulary() -> None:
    """`inserted`/`updated`/`deleted`/`skipped` were the API's aliases; only the change-set counts of the
    APISmith stand-in (its own admin contract) still use them."""
    offences = []
    for path in [*DOCS.glob("*.md"), ROOT / "README.md"]:
        if path.name == "benchmarks.md":
            continue  # measurements as they were recorded
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if re.search(
                r"action=\"(inserted|updated|deleted|skipped)\"|`(inserted|updated|deleted|skipped)`", line
            ):
                offences.append(f"{path.name}:{number}: {line.strip()[:120]}")
    assert offences == []


def test_ui_doc_names_the_asset_keys_in_order_and_how_descriptions_open() -> None:
    text = (DOCS / "ui.md").read_text("utf-8")
    chain = " → ".join(s.asset for s in st.STAGES)
    assert chain in " ".join(text.split())
    for stage in (st.IDENTITY, st.PARENT_CHILD):
        assert f"`{stage.title}` on `{stage.asset}`" in text
