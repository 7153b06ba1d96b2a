"""The history benchmark's run-worker memory figure is the kernel's peak, not the RSS at a sample."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import psutil
import pytest

from benchmarks import history

ALLOCATE_MB = 300
# A child that touches ALLOCATE_MB, frees it and idles: sampled only after the free, its RSS
# is small, while its VmHWM still holds the spike.
SPIKE = (
    f"b = bytearray({ALLOCATE_MB} * 2**20)\n"
    "b[::4096] = b'x' * len(b[::4096])\n"
    "del b\n"
    "print('freed', flush=True)\n"
    "import sys; sys.stdin.read()\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is read from /proc")
def test_a_spike_between_samples_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", SPIKE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "freed"
        assert psutil.Process(child.pid).memory_info().rss < ALLOCATE_MB / 2 * 2**20
        monkeypatch.setattr(
            "syncflow_dagster.deploy.run_launcher.run_worker_pid", lambda instance, run_id: (child.pid,)
        )
        memory = history.WorkerMemory(instance=None, run_id="spike")
        deadline = time.monotonic() + 30
        while memory.pid is None and time.monotonic() < deadline:
            threading.Event().wait(0.1)
        threading.Event().wait(2 * history.SAMPLE_S)
        peak = memory.stop()
    finally:
        child.kill()
        child.wait()
    assert memory.pid == child.pid
    assert peak >= ALLOCATE_MB
