"""Can this machine run the lab? Asked by the `lab` fixture and tests/test_lab.py before building one."""

from __future__ import annotations

import os
import shutil

REQUIRED_TOOLS = ("ip", "wireguard-go", "nft")


def unavailable_reason() -> str | None:
    """None if a lab can be built here, else a sentence saying why not (used as the pytest skip reason)."""
    if os.geteuid() != 0:
        return "the network-namespace lab needs root"
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"the network-namespace lab needs {', '.join(missing)} on PATH"
    if not os.path.exists("/dev/net/tun"):
        return "the network-namespace lab needs /dev/net/tun for wireguard-go"
    return None
