"""`Lab`: a fake utility site built from network namespaces. The public entry point of the package.

Used by tests (the `lab` fixture in tests/conftest.py), benchmarks and the demo:

    with Lab() as lab:
        lab.exec("eng1", ["wg", "show"])
        lab.spawn("rtr", ["wicket-agent", ...])

Building writes the registry record first, then the namespaces; leaving the block (normally, by exception,
Ctrl-C or SIGTERM) or interpreter exit tears everything down again. See `cleanup` for the order.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time

from . import build, guard, layout, procs, registry, uapi
from .cleanup import teardown
from .layout import ROUTER, SEGMENTS, Host
from .nsutil import LabError
from .probe import ping

log = logging.getLogger(__name__)


class Lab:
    """Router `rtr` with bridges wan0 (engineers, 203.0.113.0/24), lan0 (devices, 192.0.2.0/24) and ops0
    (masters, 198.51.100.0/24); one namespace per host, each linked to its bridge by a veth pair."""

    def __init__(
        self,
        devices=("rtu1", "rtu2"),
        masters=("scada",),
        engineers=("eng1", "eng2"),
        run_id: str | None = None,
        ipv6: bool = False,
    ):
        self.run_id = run_id if run_id is not None else layout.new_run_id()
        self.devices = tuple(devices)
        self.masters = tuple(masters)
        self.engineers = tuple(engineers)
        self.ipv6 = ipv6
        self.hosts: dict[str, Host] = layout.plan(
            self.run_id, self.devices, self.masters, self.engineers, ipv6
        )
        self.agent_tag = layout.agent_tag(self.run_id)
        self.router_wan = SEGMENTS["engineer"].addr(1)
        self.router_lan = SEGMENTS["device"].addr(1)
        self.router_ops = SEGMENTS["master"].addr(1)
        self.router_wan6 = SEGMENTS["engineer"].addr6(1) if ipv6 else None
        self.router_lan6 = SEGMENTS["device"].addr6(1) if ipv6 else None
        self.router_ops6 = SEGMENTS["master"].addr6(1) if ipv6 else None
        self.build_seconds: float | None = None
        self.cleanup_seconds: float | None = None
        self.cleanup_report: list[str] = []
        self.cleanup_errors: list[str] = []
        self._record: registry.RunRecord | None = None
        self._children: dict[int, subprocess.Popen] = {}
        self._uapi_prefixes: list[str] = ["we" + self.run_id]  # the engineers' WireGuard clients
        self._clean = False

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self.build()
        return self

    def __exit__(self, *exc) -> bool:
        self.cleanup()
        return False

    def build(self) -> None:
        """Create the site. On any failure (including Ctrl-C) whatever was created is removed, then it re-raises."""
        if self._record is not None:
            raise LabError(f"lab {self.run_id} was already built")
        t0 = time.monotonic()
        record = registry.RunRecord.for_current_process(self.run_id)
        record.namespaces = [h.netns for h in self.hosts.values()]
        record.uapi_prefixes = list(self._uapi_prefixes)
        # Checked before registering: a failed build cleans up everything its record names.
        if clash := build.clashes(self.hosts):
            raise LabError(
                f"namespaces already exist, not ours: {clash} (stale? try `python -m tests.lab sweep`)"
            )
        try:
            registry.create(record)
        except FileExistsError:
            raise LabError(f"run id {self.run_id} is already registered by another lab") from None
        self._record = record
        guard.track(self)
        try:
            build.build_site(self.hosts, self.ipv6)
        except BaseException:
            self.cleanup()
            raise
        self.build_seconds = time.monotonic() - t0

    def cleanup(self) -> None:
        """Tear the site down; safe to call repeatedly. Never raises because a step failed: problems are logged
        and left in `cleanup_errors` (the registry file is then kept for `sweep_stale`). May raise
        KeyboardInterrupt/LabTerminated after finishing, if one arrived while it ran."""
        if self._record is None or self._clean or os.getpid() != self._record.owner_pid:
            return
        t0 = time.monotonic()
        with guard.signals_deferred():
            try:
                rep = teardown(self._record, self._children)
                self.cleanup_report, self.cleanup_errors = rep.actions, rep.errors
                self._clean = not rep.errors
            except Exception as e:  # teardown shouldn't raise; belt and braces
                self.cleanup_errors = [f"teardown crashed: {e!r}"]
                log.exception("lab %s: teardown crashed", self.run_id)
            finally:
                self._children.clear()
                guard.untrack(self)
                self.cleanup_seconds = time.monotonic() - t0
        if self.cleanup_errors:
            log.error("lab %s: cleanup incomplete: %s", self.run_id, "; ".join(self.cleanup_errors))

    # -- addressing --------------------------------------------------------------------------------------------

    def ns(self, role: str) -> str:
        return self._host(role).netns

    def addr(self, role: str) -> str:
        return self._host(role).address

    def addr6(self, role: str) -> str:
        address6 = self._host(role).address6
        if address6 is None:
            raise LabError("this lab was built without IPv6")
        return address6

    def engineer_ifname(self, role: str) -> str:
        """Interface name for that engineer's WireGuard client: "we"+run_id+index, unique machine-wide.

        Its UAPI socket prefix ("we"+run_id) is registered already, so cleanup stops such clients."""
        if role not in self.engineers:
            raise LabError(f"{role!r} is not an engineer of this lab ({', '.join(self.engineers)})")
        return layout.engineer_ifname(self.run_id, self.engineers.index(role))

    # -- running things ----------------------------------------------------------------------------------------

    def exec(self, role: str, argv: list[str], check=True, timeout=30, **kw) -> subprocess.CompletedProcess:
        """Run argv to completion inside the role's namespace (`ip netns exec`); output captured as text."""
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(
            ["ip", "netns", "exec", self.ns(role), *argv], check=check, timeout=timeout, **kw
        )

    def spawn(self, role: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start a long-running process inside the role's namespace. Its PID is recorded in the registry and it
        is terminated at cleanup (SIGTERM, then SIGKILL after 3 s)."""
        record = self._require_built()
        kw.setdefault("stdin", subprocess.DEVNULL)
        # `ip netns exec` execs the command in place, so the PID is the command's own.
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(role), *argv], **kw)
        self._children[proc.pid] = proc
        start = procs.start_time(proc.pid)
        record.spawned.append({"pid": proc.pid, "start": start, "netns": self.ns(role), "argv": list(argv)})
        registry.save(record)
        return proc

    def ping(self, role: str, dst: str, count: int = 1, timeout: float = 1.0) -> bool:
        """ICMP echo from the role's namespace (no ping binary needed). False on no reply or no route."""
        return ping(self.ns(role), dst, count=count, timeout=timeout)

    def register_uapi_prefix(self, prefix: str) -> None:
        """Claim /var/run/wireguard/<prefix>*.sock for this run: cleanup stops the wireguard-go serving them
        and removes the files. Use run-specific prefixes only, e.g. "wk" + lab.agent_tag for the agent."""
        uapi.check_prefix(prefix)
        if prefix in self._uapi_prefixes:
            return
        self._uapi_prefixes.append(prefix)
        if self._record is not None and not self._clean:
            self._record.uapi_prefixes.append(prefix)
            registry.save(self._record)

    @property
    def namespaces(self) -> list[str]:
        return [h.netns for h in self.hosts.values()]

    def _host(self, role: str) -> Host:
        try:
            return self.hosts[role]
        except KeyError:
            raise LabError(f"no role {role!r} in this lab (roles: {', '.join(self.hosts)})") from None

    def _require_built(self) -> registry.RunRecord:
        if self._record is None or self._clean:
            raise LabError("the lab is not up")
        return self._record

    def __repr__(self) -> str:
        state = "new" if self._record is None else "cleaned" if self._clean else "up"
        return f"<Lab {self.run_id} {state}: {', '.join(self.hosts)}>"


__all__ = ["Lab", "Host", "LabError", "ROUTER"]
