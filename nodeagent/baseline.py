"""Device baselines in the kernel: each passported device may open its type's flows and nothing else.

The kernel form keeps a packet's cost flat in the number of devices:
  dev_profile   a verdict map, device address → `jump p_<hash>` (one chain per device type);
  p_<hash>      a profile chain: one rule per (flow, destination), `ip daddr @d_<hash> <proto> dport {…} accept`;
  d_<hash>      one address set per destination, fixed addresses or what its FQDN resolves to now;
  dev_addr      every passported device address (the `from_device` jump);
  dev_deny_nets the site's device networks when hosts without a passport are denied their own traffic.
Adding a device is one map element and one set element; a changed DNS answer rewrites one set. Every change
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
    deny_nets: tuple[str, ...] = ()


def build(state: BaselineState | None, resolve: Callable[[str], list[str]]) -> Model:
    """The model for a desired baseline; `resolve(fqdn)` gives an FQDN's addresses to enforce now."""
    m = Model()
    if state is None:
        return m
    for d in state.destinations:
        name = set_name(d.name)
        addrs = [str(a) for a in d.addresses] if d.addresses else resolve(d.fqdn or "")
        m.sets[name] = tuple(sorted(set(addrs)))
        m.set_labels[name] = d.name
    for p in state.profiles:
        chain = chain_name(p.name)
        m.chains[chain] = tuple(sorted(rule for f in p.flows for rule in _rules(f)))
        m.chain_labels[chain] = p.name
    for dev in state.devices:
        for a in dev.addresses:
            m.devices[str(a)] = chain_name(dev.profile)
    if state.unpassported == "deny":
        m.deny_nets = tuple(sorted(str(n) for n in state.device_networks))
    return m


def _rules(f: BaselineFlow) -> list[Rule]:
    transports = ("tcp", "udp") if f.transport == "tcp+udp" else (f.transport,)
    return [(set_name(d), transports, tuple(sorted(f.ports))) for d in sorted(set(f.to))]


class Baselines:
    """Keeps the table's baseline part equal to the desired state, one transaction per change."""

    def __init__(self, fw: Firewall):
        self.fw = fw
        self.applied = Model()

    def load(self) -> list[str]:
        """Read what the table holds now (at start-up and after the table was replaced), so the next
        `apply` sweeps what nobody wants. Profile chains are rewritten on the next apply."""
        self.applied = read_model(self.fw)
        n = len(self.applied.devices)
        return [f"baseline: found {n} device address(es) in the table"] if n else []

    def apply(self, state: BaselineState | None, resolve: Callable[[str], list[str]]) -> list[str]:
        """Converge on `state`. Returns what changed (for the reconcile report); raises FirewallError
        when the transaction fails, leaving the table as it was."""
        want = build(state, resolve)
        objs, changes = diff(self.fw.table, self.applied, want)
        if not objs:
            return []
        self.fw.run(objs)
        self.applied = want
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

    gone = [a for a in have.devices if a not in want.devices]
    moved = [a for a, c in want.devices.items() if a in have.devices and have.devices[a] != c]
    new = [a for a in want.devices if a not in have.devices]
    if gone or moved:
        objs.append({"delete": {"element": {**fam, "name": "dev_profile", "elem": gone + moved}}})
    if gone:
        objs.append({"delete": {"element": {**fam, "name": "dev_addr", "elem": gone}}})
    if new or moved:
        objs.append({"add": {"element": {**fam, "name": "dev_profile",
                                          "elem": [[a, {"jump": {"target": want.devices[a]}}] for a in new + moved]}}})
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
        elif name == "dev_profile":
            for key, verdict in elems:
                m.devices[key] = verdict.get("jump", {}).get("target", "")
        elif name == "dev_deny_nets":
            m.deny_nets = tuple(sorted(_net_text(e) for e in elems))
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


__all__ = ["Baselines", "Model", "build", "chain_name", "diff", "read_model", "set_name"]
