"""Lane names, conntrack marks and lane link addresses: the agent's names for what it puts in the kernel."""

from __future__ import annotations

import ipaddress
import random
import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.naming import (
    DATA_MARK,
    IFNAMSIZ,
    MARK_CLASS,
    MARK_ID,
    TRANSPORT_MARK,
    Naming,
    data_mark,
    mark_id,
    transport_mark,
)

SESSION = st.text(alphabet=string.ascii_letters + string.digits + "._:-", min_size=1, max_size=64)


def random_session_ids(n: int, seed: int = 1234) -> list[str]:
    rnd = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + "._:-"
    out: set[str] = set()
    while len(out) < n:
        out.add(rnd.choice(string.ascii_letters) + "".join(rnd.choices(alphabet, k=rnd.randint(0, 40))))
    return sorted(out)


# ---- lane names ------------------------------------------------------------------------------------------


def test_lane_name_shape():
    n = Naming("ab1")
    name = n.lane_name("session-1")
    assert IFNAMSIZ == 15
    assert len(name) == 15
    assert name.startswith("wkab1")
    assert re.fullmatch(r"wkab1[a-z0-9]{10}", name)
    assert n.prefix == "wkab1"


def test_lane_name_known_values():
    # pinned: a changed derivation would orphan every lane of a running node on upgrade
    assert Naming("ab1").lane_name("s-1") == "wkab1amrrawoj2t"
    assert Naming("zz9").lane_name("s-1") == "wkzz9amrrawoj2t"
    assert Naming("ab1").lane_name("2f6c1d0e-session") == "wkab1mgeg2crrfu"
    assert mark_id("s-1", set()) == 1515120


@settings(max_examples=300, deadline=None)
@given(SESSION, st.from_regex(r"\A[a-z0-9]{3}\Z"))
def test_lane_name_properties(session_id, tag):
    n = Naming(tag)
    name = n.lane_name(session_id)
    assert len(name) == IFNAMSIZ
    assert name.startswith("wk" + tag)
    assert re.fullmatch(r"[a-z0-9]{15}", name)
    assert n.lane_name(session_id) == name  # deterministic
    assert Naming(tag).lane_name(session_id) == name  # ... across instances
    assert n.is_ours(name)


def test_no_collisions_over_10000_session_ids():
    n = Naming("ab1")
    ids = random_session_ids(10_000)
    names = {n.lane_name(s) for s in ids}
    assert len(names) == 10_000
    assert all(re.fullmatch(r"wkab1[a-z0-9]{10}", x) for x in names)


# ---- is_ours ---------------------------------------------------------------------------------------------


def test_is_ours_accepts_own_names_only():
    ours, theirs = Naming("ab1"), Naming("ab2")
    for sid in random_session_ids(200, seed=7):
        assert ours.is_ours(ours.lane_name(sid))
        assert not ours.is_ours(theirs.lane_name(sid))
        assert not theirs.is_ours(ours.lane_name(sid))


@pytest.mark.parametrize(
    "name",
    [
        "",
        "wk",
        "wkab",
        "wkab1",  # the prefix alone
        "wkab1abcdefghi",  # 14
        "wkab1abcdefghijk",  # 16
        "wkab2abcdefghij",  # another agent's tag
        "wkab0abcdefghij",
        "wkaabcdefghijkl",  # 'ab1' is not a prefix match of 'aab'
        "xwkab1abcdefghi",
        "WKAB1ABCDEFGHIJ",
        "eth0",
        "wg0",
        "veth1234567890a",
    ],
)
def test_is_ours_rejects_foreign_names(name):
    assert not Naming("ab1").is_ours(name)


def test_is_ours_rejects_a_tag_that_shares_a_prefix():
    # tag 'ab1' must never claim names of tag 'ab2' or 'ab12…' style look-alikes
    a = Naming("ab1")
    assert not a.is_ours(Naming("ab2").lane_name("x"))
    assert not a.is_ours(Naming("a1b").lane_name("x"))
    assert a.is_ours("wkab1" + "0" * 10)


@pytest.mark.parametrize("tag", ["", "ab", "abcd", "AB1", "ab-", "ab_", "a b", "ab\n", "ab;", "\u0430b1", "ab*"])
def test_bad_tags_rejected(tag):
    with pytest.raises(ValueError, match="agent tag .* must be exactly 3 characters"):
        Naming(tag)


def test_link_net_must_be_24_or_larger():
    with pytest.raises(ValueError, match="/24 or larger"):
        Naming("ab1", ipaddress.IPv4Network("10.0.0.0/25"))
    assert Naming("ab1", ipaddress.IPv4Network("10.0.0.0/24")).max_slots() == 127


# ---- marks -----------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(SESSION)
def test_mark_id_range_and_determinism(session_id):
    m = mark_id(session_id, set())
    assert 1 <= m <= 0xFFFFFF
    assert mark_id(session_id, set()) == m
    assert mark_id(session_id, {m + 100_000_000}) == m  # an unrelated taken id changes nothing


def test_mark_id_probes_past_taken_ids():
    for sid in random_session_ids(200, seed=99):
        first = mark_id(sid, set())
        second = mark_id(sid, {first})
        third = mark_id(sid, {first, second})
        assert len({first, second, third}) == 3
        assert all(1 <= x <= 0xFFFFFF for x in (first, second, third))
        if first < MARK_ID - 2:  # no wrap-around: probing is linear
            assert (second, third) == (first + 1, first + 2)


def test_mark_id_wraps_to_1_never_0():
    sid = "w10394"  # its probe starts 32 ids below the top of the 24-bit range
    start = mark_id(sid, set())
    assert start == MARK_ID - 32
    top = set(range(start, MARK_ID + 1))
    assert mark_id(sid, top) == 1
    assert mark_id(sid, top | {1}) == 2
    assert mark_id(sid, top | {1, 2, 3}) == 4


def test_mark_ids_spread_over_many_sessions():
    taken: set[int] = set()
    for sid in random_session_ids(5000, seed=5):
        m = mark_id(sid, taken)
        assert m not in taken
        taken.add(m)
    assert len(taken) == 5000


def test_mark_class_constants():
    # each class is one whole top byte, distinct, never 0 (an unmarked connection) and never overlapping ids
    for cls in (DATA_MARK, TRANSPORT_MARK):
        assert cls & MARK_ID == 0 and cls & MARK_CLASS == cls and cls != 0
    assert DATA_MARK != TRANSPORT_MARK
    assert MARK_CLASS | MARK_ID == 0xFFFFFFFF and MARK_CLASS & MARK_ID == 0


@pytest.mark.parametrize("lane_id", [1, 0x1234, 0xABCDEF, 0xFFFFFF])
def test_mark_classes(lane_id):
    assert data_mark(lane_id) & MARK_CLASS == DATA_MARK
    assert transport_mark(lane_id) & MARK_CLASS == TRANSPORT_MARK
    assert data_mark(lane_id) & MARK_ID == lane_id
    assert transport_mark(lane_id) & MARK_ID == lane_id
    assert data_mark(lane_id) != transport_mark(lane_id)
    assert data_mark(lane_id) >> 24 == DATA_MARK >> 24 and transport_mark(lane_id) >> 24 == TRANSPORT_MARK >> 24


def test_mark_values():
    assert data_mark(0x000102) == DATA_MARK + 0x102
    assert transport_mark(0x000102) == TRANSPORT_MARK + 0x102
    # marks of different lanes never collide, within or across classes
    ids = [1, 2, 0x10000, 0xFFFFFF]
    marks = [data_mark(i) for i in ids] + [transport_mark(i) for i in ids]
    assert len(set(marks)) == len(marks)


# ---- lane link addresses ---------------------------------------------------------------------------------


def test_default_link_pairs():
    n = Naming("ab1")
    assert n.max_slots() == 32767
    assert n.link_pair(1) == ("169.254.0.2", "169.254.0.3")
    assert n.link_pair(128) == ("169.254.1.0", "169.254.1.1")
    assert n.link_pair(32767) == ("169.254.255.254", "169.254.255.255")


@pytest.mark.parametrize("net", ["169.254.0.0/16", "10.20.16.0/20", "192.168.7.0/24"])
def test_link_pair_slot_round_trip(net):
    n = Naming("ab1", ipaddress.IPv4Network(net))
    link_net = ipaddress.IPv4Network(net)
    assert n.max_slots() == link_net.num_addresses // 2 - 1
    seen = set()
    for slot in range(1, n.max_slots() + 1):
        router, lane = n.link_pair(slot)
        r, lane_addr = ipaddress.IPv4Address(router), ipaddress.IPv4Address(lane)
        assert r in link_net and lane_addr in link_net
        assert int(lane_addr) == int(r) + 1 and int(r) % 2 == 0
        assert n.slot_of(router) == slot
        assert n.slot_of(lane) is None  # the lane side is odd: not a router address
        seen.add(router)
    assert len(seen) == n.max_slots()
    assert str(link_net.network_address) not in seen


def test_slash20_bounds():
    n = Naming("ab1", ipaddress.IPv4Network("10.20.16.0/20"))
    assert n.max_slots() == 2047
    assert n.link_pair(1) == ("10.20.16.2", "10.20.16.3")
    assert n.link_pair(2047) == ("10.20.31.254", "10.20.31.255")
    with pytest.raises(ValueError, match="slot 2048 out of range"):
        n.link_pair(2048)


@pytest.mark.parametrize("slot", [0, -1, 32768, 10**6])
def test_link_pair_rejects_bad_slots(slot):
    with pytest.raises(ValueError, match=f"slot {slot} out of range"):
        Naming("ab1").link_pair(slot)


@pytest.mark.parametrize("addr", ["169.254.0.0", "169.254.0.1", "169.254.0.3", "10.0.0.2", "169.255.0.2", "0.0.0.0"])
def test_slot_of_rejects_non_router_addresses(addr):
    assert Naming("ab1").slot_of(addr) is None
