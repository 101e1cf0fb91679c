"""Stopping the wireguard-go daemons behind a run's UAPI sockets (/var/run/wireguard/<prefix>*.sock).

Called by `cleanup.teardown` for every prefix a run registered. The socket directory is machine-wide, so a
prefix must be specific to the run (e.g. "we"+run_id, or the agent's "wk"+tag).

SO_PEERCRED names the process that called listen(). A daemonised wireguard-go listens in its parent and
hands the socket to a re-executed child, so the credential PID is often dead; we then look for the
wireguard-go process that actually holds the listening socket. Only processes named wireguard-go that hold
the socket are ever signalled.
"""

from __future__ import annotations

import glob
import os
import re
import socket
import struct
from pathlib import Path

from . import procs

WG_RUN_DIR = Path("/var/run/wireguard")
PREFIX_RE = re.compile(r"^[A-Za-z0-9_.=+-]{3,15}$")
_ACCEPTCON = 0x10000  # __SO_ACCEPTCON in /proc/net/unix Flags: a listening socket


def check_prefix(prefix: str) -> str:
    """Reject prefixes that are too short or could escape the directory or act as a glob."""
    if not PREFIX_RE.match(prefix):
        raise ValueError(f"UAPI prefix {prefix!r} must match {PREFIX_RE.pattern}")
    return prefix


def sockets_for(prefix: str) -> list[Path]:
    return sorted(
        Path(p) for p in glob.glob(str(WG_RUN_DIR / (glob.escape(check_prefix(prefix)) + "*.sock")))
    )


def stop_prefix(
    prefix: str, protect: frozenset[tuple[int, int]] = frozenset()
) -> tuple[list[str], list[str]]:
    """Stop every wireguard-go serving a socket under this prefix and remove the socket files.

    `protect` holds network namespace ids of live runs: holders inside them are left alone (sweeping only).
    Returns (actions, errors).
    """
    actions: list[str] = []
    errors: list[str] = []
    for path in sockets_for(prefix):
        try:
            _stop_socket(path, protect, actions, errors)
        except Exception as e:  # one bad socket must not stop the others
            errors.append(f"{path}: {e!r}")
    return actions, errors


def _stop_socket(path: Path, protect, actions: list[str], errors: list[str]) -> None:
    state, peer = peer_pid(path)
    if state == "gone":
        return
    if state == "stale":
        _unlink(path, actions, "stale socket")
        return
    holders = [p for p in ([peer] if peer else []) if _is_holder(p, path)]
    if not holders:
        holders = [p for p in procs.all_pids() if procs.comm(p) == "wireguard-go" and _is_holder(p, path)]
    if not holders:
        errors.append(f"{path} is served by something that is not a wireguard-go we can find; left it")
        return
    targets = []
    for pid in holders:
        if procs.netns_of(pid) in protect:
            actions.append(f"left wireguard-go pid {pid} on {path.name}: it runs in a live lab's namespace")
            return
        targets.append(procs.Target(pid, procs.start_time(pid), f"wireguard-go {path.name}"))
    done, failed = procs.terminate(targets, grace=2.0)
    actions += done
    errors += failed
    if path.exists():
        _unlink(path, actions, "socket")


def peer_pid(path: Path) -> tuple[str, int | None]:
    """("live", pid from SO_PEERCRED), ("stale", None) if nothing listens, or ("gone", None)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        pid, _uid, _gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return "live", pid
    except ConnectionRefusedError:
        return "stale", None
    except FileNotFoundError:
        return "gone", None
    except TimeoutError:  # backlog full: someone listens, but we learn no PID
        return "live", None
    finally:
        s.close()


def _is_holder(pid: int, path: Path) -> bool:
    """True if pid is a wireguard-go with an open fd on the socket listening at path."""
    if procs.comm(pid) != "wireguard-go":
        return False
    inode = _listening_inode(pid, path)
    if inode is None:
        return False
    want = f"socket:[{inode}]"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == want:
                return True
        except OSError:
            continue
    return False


def _listening_inode(pid: int, path: Path) -> int | None:
    # /proc/<pid>/net/unix lists the sockets of that process's network namespace, wherever it runs.
    want = _canonical(str(path))
    try:
        with open(f"/proc/{pid}/net/unix") as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) >= 8 and int(fields[3], 16) & _ACCEPTCON and _canonical(fields[7]) == want:
                    return int(fields[6])
    except (OSError, StopIteration, ValueError):
        return None
    return None


def _canonical(path: str) -> str:
    # wireguard-go binds /var/run/wireguard/x.sock; /var/run is usually a symlink to /run.
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _unlink(path: Path, actions: list[str], what: str) -> None:
    try:
        path.unlink()
        actions.append(f"removed {what} {path}")
    except FileNotFoundError:
        pass
