"""Low-level namespace plumbing: `ip -batch` runs, per-namespace sysctls, running Python code inside a namespace.

Used by `build` (creating the site), `probe` (in-process ping) and `cleanup` (finding and deleting namespaces).
Everything here acts only on named lab namespaces; nothing touches the root namespace's configuration.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


class LabError(RuntimeError):
    """Building or driving the lab failed."""


def netns_path(netns: str) -> str:
    return os.path.join(NETNS_DIR, netns)


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def netns_id(netns: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) identifying the namespace, comparable with os.stat('/proc/<pid>/ns/net'); None if gone."""
    try:
        st = os.stat(netns_path(netns))
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def ip_batch(
    lines: Iterable[str], netns: str | None = None, force: bool = False, timeout: float = 30
) -> None:
    """Run `ip [-n netns] [-force] -batch -`; raise LabError with ip's message if any line fails."""
    proc = subprocess.run(
        _batch_argv(netns, force),
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise LabError(f"ip batch in {netns or 'root namespace'} failed: {proc.stderr.strip()}")


def ip_batch_parallel(scripts: dict[str, list[str]], timeout: float = 30) -> None:
    """Run one `ip -n <netns> -batch -` per namespace concurrently; raise LabError naming every failure."""
    procs = {
        ns: subprocess.Popen(
            _batch_argv(ns, False),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for ns in scripts
    }
    failures = []
    for ns, proc in procs.items():
        _, err = proc.communicate("\n".join(scripts[ns]) + "\n", timeout=timeout)
        if proc.returncode != 0:
            failures.append(f"{ns}: {err.strip()}")
    if failures:
        raise LabError("ip batch failed: " + "; ".join(failures))


def _batch_argv(netns: str | None, force: bool) -> list[str]:
    return ["ip", *(["-n", netns] if netns else []), *(["-force"] if force else []), "-batch", "-"]


def in_netns(netns: str, fn: Callable[..., T], *args, **kwargs) -> T:
    """Call fn inside the namespace and return its result.

    A network namespace is a per-thread attribute, so fn runs on a throw-away thread that enters the namespace
    and then ends; the caller's threads never change namespace. Sockets fn creates stay bound to the namespace.
    """
    box: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name=f"in-netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def write_sysctls(netns: str, values: dict[str, str | int]) -> None:
    """Set dotted sysctls (e.g. "net.ipv4.ip_forward") in the namespace, in order."""

    def write() -> None:
        for key, value in values.items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(str(value))

    in_netns(netns, write)


def read_sysctl(netns: str, key: str) -> str:
    def read() -> str:
        with open("/proc/sys/" + key.replace(".", "/")) as f:
            return f.read().strip()

    return in_netns(netns, read)
