"""docs/adding-an-entity.md walked literally: every bash block runs as written, every file block is written
from the doc, and the new entity's records end up in ScheduleHub as the doc says.

The walk (in an empty folder, the user's shell being bash with the venv's `syncflow` on PATH):
- `<!-- walk: file NAME -->` before a fenced block: the block's text is written to NAME;
- `<!-- walk: background URL -->` before a bash block: it is started and left running until URL
  answers (any HTTP status), and stopped with SIGINT (Ctrl-C) before the next background block and at
  the end: a server the doc tells you to start in its own terminal;
- any other bash block: run with `bash -e`, it must exit 0.
The only change to the doc's text: its default ports (3000, 8080, 8001, 8002) become free ones, as
`syncflow dev`/`simulate` options and in the URLs, so the walk cannot meet another process's port.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from syncflow_dagster_tests import loopback_http
from syncflow_dagster_tests.isolation import free_port
from syncflow_dagster_tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "adding-an-entity.md"
STEP_TIMEOUT_S = 600
START_TIMEOUT_S = 300
STOP_TIMEOUT_S = 180

_BLOCK = re.compile(r"(?:<!-- walk: (?P<note>[^>]*?) -->\n)?```(?P<lang>\w+)\n(?P<body>.*?)```", re.S)


@dataclass(frozen=True)
class Step:
    kind: str  # "file", "background" or "run"
    text: str
    target: str = ""  # the file's name, or the URL that answers once a background step is up


def doc_steps(text: str) -> list[Step]:
    steps = []
    for match in _BLOCK.finditer(text):
        note, lang, body = match.group("note") or "", match.group("lang"), match.group("body")
        if note.startswith("file "):
            steps.append(Step("file", body, note.removeprefix("file ").strip()))
        elif lang == "bash" and note.startswith("background "):
            steps.append(Step("background", body, note.removeprefix("background ").strip()))
        elif lang == "bash":
            steps.append(Step("run", body))
        else:
            raise AssertionError(f"a {lang} block with no walk note: the walk would skip it:\n{body}")
    return steps


def test_the_doc_is_all_walkable_steps() -> None:
    steps = doc_steps(DOC.read_text("utf-8"))
    kinds = [step.kind for step in steps]
    assert kinds.count("file") == 3
    assert kinds.count("background") == 2
    assert "syncflow dev" in next(s.text for s in steps if s.kind == "background" and "dev" in s.text)


def test_the_docs_example_error_is_what_check_says(tmp_path: Path) -> None:
    """The mistake the doc quotes is the one `syncflow catalog check` reports for its block without `Site`."""
    from syncflow_dagster.catalog.loader import check_catalog

    text = DOC.read_text("utf-8")
    block = next(s.text for s in doc_steps(text) if s.target == "suppliers.yaml")
    quoted = re.search(r"`error: catalog my_catalog\.yaml: (entity 'suppliers'[^`]*)`", text)
    assert quoted is not None
    packaged = (ROOT / "syncflow_dagster" / "catalog" / "default_catalog.yaml").read_text("utf-8")
    without_site = "\n".join(line for line in block.splitlines() if "source: Site," not in line) + "\n"
    catalog, problems = check_catalog(packaged + without_site)
    assert catalog is None
    assert problems == [quoted.group(1)]


def _ports() -> dict[str, int]:
    return {"3000": free_port(), "8080": free_port(), "8001": free_port(), "8002": free_port()}


def _with_ports(text: str, ports: dict[str, int]) -> str:
    text = text.replace(
        "syncflow dev ",
        f"syncflow dev --port {ports['3000']} --api-port {ports['8080']} "
        f"--apismith-port {ports['8001']} --schedulehub-port {ports['8002']} ",
    )
    text = text.replace("syncflow simulate apismith ", f"syncflow simulate apismith --port {ports['8001']} ")
    return re.sub(r"127\.0\.0\.1:(3000|8080|8001|8002)\b", lambda m: f"127.0.0.1:{ports[m.group(1)]}", text)


def _answers(url: str, process: subprocess.Popen[bytes], log: Path) -> bool:
    if process.poll() is not None:
        pytest.fail(f"exited with {process.returncode}: {log.read_text(errors='replace')[-3000:]}")
    try:
        loopback_http.get(url, timeout=5)
    except httpx.HTTPError:
        return False
    return True


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Ctrl-C, as the user stops a server in its terminal; killed only if it does not end."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.daemon
def test_adding_an_entity_walked_literally(tmp_path: Path, pg_server_url: str) -> None:
    from syncflow_dagster_tests.conftest import scratch_database

    work = tmp_path / "walk"
    work.mkdir()
    ports = _ports()
    steps = doc_steps(_with_ports(DOC.read_text("utf-8"), ports))
    venv_bin = str(Path(sys.executable).parent)
    # A shell that knows nothing of SyncFlow: the venv on PATH, a Postgres server for dev to use
    # (instead of starting an embedded one, which only costs time here).
    bare = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SYNCFLOW_", "APISMITH_", "SCHEDULEHUB_", "DAGSTER_"))
    }
    bare["PATH"] = f"{venv_bin}{os.pathsep}{bare.get('PATH', '')}"
    with scratch_database(pg_server_url) as state_url, scratch_database(pg_server_url) as dagster_url:
        shell = {**bare, "SYNCFLOW_DATABASE_URL": state_url, "DAGSTER_POSTGRES_URL": dagster_url}
        running: list[subprocess.Popen[bytes]] = []
        try:
            for index, step in enumerate(steps):
                if step.kind == "file":
                    path = work / step.target
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(step.text, "utf-8")
                    continue
                log = tmp_path / f"step{index}.log"
                if step.kind == "background":
                    while running:
                        _stop(running.pop())
                    with log.open("wb") as out:
                        process = subprocess.Popen(
                            ["bash", "-e", "-c", step.text],
                            cwd=work,
                            env=shell,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    running.append(process)
                    wait_until(
                        lambda p=process, u=step.target, lg=log: _answers(u, p, lg),
                        f"step {index} ({step.text.strip()}) to answer on {step.target}",
                        timeout_s=START_TIMEOUT_S,
                        interval_s=1,
                    )
                    continue
                result = subprocess.run(
                    ["bash", "-e", "-c", step.text],
                    cwd=work,
                    env=shell,
                    capture_output=True,
                    timeout=STEP_TIMEOUT_S,
                    check=False,
                )
                assert result.returncode == 0, (
                    f"step {index} failed ({result.returncode}):\n{step.text}\n"
                    f"{result.stdout.decode(errors='replace')[-3000:]}\n{result.stderr.decode(errors='replace')[-3000:]}"
                )
            _the_suppliers_are_in_schedulehub_as_the_doc_says(work)
            # Quiet by default: dev's terminal had its runs' INFO lines, none of their DEBUG events.
            dev_log = next(
                tmp_path / f"step{i}.log"
                for i, s in enumerate(steps)
                if s.kind == "background" and "syncflow dev" in s.text
            ).read_text(errors="replace")
            dev_log = re.sub(r"\x1b\[[0-9;]*m", "", dev_log)  # Dagster colours its levels
            assert " - INFO - " in dev_log
            assert " - DEBUG - " not in dev_log, [
                line for line in dev_log.splitlines() if " - DEBUG - " in line
            ][:5]
        finally:
            while running:
                _stop(running.pop())


def _env_file(path: Path) -> dict[str, str]:
    out = subprocess.run(
        ["bash", "-c", f"set -a; source {path}; env -0"], env={}, capture_output=True, check=True, timeout=30
    ).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def _the_suppliers_are_in_schedulehub_as_the_doc_says(work: Path) -> None:
    env = _env_file(work / ".syncflow-dev" / "env")
    base = env["SCHEDULEHUB_BASE_URL"]
    token = loopback_http.post(
        f"{base}/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": env["SCHEDULEHUB_CLIENT_ID"],
            "client_secret": env["SCHEDULEHUB_CLIENT_SECRET"],
        },
        timeout=30,
    ).json()["access_token"]
    page = loopback_http.get(
        f"{base}/v1/resources/suppliers/records",
        params={"limit": 100},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    ).json()
    records = {r["external_key"]: r for r in page["records"]}
    assert sorted(records) == ["S-100", "S-200", "S-300"]
    attributes = {key: record["attributes"] for key, record in records.items()}
    assert attributes["S-100"]["since"].startswith("2021-07-15T00:00:00")
    assert attributes["S-200"]["since"].startswith("2019-03-01T07:30:00")
    assert str(attributes["S-200"]["rating"]) in ("3.2", "3.20")
    assert records["S-300"]["references"] == {"sites": "BER"}
