"""scripts/trace-signals.py turns a tracefs signal_generate line into who signalled whom (docs/testing.md)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "trace-signals.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("trace_signals", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_trace_line_names_sender_and_target_with_their_command_lines() -> None:
    trace = _script()
    me = os.getpid()
    # The kernel's format (trace_pipe), sender this process, target a pid no process has (pid_max is at most 2**22).
    line = (
        f"          python-{me}    [001] d..1. 80731.112233: signal_generate: sig=15 errno=0 code=0 "
        f"comm=dagster-daemon pid=4194305 grp=1 res=0\n"
    )
    entry = trace.entry(line)
    assert f"sig=15 grp=1 res=0 from python[{me}] ppid={os.getppid()} " in entry
    command = Path("/proc/self/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert command[:100] in entry.split(" -> ")[0]
    assert entry.endswith("-> dagster-daemon[4194305] (gone)")


def test_a_line_it_cannot_read_is_kept_whole() -> None:
    assert "UNPARSED # tracer: nop" in _script().entry("# tracer: nop\n")
