"""Kernel WireGuard lanes (nodeagent/wg/kernel.py) against fakes of pyroute2's WireGuard client and of rtnl.

CI has no wireguard module; these tests pin exactly what the backend asks the kernel for.
"""

from __future__ import annotations

import base64
import errno
import inspect
from dataclasses import dataclass

import pytest

from nodeagent import rtnl
from nodeagent.keys import public_of
from nodeagent.naming import Naming
from nodeagent.wg import kernel
from nodeagent.wg.base import Box, BoxRequest, PeerStats
from nodeagent.wg.kernel import KernelBackend

NAMING = Naming("ab1")
PRIV = base64.b64encode(bytes(range(1, 33))).decode()
PEER = base64.b64encode(bytes([5] * 32)).decode()
PRIV_B, PEER_B = PRIV.encode(), PEER.encode()  # pyroute2 hands keys back as base64 bytes
NAME = NAMING.lane_name("s-1")


class Msg:
    """Like a pyroute2 netlink message: attributes by name through get_attr()."""

    def __init__(self, **attrs):
        self.attrs = attrs

    def get_attr(self, name):
        return self.attrs.get(name)


def device_msg(private=PRIV_B, port=51820, peers=()):
    return Msg(WGDEVICE_A_PRIVATE_KEY=private, WGDEVICE_A_LISTEN_PORT=port, WGDEVICE_A_PEERS=list(peers))


def peer_msg(public=PEER_B, rx=0, tx=0, handshake=None, endpoint=None, allowed=("100.64.0.2/32",)):
    return Msg(
        WGPEER_A_PUBLIC_KEY=public,
        WGPEER_A_RX_BYTES=rx,
        WGPEER_A_TX_BYTES=tx,
        WGPEER_A_LAST_HANDSHAKE_TIME=handshake,
        WGPEER_A_ENDPOINT=endpoint,
        WGPEER_A_ALLOWEDIPS=[{"addr": a} for a in allowed],
    )


class FakeWg:
    def __init__(self):
        self.calls: list = []
        self.devices: dict[str, list[Msg]] = {}
        self.fail_set: Exception | None = None

    def set(self, name, **kw):
        self.calls.append(("set", name, kw))
        if self.fail_set:
            raise self.fail_set

    def info(self, name):
        self.calls.append(("info", name))
        if name not in self.devices:
            raise OSError(errno.ENODEV, "No such device")
        return tuple(self.devices[name])


@dataclass(frozen=True)
class FakeLink:
    index: int
    name: str
    up: bool = False
    kind: str | None = None


def _bind(real, *args, **kw) -> None:
    """Fail like the real function would on a call it does not accept (keeps the fake honest)."""
    inspect.signature(real).bind(*args, **kw)


class FakeLinks:
    """The subset of nodeagent.rtnl the backend uses; every call is recorded in order and checked against the
    real function's signature."""

    RT = object()

    def __init__(self):
        self.calls: list = []
        self.links: dict[str, FakeLink] = {}
        self.next_index = 10
        self.fail: dict[str, Exception] = {}

    def Rtnl(self):  # noqa: N802 - mirrors rtnl.Rtnl
        self.calls.append(("Rtnl",))
        return self.RT

    def _maybe_fail(self, op):
        if op in self.fail:
            raise self.fail[op]

    def add_link(self, rt, name, kind):
        _bind(rtnl.add_link, rt, name, kind)
        assert rt is self.RT
        self.calls.append(("add_link", name, kind))
        self._maybe_fail("add_link")
        self.links[name] = FakeLink(self.next_index, name, False, kind)
        self.next_index += 1

    def get_link(self, rt, name):
        _bind(rtnl.get_link, rt, name)
        assert rt is self.RT
        self.calls.append(("get_link", name))
        if name not in self.links:
            raise OSError(errno.ENODEV, "No such device")
        return self.links[name]

    def set_up(self, rt, index, **kw):
        _bind(rtnl.set_up, rt, index, **kw)
        assert kw.get("up", True) is True
        self.calls.append(("set_up", index))
        self._maybe_fail("set_up")

    def add_route(self, rt, dst, **kw):
        _bind(rtnl.add_route, rt, dst, **kw)
        self.calls.append(("add_route", dst, kw))
        self._maybe_fail("add_route")

    def del_link(self, rt, index):
        _bind(rtnl.del_link, rt, index)
        self.calls.append(("del_link", index))
        for name, link in list(self.links.items()):
            if link.index == index:
                del self.links[name]

    def list_links(self, rt, *args, **kw):
        _bind(rtnl.list_links, rt, *args, **kw)
        prefix = args[0] if args else kw.get("prefix", "")
        self.calls.append(("list_links", prefix))
        return list(self.links.values())  # deliberately unfiltered: the backend must filter itself


@pytest.fixture
def sysctls(monkeypatch):
    written: list[str] = []
    monkeypatch.setattr(kernel, "_disable_ipv6", written.append)
    return written


@pytest.fixture
def env(sysctls):
    wg, links = FakeWg(), FakeLinks()
    return KernelBackend(NAMING, wg=wg, links=links), wg, links, sysctls


def request(**kw) -> BoxRequest:
    d = dict(name=NAME, private_key=PRIV, listen_port=51820, peer_public_key=PEER, engineer_address="100.64.0.2", slot=1)
    d.update(kw)
    return BoxRequest(**d)


def test_constructor_opens_one_rtnl(sysctls):
    links = FakeLinks()
    KernelBackend(NAMING, wg=FakeWg(), links=links)
    assert links.calls == [("Rtnl",)]
    links2 = FakeLinks()
    KernelBackend(NAMING, wg=FakeWg(), links=links2, rt=links2.RT)
    assert links2.calls == []


def test_create_exact_calls(env):
    backend, wg, links, sysctls = env
    links.calls.clear()
    box = backend.create(request())
    assert links.calls[:3] == [("add_link", NAME, "wireguard"), ("get_link", NAME), ("set_up", 10)]
    assert len(links.calls) == 4
    op, dst, route = links.calls[3]
    assert (op, dst, route["oif"]) == ("add_route", "100.64.0.2/32", 10)  # the engineer's /32 via the lane link
    assert route.get("gateway") is None and route.get("table", rtnl.RT_TABLE_MAIN) == rtnl.RT_TABLE_MAIN
    assert wg.calls == [
        ("set", NAME, {
            "private_key": PRIV,
            "listen_port": 51820,
            "peer": {"public_key": PEER, "allowed_ips": ["100.64.0.2/32"]},
        })
    ]
    assert sysctls == [NAME]
    assert box == Box(
        name=NAME, listen_port=51820, node_public_key=public_of(PRIV), peer_public_key=PEER,
        engineer_address="100.64.0.2", slot=None, transport_address=None, pid=None, router_link=True, device=True,
    )
    assert backend.kind == "kernel"


@pytest.mark.parametrize("where", ["wg.set", "set_up", "add_route"])
def test_create_failure_cleans_up(env, where):
    backend, wg, links, _ = env
    boom = OSError(errno.EADDRINUSE, "Address in use")
    if where == "wg.set":
        wg.fail_set = boom
    else:
        links.fail[where] = boom
    links.calls.clear()
    with pytest.raises(OSError) as exc:
        backend.create(request())
    assert exc.value is boom
    assert ("del_link", 10) in links.calls
    assert links.calls[-2:] == [("get_link", NAME), ("del_link", 10)]
    assert links.links == {}


def test_create_failure_when_link_cannot_be_added_touches_nothing_else(env):
    backend, wg, links, sysctls = env
    links.fail["add_link"] = OSError(errno.EEXIST, "File exists")
    links.calls.clear()
    with pytest.raises(OSError):
        backend.create(request())
    assert links.calls == [("add_link", NAME, "wireguard")]
    assert wg.calls == [] and sysctls == []


def test_destroy(env):
    backend, _wg, links, _ = env
    backend.create(request())
    links.calls.clear()
    backend.destroy(NAME)
    assert links.calls == [("get_link", NAME), ("del_link", 10)]
    assert links.links == {}


def test_destroy_of_a_missing_lane_is_quiet(env):
    backend, _wg, links, _ = env
    links.calls.clear()
    backend.destroy(NAME, wait=True)
    assert links.calls == [("get_link", NAME)]


def test_observe_only_our_wireguard_links(env):
    backend, wg, links, _ = env
    ours = NAMING.lane_name("s-1")
    ours_no_info = NAMING.lane_name("s-2")
    for name, kind in [
        (ours, "wireguard"),
        (ours_no_info, "wireguard"),
        (NAMING.lane_name("s-3"), "veth"),  # our name, wrong kind
        (Naming("ab2").lane_name("s-1"), "wireguard"),  # another agent's
        ("wkab1short", "wireguard"),  # our prefix, wrong length
        ("wg0", "wireguard"),
        ("eth0", None),
    ]:
        links.links[name] = FakeLink(len(links.links) + 1, name, True, kind)
    wg.devices[ours] = [
        device_msg(port=40001, peers=[peer_msg(allowed=("100.64.0.9/32",))]),
    ]
    links.calls.clear()
    boxes = backend.observe()
    assert links.calls == [("list_links", "wkab1")]
    assert sorted(boxes) == sorted([ours, ours_no_info])
    assert boxes[ours] == Box(
        name=ours, listen_port=40001, node_public_key=public_of(PRIV), peer_public_key=PEER,
        engineer_address="100.64.0.9", router_link=True, device=True,
    )
    assert boxes[ours_no_info] == Box(name=ours_no_info, router_link=True, device=True)
    assert sorted(c[1] for c in wg.calls if c[0] == "info") == sorted([ours, ours_no_info])


def test_observe_device_without_peers_or_key(env):
    backend, wg, links, _ = env
    links.links[NAME] = FakeLink(3, NAME, True, "wireguard")
    wg.devices[NAME] = [device_msg(private=None, port=0, peers=[])]
    box = backend.observe()[NAME]
    assert (box.node_public_key, box.peer_public_key, box.engineer_address, box.listen_port) == (None, None, None, 0)


def test_observe_accepts_str_keys_too(env):
    backend, wg, links, _ = env
    links.links[NAME] = FakeLink(3, NAME, True, "wireguard")
    wg.devices[NAME] = [device_msg(private=PRIV, peers=[peer_msg(public=PEER, allowed=())])]
    box = backend.observe()[NAME]
    assert (box.node_public_key, box.peer_public_key, box.engineer_address) == (public_of(PRIV), PEER, None)


def test_stats(env):
    backend, wg, _links, _ = env
    wg.devices[NAME] = [
        device_msg(peers=[peer_msg(rx=1234, tx=5678, handshake={"tv_sec": 1_800_000_000, "tv_nsec": 5},
                                   endpoint={"addr": "203.0.113.7", "port": 40123})])
    ]
    assert backend.stats(NAME) == PeerStats(rx_bytes=1234, tx_bytes=5678, last_handshake=1_800_000_000.0,
                                            endpoint="203.0.113.7:40123")


def test_stats_before_any_handshake(env):
    backend, wg, _links, _ = env
    wg.devices[NAME] = [device_msg(peers=[peer_msg(handshake={"tv_sec": 0, "tv_nsec": 0})])]
    assert backend.stats(NAME) == PeerStats(rx_bytes=0, tx_bytes=0, last_handshake=None, endpoint=None)


def test_stats_without_peers_and_without_device(env):
    backend, wg, _links, _ = env
    wg.devices[NAME] = [device_msg(peers=[])]
    assert backend.stats(NAME) == PeerStats()
    assert backend.stats("wkab1nosuchlane") is None


def test_reap_is_a_no_op(env):
    backend, wg, links, _ = env
    links.calls.clear()
    backend.reap()
    assert links.calls == [] and wg.calls == []


def test_disable_ipv6_writes_the_interface_sysctl(monkeypatch):
    written = []
    monkeypatch.setattr(kernel.netns, "write_sysctl", lambda key, value: written.append((key, value)))
    kernel._disable_ipv6(NAME)
    assert written == [(f"net.ipv6.conf.{NAME}.disable_ipv6", 1)]

    def missing(key, value):
        raise FileNotFoundError(key)

    monkeypatch.setattr(kernel.netns, "write_sysctl", missing)
    kernel._disable_ipv6(NAME)  # IPv6 compiled out: tolerated


def test_stats_ipv6_endpoint_is_bracketed(env):
    backend, wg, _links, _ = env
    wg.devices[NAME] = [device_msg(peers=[peer_msg(endpoint={"addr": "2001:db8::7", "port": 40123})])]
    assert backend.stats(NAME).endpoint == "[2001:db8::7]:40123"
