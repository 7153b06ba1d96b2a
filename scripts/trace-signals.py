#!/usr/bin/env python3
"""Log every SIGHUP, SIGINT and SIGTERM the kernel generates, with sender's and target's command lines.

For a test run where a process stopped "by itself" (docs/testing.md, series 3
run 5: a dagster-daemon logged "Received interrupt" with nothing in its
deployment signalling it). Root only: it turns on the tracefs event
signal:signal_generate and reads trace_pipe until stopped (Ctrl-C or SIGTERM),
then turns the event off again.

    sudo python3 scripts/trace-signals.py /tmp/signals.log &
    make test
    kill %1; grep -i daemon /tmp/signals.log

A sender that has already exited shows as "(gone)"; its parent is then the
next line's or the one before's sender, most often.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

TRACING = Path("/sys/kernel/tracing")
EVENT = TRACING / "events/signal/signal_generate"
LINE = re.compile(
    r"^\s*(?P<sender>.+?)-(?P<spid>\d+)\s+\[.*signal_generate: sig=(?P<sig>\d+) errno=\d+ code=\S+ "
    r"comm=(?P<target>.+?) pid=(?P<tpid>\d+) grp=(?P<grp>\d) res=(?P<res>\d)"
)


def describe(pid: str) -> str:
    """`ppid=N command line` of a live process, or "(gone)"."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    except OSError:
        return "(gone)"
    return f"ppid={ppid} {command[:300]}"


def entry(line: str) -> str:
    """One log line for one trace line."""
    m = LINE.match(line)
    if not m:
        return f"{time.strftime('%H:%M:%S')} UNPARSED {line.rstrip()}"
    return (
        f"{time.strftime('%H:%M:%S')} sig={m['sig']} grp={m['grp']} res={m['res']} "
        f"from {m['sender']}[{m['spid']}] {describe(m['spid'])} -> {m['target']}[{m['tpid']}] {describe(m['tpid'])}"
    )


def main(out_path: str) -> None:
    if not TRACING.joinpath("events").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACING)], check=True)
    EVENT.joinpath("filter").write_text("sig == 1 || sig == 2 || sig == 15")
    EVENT.joinpath("enable").write_text("1")
    TRACING.joinpath("tracing_on").write_text("1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        with (TRACING / "trace_pipe").open() as pipe, open(out_path, "a", buffering=1) as out:
            for line in pipe:
                out.write(entry(line) + "\n")
    except KeyboardInterrupt:
        pass
    finally:
        EVENT.joinpath("enable").write_text("0")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: trace-signals.py LOG_FILE")
    main(sys.argv[1])
