"""Finding and stopping processes safely: identity by (PID, start time), signals through pidfds.

Used by `cleanup` (spawned processes, processes left inside lab namespaces), `uapi` (wireguard-go daemons)
and `registry` (is a run's owner still alive?). A PID alone is never trusted: a process is only signalled
through a pidfd opened *before* its start time is checked, so a recycled PID can't redirect a signal.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    pid: int
    start: int | None = None  # expected start time; None = accept whatever holds the PID now
    label: str = ""


def stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state first), or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    return data[data.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot), or None if the process is gone."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None


def is_alive(pid: int, start: int | None = None) -> bool:
    """True if the PID exists, is not a zombie and (when given) still has that start time."""
    fields = stat_fields(pid)
    if not fields or fields[0] in ("Z", "X"):
        return False
    return start is None or int(fields[19]) == start


def comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


def netns_of(pid: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def pids_in_netns(ns_ids: set[tuple[int, int]]) -> dict[int, tuple[int, int]]:
    """PID -> namespace id of every process whose network namespace is one of ns_ids (like `ip netns pids`)."""
    me = os.getpid()
    found = {}
    for pid in all_pids():
        ns = netns_of(pid)
        if ns in ns_ids and pid != me:
            found[pid] = ns
    return found


def terminate(
    targets: list[Target], grace: float, children: dict[int, subprocess.Popen] | None = None
) -> tuple[list[str], list[str]]:
    """SIGTERM every target, wait up to `grace` seconds, SIGKILL the rest. Returns (actions, errors).

    `children` maps PIDs of our own child processes to their Popen, so they are reaped and leave no zombie.
    """
    actions: list[str] = []
    errors: list[str] = []
    open_fds: dict[int, Target] = {}
    try:
        for t in targets:
            fd = _open_checked(t, actions)
            if fd is None:
                continue
            try:
                signal.pidfd_send_signal(fd, signal.SIGTERM)
                open_fds[fd] = t
            except ProcessLookupError:
                os.close(fd)
        pending = _wait_exit(set(open_fds), grace)
        for fd in set(open_fds) - pending:
            actions.append(f"stopped pid {open_fds[fd].pid}{_label(open_fds[fd])} with SIGTERM")
        for fd in pending:
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        survivors = _wait_exit(pending, 2.0)
        for fd in pending - survivors:
            actions.append(f"killed pid {open_fds[fd].pid}{_label(open_fds[fd])} with SIGKILL")
        for fd in survivors:
            errors.append(f"pid {open_fds[fd].pid}{_label(open_fds[fd])} survived SIGKILL")
    finally:
        for fd in open_fds:
            os.close(fd)
    for t in targets:
        proc = (children or {}).get(t.pid)
        if proc is not None:
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                errors.append(f"could not reap child pid {t.pid}")
    return actions, errors


def _open_checked(t: Target, actions: list[str]) -> int | None:
    try:
        fd = os.pidfd_open(t.pid)
    except ProcessLookupError:
        return None
    fields = stat_fields(t.pid)
    if not fields or fields[0] in ("Z", "X"):
        os.close(fd)
        return None
    if t.start is not None and int(fields[19]) != t.start:
        actions.append(f"left pid {t.pid} alone: it is a different process now (PID reused)")
        os.close(fd)
        return None
    return fd


def _wait_exit(fds: set[int], timeout: float) -> set[int]:
    """Wait until the processes behind the pidfds have exited (a pidfd turns readable); return those still up."""
    pending = set(fds)
    deadline = time.monotonic() + timeout
    poller = select.poll()
    for fd in pending:
        poller.register(fd, select.POLLIN)
    while pending:
        remaining = max(0.0, deadline - time.monotonic())
        for fd, _ in poller.poll(remaining * 1000):
            pending.discard(fd)
            poller.unregister(fd)
        if time.monotonic() >= deadline:
            break
    return pending


def _label(t: Target) -> str:
    return f" ({t.label})" if t.label else ""
