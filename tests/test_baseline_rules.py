"""Device baselines and grants on the agent: the model and its transaction (pure), against the real kernel
in a private namespace (sweeping, atomic failure, kernel timeouts), and grants in the fake agent."""

from __future__ import annotations

import ipaddress
import json
import os
from datetime import UTC, datetime, timedelta

import pytest

from nodeagent.baseline import Baselines, Model, build, chain_name, diff, read_model, set_name
from nodeagent.errors import FirewallError
from nodeagent.firewall import Firewall
from nodeagent.grants import GRANT_MARK, wanted_keys
from nodeagent.naming import Naming
from nodeagent.wire import BaselineState, GrantSpec

NAMES = {"mdm.grid.example": ["198.51.100.20", "198.51.100.21"]}


def state(devices: int = 3, *, mdm: str = "mdm", deny: bool = False) -> BaselineState:
    return BaselineState.model_validate({
        "unpassported": "deny" if deny else "router",
        "device_networks": ["192.0.2.0/24"],
        "destinations": [{"name": "scada-a", "addresses": ["198.51.100.10"]}, {"name": mdm, "fqdn": "mdm.grid.example"}],
        "profiles": [
            {"name": "substation-rtu", "flows": [{"protocol": "iec104", "transport": "tcp", "ports": [2404], "to": ["scada-a"]}]},
            {"name": "meter-concentrator", "flows": [{"protocol": "dlms", "transport": "tcp+udp", "ports": [4059], "to": [mdm]}]},
            {"name": "silent", "flows": []},
        ],
        "devices": [{"asset_id": f"D-{i}", "addresses": [_addr(i)],
                     "profile": "meter-concentrator" if i % 2 else "substation-rtu"} for i in range(devices)],
    })


def _addr(i: int) -> str:
    return f"192.0.2.{10 + i}" if i < 200 else str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("100.64.0.0")) + i))


def resolve(fqdn: str) -> list[str]:
    return NAMES.get(fqdn, [])


def ops(objs: list[dict]) -> list[tuple[str, str, str]]:
    """(verb, object kind, name) per command, in order."""
    out = []
    for o in objs:
        verb, body = next(iter(o.items()))
        kind, obj = next(iter(body.items()))
        out.append((verb, kind, obj.get("name") or obj.get("chain")))
    return out


# ---- the model and its transaction ----


def test_model_maps_each_device_to_its_profile_and_resolves_destinations():
    m = build(state(), resolve)
    assert m.devices == {"192.0.2.10": chain_name("substation-rtu"), "192.0.2.11": chain_name("meter-concentrator"),
                         "192.0.2.12": chain_name("substation-rtu")}
    assert m.sets == {set_name("scada-a"): ("198.51.100.10",), set_name("mdm"): ("198.51.100.20", "198.51.100.21")}
    assert m.chains[chain_name("meter-concentrator")] == ((set_name("mdm"), ("tcp", "udp"), (4059,)),)
    assert m.chains[chain_name("silent")] == (), "a type without flows still gets its (empty) chain: default deny"
    assert m.deny_nets == ()
    assert build(state(deny=True), resolve).deny_nets == ("192.0.2.0/24",)
    assert build(None, resolve) == Model()


def test_unresolved_fqdn_gives_an_empty_set_so_its_flows_are_denied():
    m = build(state(), lambda _f: [])
    assert m.sets[set_name("mdm")] == ()


def test_first_apply_creates_objects_before_they_are_referenced():
    objs, changes = diff("wicket", Model(), build(state(), resolve))
    seq = ops(objs)
    first_rule = next(i for i, op in enumerate(seq) if op[1] == "rule")
    assert all(seq.index(("add", "set", s)) < first_rule for s in (set_name("scada-a"), set_name("mdm")))
    jump = seq.index(("add", "element", "type_chain"))
    assert all(seq.index(("add", "chain", chain_name(p))) < jump for p in ("substation-rtu", "meter-concentrator", "silent"))
    assert seq.index(("add", "element", "dev_type")) > jump
    assert any("3 device address(es) enforced" in c for c in changes)


def test_nothing_to_do_when_nothing_changed():
    m = build(state(), resolve)
    assert diff("wicket", m, build(state(), resolve)) == ([], [])


def test_one_more_device_is_two_elements_whatever_the_number_of_devices():
    for n in (3, 2000):
        have = build(state(n), resolve)
        objs, _ = diff("wicket", have, build(state(n + 1), resolve))
        assert ops(objs) == [("add", "element", "dev_type"), ("add", "element", "dev_addr")]
        assert [len(o["add"]["element"]["elem"]) for o in objs] == [1, 1]


def test_a_changed_dns_answer_rewrites_one_set_only():
    have = build(state(500), resolve)
    want = build(state(500), lambda f: ["198.51.100.99"])
    objs, changes = diff("wicket", have, want)
    assert ops(objs) == [("flush", "set", set_name("mdm")), ("add", "element", set_name("mdm"))]
    assert changes == ["baseline: destination mdm = 198.51.100.99"]


def test_removed_profile_and_destination_go_after_their_last_reference():
    have = build(state(), resolve)
    smaller = BaselineState.model_validate({**state().model_dump(mode="json"),
                                            "destinations": [{"name": "scada-a", "addresses": ["198.51.100.10"]}],
                                            "profiles": [state().profiles[0].model_dump()], "devices": [
                                                {"asset_id": "D-0", "addresses": ["192.0.2.10"], "profile": "substation-rtu"}]})
    seq = ops(diff("wicket", have, build(smaller, resolve))[0])
    unmap = seq.index(("delete", "element", "dev_type"))
    assert seq.index(("delete", "chain", chain_name("meter-concentrator"))) > seq.index(("delete", "element", "type_chain"))
    assert seq.index(("delete", "chain", chain_name("meter-concentrator"))) > unmap
    assert seq.index(("delete", "set", set_name("mdm"))) > seq.index(("delete", "chain", chain_name("meter-concentrator")))


def test_a_device_moving_to_another_type_is_remapped():
    have = build(state(), resolve)
    moved = BaselineState.model_validate({**state().model_dump(mode="json"), "devices": [
        {"asset_id": "D-0", "addresses": ["192.0.2.10"], "profile": "meter-concentrator"},
        {"asset_id": "D-1", "addresses": ["192.0.2.11"], "profile": "meter-concentrator"},
        {"asset_id": "D-2", "addresses": ["192.0.2.12"], "profile": "substation-rtu"}]})
    objs, _ = diff("wicket", have, build(moved, resolve))
    assert ops(objs) == [("delete", "element", "dev_type"), ("add", "element", "dev_type")]
    m = build(moved, resolve)
    assert objs[1]["add"]["element"]["elem"] == [["192.0.2.10", m.type_ids[chain_name("meter-concentrator")]]]


def test_grant_keys_cover_every_resolved_address_transport_and_port():
    g = GrantSpec.model_validate({"session_id": "g-1", "device_id": "D-1", "device_address": "192.0.2.11",
                                  "flows": [{"protocol": "dlms", "transport": "tcp+udp", "ports": [4059], "to": ["mdm"]}],
                                  "end_time": (datetime.now(UTC) + timedelta(minutes=5)).isoformat()})
    keys, resolved = wanted_keys(g, state(), resolve)
    assert resolved == {"mdm": ["198.51.100.20", "198.51.100.21"]}
    assert keys == sorted(("192.0.2.11", a, t, 4059) for a in ("198.51.100.20", "198.51.100.21") for t in ("tcp", "udp"))


def test_wire_refuses_inconsistent_baselines():
    base = state().model_dump(mode="json")
    with pytest.raises(ValueError, match="unknown destination"):
        BaselineState.model_validate({**base, "destinations": base["destinations"][:1]})
    with pytest.raises(ValueError, match="share address"):
        BaselineState.model_validate({**base, "devices": base["devices"] + [
            {"asset_id": "D-X", "addresses": ["192.0.2.10"], "profile": "silent"}]})
    with pytest.raises(ValueError, match="needs device_networks"):
        BaselineState.model_validate({**base, "unpassported": "deny", "device_networks": []})
    with pytest.raises(ValueError, match="fully qualified"):
        BaselineState.model_validate({**base, "destinations": [{"name": "x", "fqdn": "mdm; drop table"}]})


class RecordingFirewall:
    table = "wicket"

    def __init__(self):
        self.runs: list[list[dict]] = []

    def run(self, objs):
        self.runs.append(objs)


def test_the_same_desired_state_again_only_re_resolves_its_destinations(monkeypatch):
    import nodeagent.baseline as baseline_module

    fw = RecordingFirewall()
    b = Baselines(fw)
    desired = state(300)
    b.apply(desired, resolve)
    monkeypatch.setattr(baseline_module, "build", lambda *_a: pytest.fail("the device list was walked again"))
    assert b.apply(desired, resolve) == [] and len(fw.runs) == 1
    assert b.apply(desired, lambda _f: ["198.51.100.77"]) == ["baseline: destination mdm = 198.51.100.77"]
    assert ops(fw.runs[-1]) == [("flush", "set", set_name("mdm")), ("add", "element", set_name("mdm"))]
    assert b.applied.devices == build(state(300), resolve).devices


# ---- against the real kernel ----



@pytest.mark.kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_kernel_apply_read_back_and_sweep(inside):
    fw = Firewall(Naming("tst"), table="wicket")
    fw.ensure()
    b = Baselines(fw)
    b.apply(state(40, deny=True), resolve)
    back = read_model(fw)
    want = build(state(40, deny=True), resolve)
    assert back.devices == want.devices and back.sets == want.sets and back.deny_nets == want.deny_nets
    assert set(back.chains) == set(want.chains) and back.type_ids == want.type_ids
    # a restarted agent reads the table and converges on a smaller state: what nobody wants is swept
    b2 = Baselines(fw)
    b2.load()
    b2.apply(state(2), resolve)
    after = read_model(fw)
    assert after.devices == build(state(2), resolve).devices and after.deny_nets == ()
    assert b2.apply(state(2), resolve) == []
    b2.apply(None, resolve)
    assert read_model(fw) == Model(), "no baseline: every device object is gone"


@pytest.mark.kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_kernel_failed_change_leaves_the_table_as_it_was(inside):
    fw = Firewall(Naming("tst"), table="wicket")
    fw.ensure()
    b = Baselines(fw)
    b.apply(state(4), resolve)
    before = fw.list_table()[1]
    bad = build(state(5), resolve)
    bad.type_ids["p_doesnotexist"] = 0x59000001  # a jump to a missing chain: the kernel refuses the whole batch
    objs, _ = diff("wicket", b.applied, bad)
    with pytest.raises(FirewallError):
        fw.run(objs)
    assert json.loads(fw.list_table()[1]) == json.loads(before)


@pytest.mark.kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_kernel_grant_elements_time_out_by_themselves(inside):
    import time

    fw = Firewall(Naming("tst"), table="wicket")
    fw.ensure()
    key = ("192.0.2.11", "198.51.100.20", "tcp", 443)
    fw.commit(add=[fw.grant_elements([key], GRANT_MARK | 7, 0.2)])
    assert fw.grant_marks() == {key: GRANT_MARK | 7}
    time.sleep(2.6)  # timeout = ceil(0.2 + grace 1.0) = 2 s
    assert fw.grant_marks() == {}, "the kernel ended the grant without the agent"


@pytest.mark.kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_kernel_a_scans_worth_of_breaches_is_read_and_cleared_in_one_transaction(inside):
    # A device scanning every port fills dev_blocked; clearing it element by element once took the agent's loop
    # minutes (lanes would have ended late meanwhile).
    fw = Firewall(Naming("tst"), table="wicket")
    fw.ensure()
    elems = [{"concat": ["192.0.2.11", "198.51.100.10", "tcp", port]} for port in range(1, 20001)]
    fw.run([{"add": {"element": {"family": "inet", "table": "wicket", "name": "dev_blocked", "elem": elems}}}])
    rows, keys = fw.device_blocked()
    assert len(rows) == 20000 and rows[0][:3] == ("192.0.2.11", "198.51.100.10", "tcp")
    calls = []
    real = fw.nft.json_cmd
    fw.nft.json_cmd = lambda obj: calls.append(obj) or real(obj)
    fw.clear_device_blocked(keys)
    assert len(calls) == 1, "one transaction"
    assert fw.device_blocked()[0] == []
