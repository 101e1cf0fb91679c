"""The agent's kernel plumbing against the real kernel, each test in its own network namespace:
rtnetlink, the nft table (atomicity, timeouts, counters read by key), conntrack dump/flush/events."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import time

import pytest

from nodeagent import netns, rtnl
from nodeagent.ctnl import Conntrack, DestroyListener
from nodeagent.errors import FirewallError
from nodeagent.firewall import Firewall, LaneRules
from nodeagent.naming import Naming, data_mark, transport_mark
from nodeagent.netlink import NetlinkError
from nodeagent.nftraw import NftSets, key_ifname

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]


# ---- rtnetlink ----


def test_rtnl_builds_veth_into_another_namespace(ns, inside):
    other = ns.add("b")
    fd = ns.fd(other)
    with rtnl.Rtnl() as rt:
        rtnl.add_veth(rt, "wktsta", "peer0", fd)
        link = rtnl.get_link(rt, "wktsta")
        rtnl.add_addr(rt, link.index, "169.254.0.2", 31)
        rtnl.set_up(rt, link.index)
        rtnl.add_route(rt, "100.64.0.2/32", gateway="169.254.0.3")
        assert [lk.name for lk in rtnl.list_links(rt, "wkts")] == ["wktsta"]
        assert (link.index, "169.254.0.2", 31) in rtnl.list_addrs(rt)
        with pytest.raises(NetlinkError) as exc:
            rtnl.get_link(rt, "nosuchlink")
        assert exc.value.errno == errno.ENODEV
        with pytest.raises(NetlinkError) as exc:
            rtnl.add_veth(rt, "wktsta", "peer1")
        assert exc.value.errno == errno.EEXIST
    os.close(fd)
    routes = ns.exec(inside, "ip", "route", "show", "proto", "87").stdout
    assert "100.64.0.2 via 169.254.0.3 dev wktsta" in routes
    assert "peer0" in ns.exec(other, "ip", "-br", "link").stdout


def test_rtnl_policy_rules(inside, ns):
    with rtnl.Rtnl() as rt:
        rtnl.add_rule(rt, 200, table=rtnl.RT_TABLE_LOCAL)
        rtnl.del_rule(rt, 0, table=rtnl.RT_TABLE_LOCAL)
        rtnl.add_rule(rt, 100, iif="tun0", table=200)
        rtnl.add_rule(rt, 110, iif="uplink", src="203.0.113.0/24", dst="169.254.0.3/32", table=rtnl.RT_TABLE_LOCAL)
        rtnl.add_rule(rt, 190, iif="uplink", dst="169.254.0.3/32", blackhole=True)
    rules = ns.exec(inside, "ip", "rule").stdout
    assert rules.splitlines()[0].startswith("100:\tfrom all iif tun0 ")  # "[detached]": tun0 does not exist here
    assert rules.splitlines()[0].endswith("lookup 200")
    rules = rules.replace(" [detached]", "")
    assert "110:\tfrom 203.0.113.0/24 to 169.254.0.3 iif uplink lookup local" in rules
    assert "190:\tfrom all to 169.254.0.3 iif uplink blackhole" in rules
    lines = rules.splitlines()
    assert "0:\tfrom all lookup local" not in lines and "200:\tfrom all lookup local" in lines


# ---- nftables ----


def _lane(naming: Naming, sid: str, port: int) -> LaneRules:
    return LaneRules(
        name=naming.lane_name(sid), session_id=sid, engineer_address="100.64.0.2", device_address="192.0.2.10",
        flows=(("tcp", 2404), ("tcp", 2405)), mark=data_mark(5), transport_mark=transport_mark(5),
        listen_port=port, transport_address="169.254.0.3",
    )


def _ruleset(ns, name) -> str:
    # element timeouts count down while we look: compare everything but the remaining time
    return re.sub(r"expires [0-9hms]+", "expires …", ns.exec(name, "nft", "list", "ruleset").stdout)


def test_firewall_loads_once_and_views_elements(inside, ns):
    naming = Naming("tst")
    fw = Firewall(naming, table="wicket")
    assert fw.ensure() == "loaded ruleset"
    assert fw.ensure() is None, "same template version: the table is left alone"
    lane = _lane(naming, "s-1", 51820)
    fw.commit(add=fw.policy_elements(lane, 60) + fw.accounting_elements(lane.name))
    view = fw.view()
    assert view.marks == {lane.name: lane.mark}
    assert view.sessions == {lane.name: "s-1"}
    assert view.transports == {51820: "169.254.0.3"}
    assert view.flows[lane.name] == {("100.64.0.2", "192.0.2.10", "tcp", 2404), ("100.64.0.2", "192.0.2.10", "tcp", 2405)}
    assert view.accounted == {lane.name}
    fw.commit(delete=fw.policy_keys(lane))
    assert fw.view().marks == {}


def test_failed_batch_leaves_ruleset_unchanged(inside, ns):
    naming = Naming("tst")
    fw = Firewall(naming, table="wicket")
    fw.ensure()
    first = _lane(naming, "s-1", 51820)
    fw.commit(add=fw.policy_elements(first, 60))
    before = _ruleset(ns, inside)
    second = _lane(naming, "s-2", 51821)
    good = fw.policy_elements(second, 60)
    bad = {"family": "inet", "table": "wicket", "name": "lane_flow", "elem": [{"concat": ["x", "not-an-address", "192.0.2.1", "tcp", 1]}]}
    with pytest.raises(FirewallError):
        fw.commit(add=good + [bad])
    assert _ruleset(ns, inside) == before, "a refused batch must change nothing"
    missing = fw.policy_keys(second)
    with pytest.raises(FirewallError) as exc:
        fw.commit(add=fw.policy_elements(second, 60), delete=missing)  # deleting what is not there
    assert exc.value.missing
    assert _ruleset(ns, inside) == before


def test_hostile_strings_stay_data(inside, ns):
    naming = Naming("tst")
    fw = Firewall(naming, table="wicket")
    fw.ensure()
    lane = _lane(naming, 'x"; flush ruleset; "', 51820)
    fw.commit(add=fw.policy_elements(lane, 60))
    assert fw.view().sessions[lane.name] == 'x"; flush ruleset; "'
    assert "table inet wicket" in _ruleset(ns, inside)


def test_kernel_timeouts_end_a_lane_without_the_agent(inside, ns):
    naming = Naming("tst")
    fw = Firewall(naming, table="wicket")
    fw.ensure()
    lane = _lane(naming, "s-1", 51820)
    fw.commit(add=fw.policy_elements(lane, 0.1))  # timeout = 1 s + grace, rounded up
    assert fw.view().marks
    time.sleep(2.3)
    assert fw.view().marks == {}, "the kernel removed the expired elements by itself"
    with pytest.raises(FirewallError):
        fw.commit(delete=fw.policy_keys(lane))
    assert fw.delete_tolerant(fw.policy_keys(lane)) == []


def test_counters_and_refused_destinations_are_read_by_key(ns):
    """Traffic from a client namespace through a router namespace into a lane-named interface."""
    router, client = ns.add("r"), ns.add("c")
    naming = Naming("tst")
    name = naming.lane_name("s-1")
    subprocess.run(["ip", "link", "add", name, "netns", router, "type", "veth", "peer", "name", "eth0", "netns", client], check=True)
    for cmd in (
        [router, "ip", "addr", "add", "192.0.2.1/24", "dev", name], [router, "ip", "link", "set", name, "up"],
        [client, "ip", "addr", "add", "192.0.2.10/24", "dev", "eth0"], [client, "ip", "link", "set", "eth0", "up"],
    ):
        ns.exec(*cmd, check=True)
    fd = ns.fd(router)
    try:
        with netns.entered(fd):
            fw = Firewall(naming, table="wicket")
            fw.ensure()
            fw.commit(add=fw.accounting_elements(name))
    finally:
        os.close(fd)
    # the router itself is not reachable from a lane: UDP probes to it are refused and remembered
    size, count = 100, 7
    ns.exec(client, "python3", "-c",
            f"import socket;s=socket.socket(2,2)\nfor i in range({count}): s.sendto(b'x'*{size},('192.0.2.1',{5000 + 0}))",
            check=True)
    fd = ns.fd(router)
    try:
        with netns.entered(fd):
            sets = NftSets("wicket")
            refused = sets.counter("lane_refused", key_ifname(name))
            assert (refused.packets, refused.bytes) == (count, count * (size + 28))
            assert sets.counter("lane_refused", key_ifname("wktstnosuchlane")) is None
            blocked, to_delete = fw.blocked({name})
            assert blocked[name] == ([("192.0.2.1", "udp", 5000, count)], False)
            assert fw.blocked({name})[0][name] == blocked[name], "reading alone removes nothing"
            assert fw.delete_tolerant(to_delete) == []
            assert fw.blocked({name})[0][name] == ([], False), "deleting what was read empties it"
            assert fw.counters(name)["lane_refused"] == (count, count * (size + 28))
            fw.delete_tolerant(fw.accounting_elements(name))
            assert fw.counters(name) is None, "no accounting elements: None, not zeros"
            sets.close()
    finally:
        os.close(fd)


# ---- conntrack ----


def test_conntrack_dump_flush_and_destroy_events(ns):
    a, b = ns.add("a"), ns.add("b")
    subprocess.run(["ip", "link", "add", "eth0", "netns", a, "type", "veth", "peer", "name", "eth0", "netns", b], check=True)
    ns.exec(a, "ip", "addr", "add", "192.0.2.1/24", "dev", "eth0", check=True)
    ns.exec(b, "ip", "addr", "add", "192.0.2.2/24", "dev", "eth0", check=True)
    ns.exec(a, "ip", "link", "set", "eth0", "up", check=True)
    ns.exec(b, "ip", "link", "set", "eth0", "up", check=True)
    mark = data_mark(77)
    rules = f"table inet t {{ chain o {{ type filter hook output priority 0; udp dport 7000 ct mark set {mark}; }}; }}"
    ns.exec(a, "nft", rules, check=True)
    ns.exec(a, "sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1", "net.netfilter.nf_conntrack_timestamp=1", check=True)
    fd = ns.fd(a)
    try:
        with netns.entered(fd):
            seen = []
            listener = DestroyListener(want=lambda m: m == mark, on_flow=seen.append, on_overrun=lambda: None)
            listener.start()
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for _ in range(5):
                s.sendto(b"y" * 50, ("192.0.2.2", 7000))
            s.close()
            ct = Conntrack()
            [flow] = ct.dump(mark)
            assert (flow.proto_name, flow.dst, flow.dport, flow.packets_orig, flow.bytes_orig) == ("udp", "192.0.2.2", 7000, 5, 5 * 78)
            assert flow.start_ns and abs(flow.start_ns / 1e9 - time.time()) < 5
            assert ct.dump(mark + 1) == []
            ct.flush(mark)
            assert ct.dump(mark) == []
            assert listener.wait_idle(2.0)
            assert [f.id for f in seen] == [flow.id] and seen[0].stop_ns
            listener.stop()
            ct.close()
    finally:
        os.close(fd)


def test_destroy_listener_ignores_other_marks(ns):
    a = ns.add("a")
    fd = ns.fd(a)
    try:
        with netns.entered(fd):
            seen = []
            listener = DestroyListener(want=lambda m: False, on_flow=seen.append, on_overrun=lambda: None)
            listener.start()
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.sendto(b"z", ("127.0.0.1", 9))
            s.close()
            Conntrack().flush(0, 0)  # everything
            assert listener.wait_idle(2.0)
            assert seen == []
            listener.stop()
    finally:
        os.close(fd)


def test_template_validates_with_nft_check(tmp_path):
    fw = Firewall(Naming("tst"), table="wicket", nft=_Offline())
    path = tmp_path / "wicket.nft"
    path.write_text(fw.text)
    res = subprocess.run(["nft", "-c", "-f", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


class _Offline:
    def set_json_output(self, _flag):
        pass


def test_table_json_is_what_view_expects(inside):
    fw = Firewall(Naming("tst"), table="wicket")
    fw.ensure()
    rc, out, _err = fw.nft.cmd("list table inet wicket")
    names = {o.get("set", o.get("map", {})).get("name") for o in json.loads(out)["nftables"]}
    assert {"lane_flow", "lane_live", "lane_mark", "lane_transport", "lane_tx", "lane_rx", "lane_refused", "lane_blocked"} <= names
