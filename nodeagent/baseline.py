"""Device baselines in the kernel: each passported device may open its type's flows and nothing else.

The kernel form keeps a packet's cost flat in the number of devices:
  dev_type      a data map, device address → its type's id (a ct mark of class 0x59);
  type_chain    a verdict map, type id → `jump p_<hash>` (one element per device type);
  p_<hash>      a profile chain: one rule per (flow, destination), `ip daddr @d_<hash> <proto> dport {…} accept`;
  d_<hash>      one address set per destination, fixed addresses or what its FQDN resolves to now;
  dev_addr      every passported device address (the `from_device` jump);
  dev_deny_nets the site's device networks when hosts without a passport are denied their own traffic.
Adding a device is one map element and one set element (in a data map: the kernel re-validates every
element of a verdict map at each commit); a changed DNS answer rewrites one set. Every change
is one transaction, computed as the difference between the model now and the model last applied.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import FirewallError
from .firewall import Firewall
from .wire import BaselineFlow, BaselineState

log = logging.getLogger("wicket.agent.baseline")

CHAIN_PREFIX, SET_PREFIX = "p_", "d_"
TYPE_MARK = 0x59000000  # ct mark class of a device type's id (lanes 0x56/0x57, grants 0x58)


def chain_name(profile: str) -> str:
    return CHAIN_PREFIX + hashlib.blake2b(profile.encode(), digest_size=6).hexdigest()


def set_name(destination: str) -> str:
    return SET_PREFIX + hashlib.blake2b(destination.encode(), digest_size=6).hexdigest()


Rule = tuple[str, tuple[str, ...], tuple[int, ...]]  # destination set, transports, ports


@dataclass
class Model:
    """What the baseline part of the table holds (or should hold)."""

    sets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # set → sorted addresses
    set_labels: dict[str, str] = field(default_factory=dict)  # set → destination name
    chains: dict[str, tuple[Rule, ...] | None] = field(default_factory=dict)  # None: content unknown (rewrite)
    chain_labels: dict[str, str] = field(default_factory=dict)  # chain → profile name
    devices: dict[str, str] = field(default_factory=dict)  # address → chain
    type_ids: dict[str, int] = field(default_factory=dict)  # chain → its type id (ct mark)
    deny_nets: tuple[str, ...] = ()


def build(state: BaselineState | None, resolve: Callable[[str], list[str]]) -> Model:
    """The model for a desired baseline; `resolve(fqdn)` gives an FQDN's addresses to enforce now."""
    m = Model()
    if state is None:
        return m
    m.sets = _sets(state, resolve)
    m.set_labels = {set_name(d.name): d.name for d in state.destinations}
    for p in state.profiles:
        chain = chain_name(p.name)
        m.chains[chain] = tuple(sorted(rule for f in p.flows for rule in _rules(f)))
        m.chain_labels[chain] = p.name
    chains = {p.name: chain_name(p.name) for p in state.profiles}
    m.type_ids = type_ids(list(chains.values()))
    for dev in state.devices:
        for a in dev.addresses:
            m.devices[str(a)] = chains[dev.profile]
    if state.unpassported == "deny":
        m.deny_nets = tuple(sorted(str(n) for n in state.device_networks))
    return m


def type_ids(chains: list[str]) -> dict[str, int]:
    """A 24-bit id per profile chain, from its name (stable while the profile exists), probing past clashes."""
    out: dict[str, int] = {}
    taken: set[int] = set()
    for c in sorted(chains):
        n = int(c[len(CHAIN_PREFIX):], 16) & 0xFFFFFF or 1
        while n in taken:
            n = n % 0xFFFFFF + 1
        taken.add(n)
        out[c] = TYPE_MARK | n
    return out


def _sets(state: BaselineState, resolve: Callable[[str], list[str]]) -> dict[str, tuple[str, ...]]:
    return {set_name(d.name): tuple(sorted({str(a) for a in d.addresses} if d.addresses else set(resolve(d.fqdn or ""))))
            for d in state.destinations}


def _rules(f: BaselineFlow) -> list[Rule]:
    transports = ("tcp", "udp") if f.transport == "tcp+udp" else (f.transport,)
    return [(set_name(d), transports, tuple(sorted(f.ports))) for d in sorted(set(f.to))]


class Baselines:
    """Keeps the table's baseline part equal to the desired state, one transaction per change."""

    def __init__(self, fw: Firewall):
        self.fw = fw
        self.applied = Model()
        self._state: BaselineState | None = None  # the desired baseline `applied` was built from

    def load(self) -> list[str]:
        """Read what the table holds now (at start-up and after the table was replaced), so the next
        `apply` sweeps what nobody wants. Profile chains are rewritten on the next apply."""
        self.applied = read_model(self.fw)
        self._state = None
        n = len(self.applied.devices)
        return [f"baseline: found {n} device address(es) in the table"] if n else []

    def apply(self, state: BaselineState | None, resolve: Callable[[str], list[str]]) -> list[str]:
        """Converge on `state`. Returns what changed (for the reconcile report); raises FirewallError
        when the transaction fails, leaving the table as it was.

        The same desired state again (every reconcile, every new DNS answer) only re-resolves its
        destinations: the cost is the number of destinations, not of devices."""
        if state is not None and state is self._state:
            want = Model(**{**vars(self.applied), "sets": _sets(state, resolve)})
        else:
            want = build(state, resolve)
        objs, changes = diff(self.fw.table, self.applied, want)
        if objs:
            self.fw.run(objs)
        self.applied, self._state = want, state
        return changes

    def chain_of(self, address: str) -> str | None:
        return self.applied.devices.get(address)


def diff(table: str, have: Model, want: Model) -> tuple[list[dict], list[str]]:
    """The transaction taking `have` to `want`, in an order the kernel accepts: objects are created before
    they are referenced and deleted after the last reference is gone."""
    fam = {"family": "inet", "table": table}
    objs: list[dict] = []
    changes: list[str] = []

    for s, addrs in want.sets.items():
        if s not in have.sets:
            objs.append({"add": {"set": {**fam, "name": s, "type": "ipv4_addr"}}})
        if have.sets.get(s) != addrs:
            if s in have.sets:
                objs.append({"flush": {"set": {**fam, "name": s}}})
            if addrs:
                objs.append({"add": {"element": {**fam, "name": s, "elem": list(addrs)}}})
            changes.append(f"baseline: destination {want.set_labels.get(s, s)} = {', '.join(addrs) or '(none)'}")

    for c, rules in want.chains.items():
        if c not in have.chains:
            objs.append({"add": {"chain": {**fam, "name": c}}})
        if have.chains.get(c) != rules or rules is None:
            if c in have.chains:
                objs.append({"flush": {"chain": {**fam, "name": c}}})
            objs += [{"add": {"rule": {**fam, "chain": c, "expr": _rule_expr(r)}}} for r in rules or ()]
            if have.chains.get(c) is not None or c not in have.chains:
                changes.append(f"baseline: profile {want.chain_labels.get(c, c)} allows {_describe(rules or (), want)}")
    retyped = [c for c in have.type_ids if have.type_ids[c] != want.type_ids.get(c)]
    if retyped:
        objs.append({"delete": {"element": {**fam, "name": "type_chain", "elem": [have.type_ids[c] for c in retyped]}}})
    typed = [c for c in want.type_ids if have.type_ids.get(c) != want.type_ids[c]]
    if typed:
        objs.append({"add": {"element": {**fam, "name": "type_chain",
                                          "elem": [[want.type_ids[c], {"jump": {"target": c}}] for c in typed]}}})

    if want.devices is not have.devices:  # the same desired state again shares its device map: nothing to walk
        gone = [a for a in have.devices if a not in want.devices]
        moved = [a for a, c in want.devices.items() if a in have.devices and
                 have.type_ids.get(have.devices[a]) != want.type_ids.get(c)]
        new = [a for a in want.devices if a not in have.devices]
        if gone or moved:
            objs.append({"delete": {"element": {**fam, "name": "dev_type", "elem": gone + moved}}})
        if gone:
            objs.append({"delete": {"element": {**fam, "name": "dev_addr", "elem": gone}}})
        if new or moved:
            objs.append({"add": {"element": {**fam, "name": "dev_type",
                                              "elem": [[a, want.type_ids[want.devices[a]]] for a in new + moved]}}})
        if new:
            objs.append({"add": {"element": {**fam, "name": "dev_addr", "elem": new}}})
        if gone or moved or new:
            changes.append(f"baseline: {len(want.devices)} device address(es) enforced "
                           f"(+{len(new)} −{len(gone)} ~{len(moved)})")

    if have.deny_nets != want.deny_nets:
        objs.append({"flush": {"set": {**fam, "name": "dev_deny_nets"}}})
        if want.deny_nets:
            objs.append({"add": {"element": {**fam, "name": "dev_deny_nets", "elem": [_prefix(n) for n in want.deny_nets]}}})
        changes.append("baseline: hosts without a passport in " + (", ".join(want.deny_nets) + " are denied"
                                                                 if want.deny_nets else "the device networks are left to the router"))

    for c in have.chains:
        if c not in want.chains:
            objs.append({"delete": {"chain": {**fam, "name": c}}})
            changes.append(f"baseline: profile {have.chain_labels.get(c, c)} removed")
    for s in have.sets:
        if s not in want.sets:
            objs.append({"delete": {"set": {**fam, "name": s}}})
            changes.append(f"baseline: destination {have.set_labels.get(s, s)} removed")
    return objs, changes


def read_model(fw: Firewall) -> Model:
    """The baseline objects in the table now (chain contents are not parsed: they are rewritten)."""
    m = Model()
    marks: dict[str, int] = {}
    rc, out, err = fw.list_table()
    if rc != 0:
        if "No such file" in err:
            return m
        raise FirewallError(f"listing table: {err.strip()}")
    for obj in json.loads(out)["nftables"]:
        if "chain" in obj and obj["chain"]["name"].startswith(CHAIN_PREFIX):
            m.chains[obj["chain"]["name"]] = None
        s = obj.get("set") or obj.get("map")
        if not s:
            continue
        name, elems = s["name"], s.get("elem", [])
        if name.startswith(SET_PREFIX):
            m.sets[name] = tuple(sorted(e for e in elems if isinstance(e, str)))
        elif name == "dev_type":
            marks = {key: int(mark) for key, mark in elems}
        elif name == "type_chain":
            m.type_ids = {verdict.get("jump", {}).get("target", ""): int(mark) for mark, verdict in elems}
        elif name == "dev_deny_nets":
            m.deny_nets = tuple(sorted(_net_text(e) for e in elems))
    chain_of = {mark: c for c, mark in m.type_ids.items()}
    m.devices = {a: chain_of.get(mark, "") for a, mark in marks.items()}
    return m


def _rule_expr(rule: Rule) -> list[dict]:
    dest, transports, ports = rule
    proto: object = transports[0] if len(transports) == 1 else {"set": list(transports)}
    port: object = ports[0] if len(ports) == 1 else {"set": list(ports)}
    return [
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "@" + dest}},
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": proto}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": port}},
        {"accept": None},
    ]


def _describe(rules: tuple[Rule, ...], m: Model) -> str:
    if not rules:
        return "nothing (default deny)"
    return "; ".join(f"{'+'.join(t)}/{','.join(map(str, p))} to {m.set_labels.get(d, d)}" for d, t, p in rules)


def _prefix(net: str) -> dict:
    addr, length = net.split("/")
    return {"prefix": {"addr": addr, "len": int(length)}}


def _net_text(e) -> str:
    if isinstance(e, dict) and "prefix" in e:
        return f"{e['prefix']['addr']}/{e['prefix']['len']}"
    if isinstance(e, dict) and "range" in e:
        return "-".join(e["range"])
    return f"{e}/32"


__all__ = ["TYPE_MARK", "Baselines", "Model", "build", "chain_name", "diff", "read_model", "set_name", "type_ids"]
