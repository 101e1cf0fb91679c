"""The agent's nftables table: load it from `nft_templates/`, and turn lanes into set/map elements.

Every change is one libnftables JSON transaction: it applies whole or not at all. Per-lane facts are
elements of non-interval sets and maps (adding and deleting those costs the same with 1 lane or
10 000; interval sets and per-lane chains do not). Counters are read from the kernel by key
(`nftraw`), never by listing.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import string
import threading
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .errors import FirewallError
from .naming import Naming
from .nftraw import NftSets, decode_blocked_key, decode_device_key, key_ifname

TEMPLATE = "wicket.nft"
# Kernel timeouts trail the agent's own deadline a little, so the agent normally ends a lane itself
# (with its evidence) and the kernel is the backstop when the agent is not running.
KERNEL_GRACE_S = 1.0
POLICY_SETS = ("lane_flow", "lane_live", "lane_mark", "lane_transport", "lane_transport_mark", "lane_transport_live")
ACCOUNTING_SETS = ("lane_tx", "lane_rx", "lane_refused")
PROTO_NUM = {"tcp": 6, "udp": 17}
PROTO_NAME = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp"}


@dataclass(frozen=True)
class LaneRules:
    """The kernel-facing facts of one lane."""

    name: str
    session_id: str
    engineer_address: str
    device_address: str
    flows: tuple[tuple[str, int], ...]  # (transport, port)
    mark: int  # data ct mark
    transport_mark: int
    listen_port: int | None = None  # set for userspace lanes (their UDP is forwarded into the lane)
    transport_address: str | None = None


@dataclass
class TableView:
    """What the table holds now, per lane name (read at start-up and on resync)."""

    template_version: str | None
    marks: dict[str, int]
    sessions: dict[str, str]
    flows: dict[str, set[tuple[str, str, str, int]]]
    transports: dict[int, str]
    accounted: set[str]


def render_template(table: str, naming: Naming, blocked_size: int) -> tuple[str, str]:
    raw = resources.files("nft_templates").joinpath(TEMPLATE).read_text()
    version = hashlib.sha256(raw.encode()).hexdigest()[:12]
    text = string.Template(raw).substitute(
        table=table, lane_glob=f'"{naming.prefix}*"', blocked_size=blocked_size, template_version=version
    )
    return text, version


class Firewall:
    def __init__(self, naming: Naming, table: str = "wicket", blocked_size: int = 65535, nft: Any = None):
        if nft is None:
            import nftables  # Debian's python3-nftables (libnftables); see docs/operator.md

            nft = nftables.Nftables()
        self.nft = nft
        self.nft.set_json_output(True)
        self.naming, self.table, self.blocked_size = naming, table, blocked_size
        self.text, self.version = render_template(table, naming, blocked_size)
        self._raw: NftSets | None = None
        self._lock = threading.RLock()

    # ---- the table ----

    def ensure(self) -> str | None:
        """Load the table unless the same template version is already there. Returns what it did."""
        current = self._table_comment()
        if current is not None and self.version in current:
            return None
        # One transaction: create-if-missing, delete, load. Nothing in between is ever visible.
        buffer = f"table inet {self.table}\ndelete table inet {self.table}\n{self.text}"
        rc, _out, err = self._cmd(buffer)
        if rc != 0:
            raise FirewallError(f"loading the ruleset failed: {err.strip()}")
        return "loaded ruleset" if current is None else "replaced ruleset of another version"

    def remove(self) -> bool:
        rc, _out, err = self._cmd(f"delete table inet {self.table}")
        if rc != 0 and "No such file" not in err:
            raise FirewallError(f"deleting table {self.table}: {err.strip()}")
        return rc == 0

    def check(self) -> None:
        """Validate the rendered template without touching the kernel's ruleset (`nft -c`)."""
        with self._lock:
            self.nft.set_dry_run(True)
            try:
                rc, _out, err = self._cmd(f"table inet {self.table}\ndelete table inet {self.table}\n{self.text}")
            finally:
                self.nft.set_dry_run(False)
        if rc != 0:
            raise FirewallError(f"template does not load: {err.strip()}")

    def set_tunnel_nets(self, nets: list[str]) -> None:
        objs: list[dict] = [{"flush": {"set": {"family": "inet", "table": self.table, "name": "tunnel_nets"}}}]
        if nets:
            elems = [{"prefix": {"addr": n.split("/")[0], "len": int(n.split("/")[1])}} for n in nets]
            objs.append({"add": {"element": self._elem("tunnel_nets", elems)}})
        self._run(objs)

    # ---- elements ----

    def policy_elements(self, lane: LaneRules, seconds_left: float) -> list[dict]:
        timeout = max(1, math.ceil(seconds_left + KERNEL_GRACE_S))
        out = [
            self._elem(
                "lane_flow",
                [
                    {"elem": {"val": {"concat": [lane.name, lane.engineer_address, lane.device_address, proto, port]}, "timeout": timeout}}
                    for proto, port in lane.flows
                ],
            ),
            self._elem("lane_live", [{"elem": {"val": {"concat": [lane.name, lane.mark]}, "timeout": timeout}}]),
            self._elem("lane_mark", [[{"elem": {"val": lane.name, "timeout": timeout, "comment": lane.session_id}}, lane.mark]]),
        ]
        if lane.listen_port is not None and lane.transport_address:
            out += [
                self._elem("lane_transport", [[{"elem": {"val": lane.listen_port, "timeout": timeout}}, lane.transport_address]]),
                self._elem("lane_transport_mark", [[{"elem": {"val": lane.listen_port, "timeout": timeout}}, lane.transport_mark]]),
                self._elem(
                    "lane_transport_live", [{"elem": {"val": {"concat": [lane.name, lane.transport_mark]}, "timeout": timeout}}]
                ),
            ]
        return out

    def policy_keys(self, lane: LaneRules) -> list[dict]:
        """The same elements by key only, for deleting."""
        out = [
            self._elem("lane_flow", [{"concat": [lane.name, lane.engineer_address, lane.device_address, p, n]} for p, n in lane.flows]),
            self._elem("lane_live", [{"concat": [lane.name, lane.mark]}]),
            self._elem("lane_mark", [lane.name]),
        ]
        if lane.listen_port is not None and lane.transport_address:
            out += [
                self._elem("lane_transport", [lane.listen_port]),
                self._elem("lane_transport_mark", [lane.listen_port]),
                self._elem("lane_transport_live", [{"concat": [lane.name, lane.transport_mark]}]),
            ]
        return out

    def accounting_elements(self, name: str) -> list[dict]:
        return [self._elem(s, [name]) for s in ACCOUNTING_SETS]

    def commit(self, add: list[dict] = (), delete: list[dict] = ()) -> None:
        """One transaction: deletes first, then adds. All or nothing."""
        objs = [{"delete": {"element": e}} for e in delete] + [{"add": {"element": e}} for e in add]
        if objs:
            self._run(objs)

    def delete_all(self, elements: list[dict]) -> list[str]:
        """Delete elements in one transaction; element by element (ignoring those already gone) only if that
        fails. Refused attempts after a scan number tens of thousands: one by one, that takes minutes."""
        try:
            self.commit(delete=elements)
            return []
        except FirewallError:
            return self.delete_tolerant(elements)

    def delete_tolerant(self, elements: list[dict]) -> list[str]:
        """Delete elements one by one, ignoring those already gone (expired in the kernel). Returns errors."""
        errors = []
        for e in elements:
            for single in _split_elem(e):
                rc, _out, err = self._json_cmd({"nftables": [{"delete": {"element": single}}]})
                if rc != 0 and "No such file" not in err:
                    errors.append(err.strip())
        return errors

    # ---- reading ----

    def counters(self, name: str) -> dict[str, tuple[int, int]] | None:
        """The lane's accounting counters, or None when its elements are gone (already harvested)."""
        raw = self._sets()
        out, found = {}, False
        with self._lock:
            for s in ACCOUNTING_SETS:
                c = raw.counter(s, key_ifname(name))
                found |= c is not None
                out[s] = (c.packets, c.bytes) if c else (0, 0)
        return out if found else None

    def blocked(self, names: set[str], limit_per_lane: int = 256):
        """Refused destinations per lane, from the kernel's dynamic set.

        Returns ({name: ([(destination, protocol, port, packets)], truncated)}, elements to delete once
        the evidence holding them is written)."""
        found: dict[str, list] = {n: [] for n in names}
        to_delete = []
        with self._lock:
            counted = self._sets().dump("lane_blocked")
        for c in counted:
            lane, addr, proto, port = decode_blocked_key(c.key)
            if lane not in found:
                continue
            proto_name = PROTO_NAME.get(proto, str(proto))
            found[lane].append((addr, proto_name, port if proto in (6, 17) else None, c.packets))
            to_delete.append({"concat": [lane, addr, proto_name if proto in PROTO_NUM.values() else proto, port]})
        out = {}
        for lane, rows in found.items():
            rows.sort(key=lambda r: -r[3])
            out[lane] = (rows[:limit_per_lane], len(rows) > limit_per_lane)
        return out, ([self._elem("lane_blocked", to_delete)] if to_delete else [])

    def view(self) -> TableView:
        rc, out, err = self._cmd(f"list table inet {self.table}")
        if rc != 0:
            if "No such file" in err:
                return TableView(None, {}, {}, {}, {}, set())
            raise FirewallError(f"listing table: {err.strip()}")
        v = TableView(None, {}, {}, {}, {}, set())
        for obj in json.loads(out)["nftables"]:
            if "table" in obj:
                v.template_version = obj["table"].get("comment")
            s = obj.get("set") or obj.get("map")
            if not s:
                continue
            for e in s.get("elem", []):
                _read_elem(v, s["name"], e)
        return v

    # ---- devices' own traffic ----

    def run(self, objs: list[dict]) -> None:
        """One transaction of libnftables JSON commands (baselines build their own)."""
        if objs:
            self._run(objs)

    def list_table(self):
        return self._cmd(f"list table inet {self.table}")

    def grant_elements(self, keys: list[tuple[str, str, str, int]], mark: int, seconds_left: float) -> dict:
        timeout = max(1, math.ceil(seconds_left + KERNEL_GRACE_S))
        return self._elem("grant_flow", [[{"elem": {"val": {"concat": list(k)}, "timeout": timeout}}, mark] for k in keys])

    def grant_keys(self, keys: list[tuple[str, str, str, int]]) -> dict:
        return self._elem("grant_flow", [{"concat": list(k)} for k in keys])

    def grant_marks(self) -> dict[tuple[str, str, str, int], int]:
        """The grant elements in the kernel now: (device, destination, protocol, port) → mark."""
        rc, out, err = self._cmd(f"list map inet {self.table} grant_flow")
        if rc != 0:
            raise FirewallError(f"listing grant_flow: {err.strip()}")
        found = {}
        for obj in json.loads(out)["nftables"]:
            for e in (obj.get("map") or {}).get("elem", []):
                key, mark = e
                if isinstance(key, dict) and "elem" in key:
                    key = key["elem"]["val"]
                dev, dst, proto, port = key["concat"]
                found[(dev, dst, proto, int(port))] = int(mark)
        return found

    def device_blocked(self) -> tuple[list[tuple[str, str, str, int | None, int]], list[dict]]:
        """Connections devices tried outside their flows, from the kernel's dynamic set:
        ([(device, destination, protocol, port, packets)], elements to delete once reported)."""
        rows, keys = [], []
        with self._lock:
            counted = self._sets().dump("dev_blocked")
        for c in counted:
            src, dst, proto, port = decode_device_key(c.key)
            proto_name = PROTO_NAME.get(proto, str(proto))
            rows.append((src, dst, proto_name, port if proto in (6, 17) else None, c.packets))
            keys.append({"concat": [src, dst, proto_name if proto in PROTO_NUM.values() else proto, port]})
        return rows, ([self._elem("dev_blocked", keys)] if keys else [])

    def clear_device_blocked(self, keys: list[dict]) -> None:
        """Forget refused attempts once reported: one transaction (a scan leaves tens of thousands), and a
        flush of the set should that fail."""
        try:
            self.commit(delete=keys)
        except FirewallError:  # an element went meanwhile (an agent in another process?): start afresh
            self._run([{"flush": {"set": {"family": "inet", "table": self.table, "name": "dev_blocked"}}}])

    # ---- helpers ----

    # libnftables keeps one netlink socket per context: two threads using it at once read each other's
    # replies, and libnftnl then exit()s the whole process ("kernel ABI is broken"). Serialise.
    def _cmd(self, text: str):
        with self._lock:
            return self.nft.cmd(text)

    def _json_cmd(self, obj: dict):
        with self._lock:
            return self.nft.json_cmd(obj)

    def _elem(self, set_name: str, elems: list) -> dict:
        return {"family": "inet", "table": self.table, "name": set_name, "elem": elems}

    def _run(self, objs: list[dict]) -> None:
        rc, _out, err = self._json_cmd({"nftables": objs})
        if rc != 0:
            raise FirewallError(err.strip() or f"nft transaction failed (rc={rc})", missing="No such file" in err)

    def _table_comment(self) -> str | None:
        """The table's comment (it carries the template version), None if there is no table.

        nft 1.0.6 leaves comments out of its JSON output, so this reads the text form (start-up only)."""
        with self._lock:
            self.nft.set_json_output(False)
            try:
                rc, out, _err = self._cmd(f"list table inet {self.table}")
            finally:
                self.nft.set_json_output(True)
        if rc != 0:
            return None
        m = re.search(r'^\s*comment "([^"]*)"', out, re.MULTILINE)
        return m.group(1) if m else ""

    def _sets(self) -> NftSets:
        if self._raw is None:
            self._raw = NftSets(self.table)
        return self._raw


def _split_elem(e: dict) -> list[dict]:
    return [{**e, "elem": [x]} for x in e["elem"]]


def _read_elem(v: TableView, set_name: str, e: Any) -> None:
    # Map elements come as [key, value]; keys with a timeout or comment as {"elem": {"val": ...}}.
    value = None
    if isinstance(e, list):
        e, value = e
    meta = {}
    if isinstance(e, dict) and "elem" in e:
        meta = e["elem"]
        e = meta["val"]
    if set_name == "lane_mark":
        v.marks[e] = value
        if meta.get("comment"):
            v.sessions[e] = meta["comment"]
    elif set_name == "lane_flow" and isinstance(e, dict):
        name, src, dst, proto, port = e["concat"]
        v.flows.setdefault(name, set()).add((src, dst, proto, port))
    elif set_name == "lane_transport":
        v.transports[int(e)] = value
    elif set_name in ACCOUNTING_SETS:
        v.accounted.add(e)


__all__ = ["Firewall", "LaneRules", "TableView", "render_template"]
