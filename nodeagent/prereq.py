"""What the node must provide before the agent enforces anything, shared by `run` and `doctor`."""

from __future__ import annotations

import os
import shutil

from . import netns
from .errors import PrerequisiteError
from .wg.base import kernel_module_present

CONNTRACK_SYSCTLS = {
    "net.netfilter.nf_conntrack_acct": "1",  # per-connection packets/bytes for evidence
    "net.netfilter.nf_conntrack_timestamp": "1",  # start/stop times for evidence
}
# One wireguard-go per lane, each holding inotify instances; the default (128) stops at ~125 lanes.
INOTIFY_KEY = "fs.inotify.max_user_instances"


def enable_conntrack_accounting() -> list[str]:
    """Switch on accounting and timestamps in this namespace; refuse to run without them."""
    done = []
    for key, want in CONNTRACK_SYSCTLS.items():
        try:
            if netns.read_sysctl(key) != want:
                netns.write_sysctl(key, want)
                done.append(f"set {key}={want}")
            if netns.read_sysctl(key) != want:
                raise PrerequisiteError(f"{key} stays at {netns.read_sysctl(key)}")
        except OSError as exc:
            raise PrerequisiteError(
                f"cannot switch on conntrack accounting ({key}): {exc}. Evidence would have no byte counts; "
                "the agent refuses to run without it"
            ) from exc
    return done


def ensure_inotify(lanes: int) -> list[str]:
    want = max(1024, lanes * 4)
    current = int(netns.read_sysctl(INOTIFY_KEY))
    if current >= want:
        return []
    netns.write_sysctl(INOTIFY_KEY, want)
    return [f"raised {INOTIFY_KEY} from {current} to {want}"]


def choose_backend(requested: str, wireguard_go: str) -> tuple[str, str]:
    """Returns (backend, why)."""
    have_kernel = kernel_module_present()
    have_go = shutil.which(wireguard_go) is not None
    if requested == "kernel":
        if not have_kernel:
            raise PrerequisiteError("backend 'kernel' requested but the wireguard kernel module is not loaded")
        return "kernel", "requested"
    if requested == "userspace":
        if not have_go:
            raise PrerequisiteError(f"backend 'userspace' requested but {wireguard_go} is not installed")
        return "userspace", "requested"
    if have_kernel:
        return "kernel", "the wireguard kernel module is loaded"
    if have_go:
        return "userspace", "no wireguard kernel module; using wireguard-go"
    raise PrerequisiteError("neither the wireguard kernel module nor wireguard-go is available")


def require_root() -> None:
    if os.geteuid() != 0:
        raise PrerequisiteError("the agent manages interfaces, nftables and conntrack: run it as root")
