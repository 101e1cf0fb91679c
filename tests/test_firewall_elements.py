"""The policy → nftables element compiler, pinned by golden files, and the template it feeds.

Golden files live in tests/golden/. After a reviewed, intended change, rewrite them with
    WICKET_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_firewall_elements.py
and review the diff before committing it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.firewall import (
    ACCOUNTING_SETS,
    KERNEL_GRACE_S,
    POLICY_SETS,
    Firewall,
    LaneRules,
    render_template,
)
from nodeagent.naming import Naming

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("WICKET_UPDATE_GOLDEN") == "1"
SECONDS_LEFT = 599.25  # → timeout 601
NAMING = Naming("ab1")


class DummyNft:
    """Only what the element compiler needs; records transactions for commit tests."""

    def __init__(self):
        self.json_output = None
        self.transactions: list[dict] = []
        self.rc = 0
        self.err = ""

    def set_json_output(self, flag):
        self.json_output = flag

    def json_cmd(self, obj):
        self.transactions.append(json.loads(json.dumps(obj)))
        return self.rc, "", self.err


def _rules(name: str, session_id: str, engineer: str, flows, *, lane_id: int, slot: int | None = None) -> LaneRules:
    # Literal names and marks: these goldens pin the element compiler, not the naming scheme (tests/test_naming.py).
    userspace = slot is not None
    return LaneRules(
        name=name,
        session_id=session_id,
        engineer_address=engineer,
        device_address="192.0.2.10",
        flows=tuple(flows),
        mark=0x57000000 | lane_id,
        transport_mark=0x58000000 | lane_id,
        listen_port=(51820 + slot) if userspace else None,
        transport_address=NAMING.link_pair(slot)[1] if userspace else None,
    )


LANES = {
    "userspace_with_transport": _rules(
        "wkab1hzvxuoaith", "sess-userspace-1", "100.64.0.2", [("tcp", 2404)], lane_id=0x372121, slot=1
    ),
    "kernel_without_transport": _rules(
        "wkab1iawpzx7inf", "sess-kernel-22", "100.64.0.3", [("udp", 20000)], lane_id=0xF3ECA1
    ),
    "several_ports": _rules(
        "wkab1wosqbnaeru",
        "sess-multi-333",
        "100.64.1.200",
        [("tcp", 502), ("tcp", 20000), ("tcp", 20001), ("tcp", 20002), ("udp", 47808), ("udp", 502)],
        lane_id=0xDA9E39,
        slot=7,
    ),
}


@pytest.fixture
def fw() -> Firewall:
    return Firewall(NAMING, nft=DummyNft())


def check_golden(name: str, data) -> None:
    path = GOLDEN / f"{name}.json"
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
        pytest.skip(f"rewrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}: review the diff")
    assert path.exists(), f"{path} is missing: run with WICKET_UPDATE_GOLDEN=1 and review it"
    expected = path.read_text()
    assert json.loads(text) == json.loads(expected), f"{name} differs from {path}"
    assert text == expected, f"{name}: same content, different formatting than {path}"


# ---- golden ----------------------------------------------------------------------------------------------


def test_policy_elements_golden(fw):
    check_golden("firewall_policy_elements", {k: fw.policy_elements(r, SECONDS_LEFT) for k, r in LANES.items()})


def test_policy_keys_golden(fw):
    check_golden("firewall_policy_keys", {k: fw.policy_keys(r) for k, r in LANES.items()})


def test_accounting_elements_golden(fw):
    check_golden("firewall_accounting_elements", {k: fw.accounting_elements(r.name) for k, r in LANES.items()})


def test_golden_inputs_are_what_they_claim():
    us, kern, multi = LANES.values()
    assert (us.listen_port, us.transport_address) == (51821, "169.254.0.3")
    assert (kern.listen_port, kern.transport_address) == (None, None)
    assert len(multi.flows) == 6
    assert all(NAMING.is_ours(r.name) for r in LANES.values())


# ---- helpers to read elements back -----------------------------------------------------------------------


def key_of(item):
    """The key of one element: maps hold [key, value]; keys with a timeout/comment are {"elem": {"val": key}}."""
    if isinstance(item, list):
        item = item[0]
    if isinstance(item, dict) and "elem" in item:
        item = item["elem"]["val"]
    return json.dumps(item, sort_keys=True)


def keys_by_set(elements: list[dict]) -> Counter:
    return Counter((e["name"], key_of(x)) for e in elements for x in e["elem"])


def element_metas(elements: list[dict]) -> list[dict]:
    out = []
    for e in elements:
        for x in e["elem"]:
            if isinstance(x, list):
                x = x[0]
            out.append(x["elem"] if isinstance(x, dict) and "elem" in x else None)
    return out


# ---- the template's sets ---------------------------------------------------------------------------------


def template_sets(text: str) -> dict[str, dict]:
    """set/map name -> {"kind", "type", "flags", "body"} from the rendered ruleset text."""
    out = {}
    for m in re.finditer(r"^\s*(set|map)\s+(\w+)\s*\{(.*?)^\s*\}", text, re.MULTILINE | re.DOTALL):
        kind, name, body = m.groups()
        type_ = re.search(r"^\s*type\s+(.+?)\s*$", body, re.MULTILINE).group(1)
        flags_m = re.search(r"^\s*flags\s+(.+?)\s*$", body, re.MULTILINE)
        flags = {f.strip() for f in flags_m.group(1).split(",")} if flags_m else set()
        out[name] = {"kind": kind, "type": type_, "flags": flags, "body": body}
    return out


@pytest.fixture(scope="module")
def sets() -> dict[str, dict]:
    text, _ = render_template("wicket", NAMING, 65535)
    return template_sets(text)


def test_template_declares_every_set_the_compiler_uses(sets):
    for name in POLICY_SETS:
        assert "timeout" in sets[name]["flags"], f"{name} must time out on its own"
    for name in ACCOUNTING_SETS:
        assert "timeout" not in sets[name]["flags"]
        assert re.search(r"^\s*counter\s*$", sets[name]["body"], re.MULTILINE), f"{name} must count"


def test_only_site_wide_networks_are_interval_sets(sets):
    # interval sets cost O(n) to change: only the site's own networks, set once, may be one
    assert {n for n, s in sets.items() if "interval" in s["flags"]} == {"tunnel_nets", "dev_deny_nets"}


def test_no_device_or_grant_element_goes_into_an_interval_set(fw, sets):
    from nodeagent.baseline import Model, build, diff
    from tests.test_baseline_rules import resolve, state

    interval = {n for n, s in sets.items() if "interval" in s["flags"]}
    objs, _ = diff("wicket", Model(), build(state(50), resolve))
    used = {next(iter(o["add"].values()))["name"] for o in objs if "add" in o and "element" in o["add"]}
    assert {"dev_type", "dev_addr", "type_chain"} <= used
    assert not (used - {"dev_deny_nets"}) & interval
    grant = fw.grant_elements([("192.0.2.11", "198.51.100.10", "tcp", 4059)], 0x58000001, 60)
    assert grant["name"] in sets and grant["name"] not in interval


def test_no_element_goes_into_an_interval_set(fw, sets):
    interval = {n for n, s in sets.items() if "interval" in s["flags"]}
    for lane in LANES.values():
        for elements in (fw.policy_elements(lane, 10), fw.policy_keys(lane), fw.accounting_elements(lane.name)):
            used = {e["name"] for e in elements}
            assert used <= set(sets), used - set(sets)
            assert not used & interval, f"per-lane elements in interval set(s) {used & interval}: O(n) deletes"


def test_element_shapes_match_the_declared_types(fw, sets):
    for lane in LANES.values():
        with_values = fw.policy_elements(lane, 10) + fw.accounting_elements(lane.name)
        keys_only = fw.policy_keys(lane)
        for e in with_values + keys_only:
            decl = sets[e["name"]]
            key_type = decl["type"].split(":")[0].strip()
            arity = len(key_type.split(" . "))
            assert e["family"] == "inet" and e["table"] == "wicket"
            for x in e["elem"]:
                # adding to a map needs [key, value]; deleting needs the key only
                expect_pair = decl["kind"] == "map" and any(e is w for w in with_values)
                assert isinstance(x, list) == expect_pair, (e["name"], x)
                key = json.loads(key_of(x))
                got = len(key["concat"]) if isinstance(key, dict) and "concat" in key else 1
                assert got == arity, (e["name"], key, key_type)


# ---- properties ------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=-1e6, max_value=1e8, allow_nan=False))
def test_every_policy_element_times_out_at_the_lane_end(seconds_left):
    fw = Firewall(NAMING, nft=DummyNft())
    expected = max(1, math.ceil(seconds_left + KERNEL_GRACE_S))
    for lane in LANES.values():
        metas = element_metas(fw.policy_elements(lane, seconds_left))
        assert metas and all(m is not None for m in metas)
        assert {m["timeout"] for m in metas} == {expected}
        assert all(isinstance(m["timeout"], int) and m["timeout"] >= 1 for m in metas)


@pytest.mark.parametrize("left,timeout", [(0, 1), (-50, 1), (0.0001, 2), (0.5, 2), (1, 2), (599.25, 601), (600, 601)])
def test_timeout_examples(fw, left, timeout):
    assert {m["timeout"] for m in element_metas(fw.policy_elements(LANES["several_ports"], left))} == {timeout}


def test_policy_keys_match_policy_elements(fw):
    for lane in LANES.values():
        assert keys_by_set(fw.policy_keys(lane)) == keys_by_set(fw.policy_elements(lane, 60))
        # and keys carry no timeout or value: they are for deleting
        for e in fw.policy_keys(lane):
            for x in e["elem"]:
                assert not isinstance(x, list) and not (isinstance(x, dict) and "elem" in x)


def test_policy_sets_used(fw):
    us, kern, _ = LANES.values()
    assert [e["name"] for e in fw.policy_elements(us, 5)] == list(POLICY_SETS)
    assert [e["name"] for e in fw.policy_elements(kern, 5)] == ["lane_flow", "lane_live", "lane_mark"]
    assert [e["name"] for e in fw.accounting_elements(us.name)] == list(ACCOUNTING_SETS)


def test_userspace_lane_without_transport_address_gets_no_transport_elements(fw):
    lane = LANES["userspace_with_transport"]
    half = LaneRules(**{**lane.__dict__, "transport_address": None})
    assert [e["name"] for e in fw.policy_elements(half, 5)] == ["lane_flow", "lane_live", "lane_mark"]
    assert [e["name"] for e in fw.policy_keys(half)] == ["lane_flow", "lane_live", "lane_mark"]


def test_lane_mark_comment_is_the_session(fw):
    for lane in LANES.values():
        (mark_elem,) = [e for e in fw.policy_elements(lane, 5) if e["name"] == "lane_mark"]
        assert mark_elem["elem"] == [[{"elem": {"val": lane.name, "timeout": 6, "comment": lane.session_id}}, lane.mark]]


def test_one_flow_element_per_port(fw):
    lane = LANES["several_ports"]
    (flow,) = [e for e in fw.policy_elements(lane, 5) if e["name"] == "lane_flow"]
    got = [tuple(x["elem"]["val"]["concat"]) for x in flow["elem"]]
    assert got == [(lane.name, lane.engineer_address, lane.device_address, p, n) for p, n in lane.flows]


def test_table_name_is_used(fw):
    other = Firewall(NAMING, table="wk_other", nft=DummyNft())
    lane = LANES["kernel_without_transport"]
    assert {e["table"] for e in other.policy_elements(lane, 5) + other.accounting_elements(lane.name)} == {"wk_other"}


# ---- transactions ----------------------------------------------------------------------------------------


def test_commit_is_one_transaction_deletes_first():
    nft = DummyNft()
    fw = Firewall(NAMING, nft=nft)
    assert nft.json_output is True
    old, new = LANES["kernel_without_transport"], LANES["userspace_with_transport"]
    fw.commit(add=fw.policy_elements(new, 5), delete=fw.policy_keys(old))
    assert len(nft.transactions) == 1
    objs = nft.transactions[0]["nftables"]
    verbs = [next(iter(o)) for o in objs]
    assert verbs == ["delete"] * 3 + ["add"] * 6
    assert [o["delete"]["element"]["name"] for o in objs[:3]] == ["lane_flow", "lane_live", "lane_mark"]
    fw.commit()
    assert len(nft.transactions) == 1  # nothing to do: no transaction


def test_delete_tolerant_deletes_one_by_one_and_ignores_missing():
    nft = DummyNft()
    fw = Firewall(NAMING, nft=nft)
    nft.rc, nft.err = 1, "Error: Could not process rule: No such file or directory"
    lane = LANES["several_ports"]
    assert fw.delete_tolerant(fw.policy_keys(lane)) == []
    assert len(nft.transactions) == 6 + 2 + 3  # every flow alone, then live, mark, and three transport elements
    assert all(len(t["nftables"][0]["delete"]["element"]["elem"]) == 1 for t in nft.transactions)
    nft.rc, nft.err = 1, "Error: Permission denied\n"
    assert fw.delete_tolerant(fw.accounting_elements(lane.name)) == ["Error: Permission denied"] * 3


# ---- the template ----------------------------------------------------------------------------------------


def test_render_template_substitutes_everything():
    raw = resources.files("nft_templates").joinpath("wicket.nft").read_text()
    assert set(re.findall(r"\$\{(\w+)\}", raw)) == {"table", "lane_glob", "blocked_size", "template_version"}
    text, version = render_template("wk_test", Naming("cd2"), 4096)
    assert "${" not in text and "$" not in text
    assert re.fullmatch(r"[0-9a-f]{12}", version)
    assert re.search(r"^table inet wk_test \{$", text, re.MULTILINE)
    assert f'comment "wicket-agent ruleset {version}: managed by wicket-agent, do not edit"' in text
    assert re.search(r"^\s*size 4096$", text, re.MULTILINE)


def test_lane_glob_is_quoted():
    text, _ = render_template("wicket", Naming("cd2"), 65535)
    assert 'iifname "wkcd2*" jump from_lane' in text
    assert 'oifname "wkcd2*" jump to_lane' in text
    assert re.search(r'iifname "wkcd2\*" jump refuse', text)
    # no unquoted glob anywhere (nft would read `wkcd2*` as a syntax error or worse)
    assert re.findall(r"(?<!\")wkcd2\*", text) == []
    rules = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert sum(line.count('"wkcd2*"') for line in rules) == 3


def test_template_version_follows_the_template_not_the_variables():
    t1, v1 = render_template("wicket", Naming("ab1"), 65535)
    t2, v2 = render_template("other", Naming("zz9"), 1024)
    assert v1 == v2 and t1 != t2
    assert Firewall(NAMING, nft=DummyNft()).version == v1
