"""Throwaway network namespaces for tests against the real kernel (fixtures `ns` and `inside` in conftest)."""

from __future__ import annotations

import os
import secrets
import subprocess


class Namespaces:
    """Throwaway named namespaces ("wkt-k<rand>-<role>", swept by the lab's sweeper if a run crashes)."""

    def __init__(self):
        self.run = "k" + secrets.token_hex(3)[:5]
        self.names: list[str] = []

    def add(self, role: str) -> str:
        name = f"wkt-{self.run}-{role}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        self.names.append(name)
        return name

    def fd(self, name: str) -> int:
        return os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)

    def exec(self, name: str, *argv: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", name, *argv], capture_output=True, text=True, **kw)

    def cleanup(self) -> None:
        for name in self.names:
            for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split():
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
