"""Userspace lanes: one wireguard-go per lane, each in its own small network namespace (a "lane box").

Why a namespace per lane: every wireguard-go listens to all link/address events of its namespace, so
with 300 lanes in the router's namespace opening one more lane woke 300 processes (12 ms → 130 ms).
Inside its own box a lane hears only itself. The box holds the lane's TUN device and a veth to the
router; the router forwards the lane's UDP port into the box (nft `lane_transport`) and sees the
engineer's decrypted traffic arrive on its side of the veth, named like the lane, where the lane's
rules apply. The box lives exactly as long as its wireguard-go process.

Inside the box, policy routing sends everything that comes out of the tunnel to the router, so
nothing from the engineer is delivered to the box itself; when the lane restricts the engineer's
source networks, only those may reach the box's UDP port.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import signal
import subprocess
import time

from .. import netns, rtnl
from ..errors import LaneError
from ..keys import b64_to_hex, hex_to_b64, public_of
from ..naming import Naming
from . import uapi
from .base import Box, BoxRequest, PeerStats

log = logging.getLogger("wicket.agent.wireguard")

UPLINK = "uplink"  # the box's end of its veth
TUNNEL_TABLE = 200  # in the box: everything from the tunnel goes to the router
PREF_FROM_TUNNEL, PREF_SOURCE_ALLOW, PREF_SOURCE_DENY, PREF_LOCAL = 100, 110, 190, 200
START_TIMEOUT_S = 5.0
TERM_GRACE_S = 2.0


class UserspaceBackend:
    kind = "userspace"

    def __init__(self, naming: Naming, wireguard_go: str = "wireguard-go", log_file: str | None = None,
                 uapi_dir: str = uapi.SOCKET_DIR):
        self.naming, self.wireguard_go, self.log_file, self.uapi_dir = naming, wireguard_go, log_file, uapi_dir
        self.rt = rtnl.Rtnl()  # the router's namespace (the agent's own)
        self._children: dict[str, subprocess.Popen] = {}
        self._dying: dict[str, tuple[int, float]] = {}

    # ---- open ----

    def create(self, req: BoxRequest) -> Box:
        router_addr, box_addr = self.naming.link_pair(req.slot)
        proc = self._spawn(req.name)
        try:
            # Plumb the box while wireguard-go is still starting: its namespace exists as soon as
            # `unshare` has run, well before the device answers on its UAPI socket.
            ns_fd = self._wait_unshared(proc)
            try:
                self._plumb_router_side(req, router_addr, box_addr, ns_fd)
                with netns.entered(ns_fd):
                    self._plumb_box(req, router_addr, box_addr)
                self._configure_device(req, proc)
                with netns.entered(ns_fd):
                    self._raise_tunnel(req)
            finally:
                os.close(ns_fd)
            self._wait_bound(proc.pid, req.listen_port)
        except Exception:
            self.destroy(req.name, wait=True)
            raise
        log.info("[#] lane box %s: wireguard-go pid %d, udp/%d → %s", req.name, proc.pid, req.listen_port, box_addr)
        return Box.built(req, slot=req.slot, transport_address=box_addr, pid=proc.pid)

    def _wait_unshared(self, proc: subprocess.Popen) -> int:
        home = os.stat("/proc/thread-self/ns/net").st_ino
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LaneError(f"unshare/wireguard-go exited with status {proc.returncode} while starting")
            try:
                fd = netns.open_ns_of_pid(proc.pid)
            except FileNotFoundError:
                fd = None
            if fd is not None:
                if os.fstat(fd).st_ino != home:
                    return fd
                os.close(fd)
            time.sleep(0.0001)
        raise LaneError(f"pid {proc.pid} did not enter its own network namespace")

    def _spawn(self, name: str) -> subprocess.Popen:
        if os.path.exists(uapi.socket_path(name, self.uapi_dir)):
            self._clear_stale_socket(name)
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LOG_LEVEL": "error",
            # wireguard-go prints a banner when the kernel could run WireGuard; we know.
            "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1",
        }
        stderr = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                ["unshare", "--net", "--", self.wireguard_go, "-f", name],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # lanes outlive an agent restart; Ctrl-C on the agent must not kill them
                close_fds=True,
            )
        finally:
            if stderr is not subprocess.DEVNULL:
                stderr.close()
        self._children[name] = proc
        return proc

    def _configure_device(self, req: BoxRequest, proc: subprocess.Popen) -> None:
        lines = [
            f"private_key={b64_to_hex(req.private_key)}",
            f"listen_port={req.listen_port}",
            "replace_peers=true",
            f"public_key={b64_to_hex(req.peer_public_key)}",
            "replace_allowed_ips=true",
            f"allowed_ip={req.engineer_address}/32",
        ]
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise LaneError(f"{req.name}: wireguard-go exited with status {proc.returncode} while starting")
            try:
                uapi.set_device(req.name, lines, directory=self.uapi_dir)
                return
            except uapi.UapiError as exc:
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED) or time.monotonic() > deadline:
                    raise LaneError(f"{req.name}: configuring wireguard-go failed: {exc}") from exc
                time.sleep(0.0003)

    def _plumb_router_side(self, req: BoxRequest, router_addr: str, box_addr: str, ns_fd: int) -> None:
        rt = self.rt
        rtnl.add_veth(rt, req.name, UPLINK, ns_fd)
        _disable_ipv6(req.name)
        link = rtnl.get_link(rt, req.name)
        rtnl.add_addr(rt, link.index, router_addr, 31)
        rtnl.set_up(rt, link.index)
        # replace: the box of an earlier lane for this address may still be going away
        rtnl.add_route(rt, f"{req.engineer_address}/32", gateway=box_addr, replace=True)

    def _plumb_box(self, req: BoxRequest, router_addr: str, box_addr: str) -> None:
        """Runs with the calling thread inside the box, before its TUN necessarily exists."""
        netns.write_sysctl("net.ipv4.ip_forward", 1)
        for key in ("all", "default"):
            _disable_ipv6(key)
        with rtnl.Rtnl() as rt:
            up = rtnl.get_link(rt, UPLINK)
            rtnl.add_addr(rt, up.index, box_addr, 31)
            rtnl.set_up(rt, up.index)
            rtnl.add_route(rt, "0.0.0.0/0", gateway=router_addr)
            rtnl.add_route(rt, "0.0.0.0/0", gateway=router_addr, table=TUNNEL_TABLE)
            # Move the local table below our rules so tunnel traffic is never delivered inside the box.
            rtnl.add_rule(rt, PREF_LOCAL, table=rtnl.RT_TABLE_LOCAL)
            rtnl.del_rule(rt, 0, table=rtnl.RT_TABLE_LOCAL)
            rtnl.add_rule(rt, PREF_FROM_TUNNEL, iif=req.name, table=TUNNEL_TABLE)
            if req.engineer_sources:
                # The router's own link address first: ARP replies are decided by a route lookup too.
                rtnl.add_rule(rt, PREF_SOURCE_ALLOW - 1, iif=UPLINK, src=f"{router_addr}/32", dst=f"{box_addr}/32", table=rtnl.RT_TABLE_LOCAL)
                for i, cidr in enumerate(req.engineer_sources):
                    rtnl.add_rule(rt, PREF_SOURCE_ALLOW + i, iif=UPLINK, src=cidr, dst=f"{box_addr}/32", table=rtnl.RT_TABLE_LOCAL)
                rtnl.add_rule(rt, PREF_SOURCE_DENY, iif=UPLINK, dst=f"{box_addr}/32", blackhole=True)

    def _raise_tunnel(self, req: BoxRequest) -> None:
        """Inside the box, once wireguard-go is configured: bring its TUN up and route the engineer to it."""
        _disable_ipv6(req.name)
        with rtnl.Rtnl() as rt:
            tun = rtnl.get_link(rt, req.name)
            rtnl.set_up(rt, tun.index)
            rtnl.add_route(rt, f"{req.engineer_address}/32", oif=tun.index)

    def _wait_bound(self, pid: int, port: int) -> None:
        """wireguard-go binds its UDP port when it sees its TUN come up; wait until it has."""
        needle = f":{port:04X} "
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/net/udp") as f:
                    if any(line.split()[1].endswith(needle.strip()) for line in f.readlines()[1:]):
                        return
            except (FileNotFoundError, IndexError):
                pass
            time.sleep(0.0005)
        raise LaneError(f"wireguard-go pid {pid} did not bind udp/{port}")

    # ---- close ----

    def destroy(self, name: str, wait: bool = False) -> None:
        """Stop the lane's wireguard-go; its box (namespace, TUN, veth) goes with it."""
        pid = self._pid_of(name)
        if pid is not None:
            _signal(pid, signal.SIGTERM)
            self._dying[name] = (pid, time.monotonic() + TERM_GRACE_S)
        if wait or pid is None:
            self._finish(name, pid, wait=wait)

    def reap(self) -> None:
        """Collect exited children; force what ignored SIGTERM."""
        for name, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[name]
        now = time.monotonic()
        for name, (pid, deadline) in list(self._dying.items()):
            if not _alive(pid):
                self._dying.pop(name)
                self._clear_stale_socket(name)
            elif now > deadline:
                log.warning("lane %s: wireguard-go pid %d ignored SIGTERM; killing", name, pid)
                _signal(pid, signal.SIGKILL)
                self._finish(name, pid, wait=True)

    def _finish(self, name: str, pid: int | None, wait: bool) -> None:
        if pid is not None and wait:
            deadline = time.monotonic() + TERM_GRACE_S
            while _alive(pid) and time.monotonic() < deadline:
                self._reap_child(name)
                time.sleep(0.002)
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
                while _alive(pid) and time.monotonic() < deadline + TERM_GRACE_S:
                    self._reap_child(name)
                    time.sleep(0.002)
        self._reap_child(name)
        self._dying.pop(name, None)
        self._clear_stale_socket(name)
        # The router side vanishes with the box; if something else keeps the box alive, cut it here.
        try:
            link = rtnl.get_link(self.rt, name)
            rtnl.del_link(self.rt, link.index)
        except OSError:
            pass

    def _reap_child(self, name: str) -> None:
        proc = self._children.get(name)
        if proc is not None and proc.poll() is not None:
            del self._children[name]

    # ---- observe ----

    def observe(self) -> dict[str, Box]:
        boxes: dict[str, Box] = {}
        links = {link.index: link for link in rtnl.list_links(self.rt, self.naming.prefix) if self.naming.is_ours(link.name)}
        for link in links.values():
            boxes[link.name] = Box(name=link.name, router_link=True)
        for index, addr, plen in rtnl.list_addrs(self.rt):
            if index in links and plen == 31:
                box = boxes[links[index].name]
                box.slot = self.naming.slot_of(addr)
                if box.slot:
                    box.transport_address = self.naming.link_pair(box.slot)[1]
        for path in glob.glob(os.path.join(self.uapi_dir, self.naming.prefix + "*.sock")):
            name = os.path.basename(path)[: -len(".sock")]
            if not self.naming.is_ours(name):
                continue
            box = boxes.setdefault(name, Box(name=name))
            try:
                info = uapi.get_device(name, self.uapi_dir)
                box.pid = uapi.peer_pid(name, self.uapi_dir)
            except OSError:
                continue  # a stale socket: nobody serves it
            box.device = True
            box.listen_port = info.listen_port
            if info.private_key_hex:
                box.node_public_key = public_of(hex_to_b64(info.private_key_hex))
            if info.peers:
                box.peer_public_key = hex_to_b64(info.peers[0].public_key_hex)
                for ip in info.peers[0].allowed_ips:
                    box.engineer_address = ip.split("/")[0]
        return boxes

    def stats(self, name: str) -> PeerStats | None:
        try:
            info = uapi.get_device(name, self.uapi_dir)
        except OSError:
            return None
        if not info.peers:
            return PeerStats()
        p = info.peers[0]
        last = p.last_handshake_sec + p.last_handshake_nsec / 1e9 if p.last_handshake_sec else None
        return PeerStats(rx_bytes=p.rx_bytes, tx_bytes=p.tx_bytes, last_handshake=last, endpoint=p.endpoint)

    # ---- helpers ----

    def _pid_of(self, name: str) -> int | None:
        proc = self._children.get(name)
        if proc is not None and proc.poll() is None:
            return proc.pid
        try:
            pid = uapi.peer_pid(name, self.uapi_dir)
        except OSError:
            return None
        return pid if _is_wireguard_go(pid, name) else None

    def _clear_stale_socket(self, name: str) -> None:
        path = uapi.socket_path(name, self.uapi_dir)
        try:
            uapi.peer_pid(name, self.uapi_dir)
        except OSError:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _disable_ipv6(key: str) -> None:
    netns.disable_ipv6(key)


def _is_wireguard_go(pid: int, name: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return any(a.endswith(b"wireguard-go") for a in argv) and name.encode() in argv


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
