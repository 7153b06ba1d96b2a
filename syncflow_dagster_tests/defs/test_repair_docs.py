"""The repair and checks docs against the code: every name they use is read from it.

docs/ui.md's table of checks is generated from the Definitions (rerun with
SYNCFLOW_WRITE_DOCS=1 to rewrite it); docs/operations.md's "Repairing
ScheduleHub" names the command, its options, the run tag, the job, the check,
its config and the API flag, each checked here.
"""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import yaml

from syncflow_dagster.cli.dev import APISMITH_AS_OF_FILE, SCHEDULEHUB_DIR
from syncflow_dagster.definitions import defs
from syncflow_dagster.defs import audit
from syncflow_dagster.defs.assets import RESYNC_TAG
from syncflow_dagster.defs.audit import AUDIT_CHECK, AuditConfig
from syncflow_dagster.defs.checks import failed_rows_hint
from syncflow_dagster.engine import stage_table
from syncflow_dagster.service.models import SyncRequest
from syncflow_dagster_tests.cli_runner import run_syncflow

DOCS = Path(__file__).resolve().parents[2] / "docs"
BEGIN, END = "<!-- checks: generated from the Definitions -->", "<!-- checks: end -->"


def _section(doc: str, title: str) -> str:
    text = (DOCS / doc).read_text()
    start = text.index(f"## {title}\n")
    following = text.find("\n## ", start + 1)
    return text[start : following if following != -1 else len(text)]


def checks_markdown() -> str:
    graph = defs.get_repository_def().asset_graph
    specs = sorted(
        (graph.get_check_spec(key) for key in graph.asset_check_keys),
        key=lambda s: (graph.toposorted_asset_keys.index(s.asset_key), s.name),
    )
    lines = ["| check | on asset | per partition | blocking | what it says |", "|---|---|---|---|---|"]
    for spec in specs:
        per_partition = "yes" if spec.partitions_def is not None else "no (whole entities)"
        blocking = "yes" if spec.blocking else "no"
        lines.append(
            f"| `{spec.name}` | `{spec.asset_key.to_user_string()}` | {per_partition} | {blocking} "
            f"| {spec.description} |"
        )
    return "\n".join(lines)


def test_the_checks_table_in_ui_md_is_generated_from_the_definitions() -> None:
    path = DOCS / "ui.md"
    text = path.read_text()
    assert BEGIN in text, f"docs/ui.md lacks the {BEGIN} ... {END} block"
    assert END in text, f"docs/ui.md lacks the {BEGIN} ... {END} block"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    expected = f"{head}{BEGIN}\n{checks_markdown()}\n{END}{tail}"
    if os.environ.get("SYNCFLOW_WRITE_DOCS") == "1":
        path.write_text(expected)
    assert text == expected, "docs/ui.md's checks table is stale: rerun this test with SYNCFLOW_WRITE_DOCS=1"


def test_the_repair_section_names_what_the_code_has() -> None:
    section = _section("operations.md", "Repairing ScheduleHub")
    repository = defs.get_repository_def()
    # The run tag, the job, the check, the hint of the failed-rows check.
    assert f"`{RESYNC_TAG}=true`" in section
    assert "`target_audit`" in section
    repository.get_job("target_audit")
    assert f"`{AUDIT_CHECK}`" in section
    assert failed_rows_hint("ENTITY").rsplit(" ", 1)[0] in section
    # POST /sync's flag.
    assert '"resync": true' in section
    assert "resync" in SyncRequest.model_fields
    # The audit's run config, as written in the doc, is valid config of the job.
    (block,) = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    run_config = yaml.safe_load(block)
    ((op_name, op_config),) = run_config["ops"].items()
    assert op_name in repository.get_job("target_audit").graph.node_names()
    AuditConfig.model_validate(op_config["config"])
    assert set(op_config["config"]) == set(AuditConfig.model_fields)
    # The metadata and stage names the section promises are the ones the audit writes.
    source = inspect.getsource(audit)
    for name in ("missing_in_target", "extra_in_target", "differing", "not_in_source"):
        assert f"`{name}`" in section, name
        assert f'"{name}"' in source, name
    # The repair's stage event is the stage table's, booked by the one maintenance batch runner.
    assert f"`{stage_table.TARGET_REPAIR.name}`" in section
    assert re.search(r"pipeline\.run_batch\(\s*st\.TARGET_REPAIR,", source)


def test_troubleshooting_names_dev_s_files() -> None:
    text = (DOCS / "troubleshooting.md").read_text()
    assert f"<home>/{APISMITH_AS_OF_FILE}" in text
    assert f"<home>/{SCHEDULEHUB_DIR}" in text


def test_the_resync_usage_line_lists_the_command_s_options() -> None:
    section = _section("operations.md", "The commands")
    (usage,) = re.findall(r"`(syncflow resync [^`]*)`", section)
    written = set(re.findall(r"--[a-z-]+", usage))
    helped = run_syncflow("resync", "--help", env={"NO_COLOR": "1", "TERM": "dumb"})
    assert helped.returncode == 0, helped.stderr
    offered = set(re.findall(r"--[a-z][a-z-]+", helped.stdout)) - {"--help"}
    assert written == offered
