"""Signalling the process group or session a child led, without reaching a stranger.

A child started with `start_new_session=True` leads a session and a process
group whose ids are its pid. Linux keeps a pid number taken while any process
has it as its pid, its group id or its session id. Once the child has been
reaped (`Popen.poll` or `wait` saw it exit) and the last member of its group and
session has gone, the number is free, and on a busy host it comes round again
within minutes (`/proc/sys/kernel/pid_max` is 32768 by default; a test suite
goes through that many in a few minutes). From then on `killpg(child.pid)`, or
"every process of session child.pid", reaches whichever process got the number
next and the group or session it leads.

So a group or session id is used only while it is still the child's: while the
child is unreaped, or, once reaped, while no process has its pid (the number is
then held by members of its group or session, and no new process can get it).
"""

from __future__ import annotations

import os
import signal
import subprocess
from contextlib import suppress
from typing import Any

import psutil


def leader_id_is_ours(proc: subprocess.Popen[Any]) -> bool:
    """Whether `proc.pid`, as a process group or session id, still names the group and session `proc` led."""
    if proc.returncode is None:
        # Not reaped (running, or a zombie): the pid is still proc's.
        return True
    return not psutil.pid_exists(proc.pid)


def signal_group(proc: subprocess.Popen[Any], sig: signal.Signals) -> bool:
    """Send `sig` to the process group `proc` led, if it is still its group; whether it was sent."""
    if not leader_id_is_ours(proc):
        return False
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return False
    return True


def group_alive(proc: subprocess.Popen[Any]) -> bool:
    """Whether any process of the group `proc` led is left (a group id now another's counts as gone)."""
    if not leader_id_is_ours(proc):
        return False
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def session_members(proc: subprocess.Popen[Any]) -> set[psutil.Process]:
    """The live processes of the session `proc` led (itself aside), empty once the session id is another's."""
    if not leader_id_is_ours(proc):
        return set()
    members: set[psutil.Process] = set()
    for other in psutil.process_iter():
        with suppress(ProcessLookupError, PermissionError):
            if other.pid != proc.pid and os.getsid(other.pid) == proc.pid:
                members.add(other)
    return members


def descendants(proc: subprocess.Popen[Any]) -> set[psutil.Process]:
    """`proc`'s live descendants, empty once it has been reaped (its pid may be another's by then)."""
    if proc.returncode is not None:
        return set()
    with suppress(psutil.NoSuchProcess):
        return set(psutil.Process(proc.pid).children(recursive=True))
    return set()
