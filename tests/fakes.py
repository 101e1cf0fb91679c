"""Fakes of the kernel for fast tests: WireGuard boxes, the nft table, conntrack and the clock.

Each fake keeps its state in plain Python and prints it as text (`render()`), so a test can compare
what the real LaneManager did with what it should have done. The nft fake reuses the real element
builders (they are pure) and keeps element expiry like the kernel does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from nodeagent.errors import FirewallError, LaneError
from nodeagent.firewall import ACCOUNTING_SETS, Firewall, TableView
from nodeagent.keys import public_of
from nodeagent.naming import Naming
from nodeagent.wg.base import Box, BoxRequest, PeerStats


class FakeClock:
    def __init__(self, wall: float = 1_800_000_000.0, mono: float = 1000.0):
        self._wall, self._mono = wall, mono

    def mono(self) -> float:
        return self._mono

    def wall(self) -> float:
        return self._wall

    def boot_id(self) -> str:
        return "fake-boot"

    def advance(self, seconds: float) -> None:
        self._wall += seconds
        self._mono += seconds

    def step_wall(self, seconds: float) -> None:
        """Someone set the date: wall time jumps, monotonic time does not."""
        self._wall += seconds

    def deadline_for(self, end) -> float:
        return self._mono + (end.timestamp() - self._wall)

    def now(self):
        from datetime import UTC, datetime

        return datetime.fromtimestamp(self._wall, UTC)


class _NoNft:
    def set_json_output(self, _flag):
        pass


class FakeBackend:
    kind = "userspace"

    def __init__(self, naming: Naming):
        self.naming = naming
        self.boxes: dict[str, Box] = {}
        self.fail_create: set[str] = set()  # session-derived names whose create fails
        self.stats_by_name: dict[str, PeerStats] = {}
        self.created = 0

    def create(self, req: BoxRequest) -> Box:
        if req.name in self.boxes:
            raise LaneError(f"{req.name} exists")
        if any(b.listen_port == req.listen_port for b in self.boxes.values()):
            raise LaneError(f"udp/{req.listen_port} in use")
        if req.name in self.fail_create:
            raise LaneError(f"{req.name}: injected failure")
        box = Box(
            name=req.name, listen_port=req.listen_port, node_public_key=public_of(req.private_key),
            peer_public_key=req.peer_public_key, engineer_address=req.engineer_address, slot=req.slot,
            transport_address=self.naming.link_pair(req.slot)[1] if req.slot else None, pid=4000 + len(self.boxes),
            router_link=True, device=True,
        )
        self.boxes[req.name] = box
        self.created += 1
        return box

    def destroy(self, name: str, wait: bool = False) -> None:
        self.boxes.pop(name, None)

    def observe(self) -> dict[str, Box]:
        return {n: Box(**b.__dict__) for n, b in self.boxes.items()}

    def stats(self, name: str) -> PeerStats | None:
        if name not in self.boxes:
            return None
        return self.stats_by_name.get(name, PeerStats())

    def reap(self) -> None:
        pass

    def render(self) -> str:
        return "\n".join(f"box {n} udp/{b.listen_port} peer {b.engineer_address}" for n, b in sorted(self.boxes.items()))


class FakeFirewall(Firewall):
    """The agent's table as a dict of set name -> {element key: expiry (mono) or None}."""

    def __init__(self, naming: Naming, clock: FakeClock):
        super().__init__(naming, nft=_NoNft())
        self.clock = clock
        self.sets: dict[str, dict[str, float | None]] = {}
        self.values: dict[tuple[str, str], object] = {}
        self.comments: dict[tuple[str, str], str] = {}
        self.counters_by_lane: dict[str, dict[str, tuple[int, int]]] = {}
        self.blocked_rows: dict[str, list] = {}
        self.fail_if = None  # callable(list of ops) -> bool, to inject a refused transaction
        self.transactions = 0
        self.loaded = False
        self.tunnel_nets: list[str] = []
        self.baseline_ops: list[list[dict]] = []  # baseline transactions, as sent
        self.device_rows: list[tuple] = []  # refused attempts by devices, as the kernel would count them

    def ensure(self):
        if self.loaded:
            return None
        self.loaded = True
        return "loaded ruleset"

    def remove(self) -> bool:
        self.sets.clear()
        self.loaded = False
        return True

    def set_tunnel_nets(self, nets):
        self.tunnel_nets = list(nets)

    def expire(self) -> None:
        """What the kernel does with element timeouts."""
        now = self.clock.mono()
        for elems in self.sets.values():
            for key, exp in list(elems.items()):
                if exp is not None and exp <= now:
                    del elems[key]

    def commit(self, add=(), delete=()):
        self.expire()
        ops = [("delete", e) for e in delete] + [("add", e) for e in add]
        if not ops:
            return
        if self.fail_if and self.fail_if(ops):
            raise FirewallError("injected: transaction refused")
        staged = {k: dict(v) for k, v in self.sets.items()}
        values, comments = dict(self.values), dict(self.comments)
        for op, e in ops:
            for item in e["elem"]:
                key, value, exp, comment = self._parse(item)
                elems = staged.setdefault(e["name"], {})
                if op == "delete":
                    if key not in elems:
                        raise FirewallError("Could not process rule: No such file or directory", missing=True)
                    del elems[key]
                else:
                    elems[key] = exp
                    if value is not None:
                        values[(e["name"], key)] = value
                    if comment:
                        comments[(e["name"], key)] = comment
        self.sets, self.values, self.comments = staged, values, comments
        self.transactions += 1

    def delete_tolerant(self, elements):
        self.expire()
        for e in elements:
            if isinstance(e, tuple) and e[0] == "blocked":
                self.blocked_rows.pop(e[1], None)
                continue
            for item in e["elem"]:
                key = self._parse(item)[0]
                self.sets.get(e["name"], {}).pop(key, None)
        return []

    def run(self, objs):
        if self.fail_if and self.fail_if(objs):
            raise FirewallError("injected: transaction refused")
        self.baseline_ops.append(list(objs))

    def list_table(self):
        return 1, "", "Error: No such file or directory"

    def grant_marks(self):
        self.expire()
        return {tuple(json.loads(k)): self.values[("grant_flow", k)] for k in self.sets.get("grant_flow", {})}

    def delete_all(self, elements):
        return self.delete_tolerant(elements)

    def clear_device_blocked(self, keys):
        pass

    def device_blocked(self):
        rows, self.device_rows = self.device_rows, []
        return rows, []

    def counters(self, name):
        if not any(name in self.sets.get(s, {}) for s in ACCOUNTING_SETS):
            return None
        return self.counters_by_lane.get(name, {s: (0, 0) for s in ACCOUNTING_SETS})

    def blocked(self, names, limit_per_lane=256):
        return {n: (self.blocked_rows.get(n, []), False) for n in names}, [("blocked", n) for n in names]

    def delete_blocked(self, names):
        for n in names:
            self.blocked_rows.pop(n, None)

    def view(self) -> TableView:
        self.expire()
        v = TableView(None, {}, {}, {}, {}, set())
        for key in self.sets.get("lane_mark", {}):
            v.marks[key] = self.values[("lane_mark", key)]
            if ("lane_mark", key) in self.comments:
                v.sessions[key] = self.comments[("lane_mark", key)]
        for key in self.sets.get("lane_flow", {}):
            name, src, dst, proto, port = json.loads(key)
            v.flows.setdefault(name, set()).add((src, dst, proto, port))
        for s in ACCOUNTING_SETS:
            v.accounted |= set(self.sets.get(s, {}))
        return v

    def lanes_with_policy(self) -> set[str]:
        self.expire()
        return set(self.sets.get("lane_mark", {}))

    def render(self) -> str:
        self.expire()
        lines = []
        for name in sorted(self.sets):
            for key in sorted(self.sets[name]):
                lines.append(f"{name} {key}")
        return "\n".join(lines)

    def _parse(self, item):
        value = exp = comment = None
        if isinstance(item, list):
            item, value = item
        if isinstance(item, dict) and "elem" in item:
            meta = item["elem"]
            item = meta["val"]
            if "timeout" in meta:
                exp = self.clock.mono() + meta["timeout"]
            comment = meta.get("comment")
        key = json.dumps(item["concat"]) if isinstance(item, dict) and "concat" in item else item
        return key, value, exp, comment


@dataclass
class FakeFlow:
    id: int
    mark: int
    proto: int = 6
    src: str = "100.64.0.2"
    dst: str = "192.0.2.10"
    sport: int | None = 40000
    dport: int | None = 2404
    packets_orig: int = 10
    bytes_orig: int = 1000
    packets_reply: int = 8
    bytes_reply: int = 800
    start_ns: int | None = 1_800_000_000_000_000_000
    stop_ns: int | None = None
    tcp_state: int | None = 3  # ESTABLISHED

    @property
    def finished(self) -> bool:
        return self.tcp_state in (7, 8)


@dataclass
class FakeConntrack:
    flows: list = field(default_factory=list)

    def dump(self, mark, mask=0xFFFFFFFF):
        return [f for f in self.flows if f.mark & mask == mark]

    def flush(self, mark, mask=0xFFFFFFFF):
        self.flows = [f for f in self.flows if f.mark & mask != mark]
