"""Entering a network namespace on the current thread, and per-namespace sysctls.

A network namespace belongs to a thread, not a process: `entered(fd)` switches only the calling
thread and always switches it back. Sockets opened inside stay bound to that namespace, which is how
the agent configures a lane's namespace from its own.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def entered(ns_fd: int) -> Iterator[None]:
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(ns_fd)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(home)


def open_ns_of_pid(pid: int) -> int:
    return os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def write_sysctl(key: str, value: str | int) -> None:
    """Write a sysctl (dotted name) in the calling thread's network namespace."""
    path = "/proc/sys/" + key.replace(".", "/")
    with open(path, "w") as f:
        f.write(str(value))


def read_sysctl(key: str) -> str:
    with open("/proc/sys/" + key.replace(".", "/")) as f:
        return f.read().strip()


def disable_ipv6(iface: str) -> None:
    """No IPv6 on a lane's interfaces (or `all`/`default`): nothing can leak past IPv4-only rules."""
    try:
        write_sysctl(f"net.ipv6.conf.{iface}.disable_ipv6", 1)
    except FileNotFoundError:
        pass  # IPv6 is not compiled in: nothing to leak
