"""Inventory API: sites and their agents, role grants that name sites, device passports (every field,
every refusal, uniqueness, updates, lifecycle, listing and scope), and signed passports.

Every test runs on SQLite and PostgreSQL (the `ctl` fixture). The example policy is applied first; the
sites are north-1 (10.20.0.0/16) and south-1 (10.30.0.0/16)."""

from __future__ import annotations

import base64
import json
from datetime import datetime

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi.testclient import TestClient

from nodeagent.wire import SignedPassport, key_id

from .conftest import example_policy_files
from .helpers import admin, eid_for, headers, iccid_for, iso
from .portal import shared_client

API = "/api/v1"
NORTH_NET, SOUTH_NET = "10.20.0.0/16", "10.30.0.0/16"


# ---- helpers ----

















def two_sites(ctl) -> None:
    ctl.apply_policy()
    ctl.add_site("north-1", lan_networks=[NORTH_NET])
    ctl.add_site("south-1", lan_networks=[SOUTH_NET])


def inventory_events(ctl) -> list[tuple[str, str]]:
    return [(e["type"], e["subject"]) for e in ctl.events() if e["category"] == "inventory"]


def problem_fields(res) -> set[str]:
    """The fields a 422 names: the `problems` of a device check, or the field before ':' of a format error."""
    body = res.json()
    if "problems" in body:
        return {p["field"] for p in body["problems"]}
    return {part.split(":", 1)[0].split(".", 1)[0].strip() for part in body["detail"].split("; ")}


def site_body(name: str, **fields) -> dict:
    return {"name": name, "display_name": name.title(), "time_zone": "UTC", "tunnel_pool": "100.90.0.0/24",
            "port_min": 51000, "port_max": 51999, "public_endpoint": "203.0.113.1", **fields}


def full_device(asset_id: str, n: int, **fields) -> dict:
    return {"asset_id": asset_id, "site": "north-1", "device_type": "substation-rtu", "addresses": ["10.20.0.17", "10.20.1.17"],
            "mac": f"02:00:00:00:{n // 256:02x}:{n % 256:02x}", "iccid": iccid_for(n), "eid": eid_for(n),
            "imsis": [f"26201{n:010d}"], "firmware": "4.2.1", "lifecycle": "active", "ports": {"iec104": 2405},
            "description": "Feeder 7, bay 3", **fields}


# ---- sites ----


def test_only_an_admin_creates_sites_with_step_up(ctl):
    ctl.apply_policy()
    ctl.add_site("north-1")
    boss = ctl.add_user("boss", roles=[("site_admin", "north-1")])
    eng = ctl.add_user("eng", roles=[("engineer", None)])
    for person in (boss, eng):
        res = ctl.client.post(f"{API}/sites", json=site_body("east-1"), headers=headers(ctl, person, step_up=True))
        assert res.status_code == 403, res.text
    res = ctl.client.post(f"{API}/sites", json=site_body("east-1"), headers=admin(ctl))
    assert res.status_code == 401 and res.json()["error"] == "step_up_required"
    assert ctl.client.get(f"{API}/sites/east-1", headers=admin(ctl)).status_code == 404

    created = ctl.add_site("east-1", time_zone="Europe/Berlin", lan_networks=["10.40.0.0/16"], change_windows=["weeknights"])
    assert (created["name"], created["time_zone"], created["revision"], created["devices"]) == ("east-1", "Europe/Berlin", 1, 0)
    assert created["change_windows"] == ["weeknights"] and created["lan_networks"] == ["10.40.0.0/16"]
    res = ctl.client.post(f"{API}/sites", json=site_body("east-1", tunnel_pool="100.91.0.0/24"), headers=ctl.step_up_admin())
    assert res.status_code == 409 and "exists already" in res.json()["detail"]
    ev = [e for e in ctl.events() if e["type"] == "site.create" and e["subject"] == "east-1"]
    assert len(ev) == 1 and ev[0]["category"] == "inventory" and ev[0]["actor"] == "root"
    assert ev[0]["body"]["time_zone"] == "Europe/Berlin"


def test_site_fields_are_validated(ctl):
    ctl.apply_policy()
    ctl.add_site("north-1", tunnel_pool="100.64.0.0/22")

    def create(**fields):
        return ctl.client.post(f"{API}/sites", json=site_body("east-1", **fields), headers=ctl.step_up_admin())

    res = create(tunnel_pool="100.64.2.0/24")
    assert res.status_code == 409 and "overlaps site north-1" in res.json()["detail"]
    res = create(tunnel_pool="100.64.0.0/16")  # a pool that contains another overlaps it too
    assert res.status_code == 409, res.text
    for fields, words in [
        ({"tunnel_pool": "100.90.0.0/31"}, "tunnel_pool"),
        ({"tunnel_pool": "100.90.0.1/24"}, "tunnel_pool"),       # host bits set: not a network
        ({"tunnel_pool": "fd00::/64"}, "tunnel_pool"),
        ({"port_min": 52000, "port_max": 51000}, "port_max must be at least port_min"),
        ({"port_min": 80}, "port_min"),
        ({"port_max": 70000}, "port_max"),
        ({"time_zone": "Mars/Olympus_Mons"}, "time_zone"),
        ({"time_zone": "Mars/Olympus_Mons"}, "IANA time zone"),
        ({"lan_networks": ["10.40.0.1/16"]}, "lan_networks"),
        ({"change_windows": ["fortnightly"]}, "fortnightly"),
        ({"change_windows": ["fortnightly"]}, "weeknights"),     # the message lists the windows there are
    ]:
        res = create(**fields)
        assert res.status_code == 422, (fields, res.text)
        assert words in res.json()["detail"], (fields, res.json())
    assert ctl.client.get(f"{API}/sites/east-1", headers=admin(ctl)).status_code == 404
    site = ctl.add_site("east-1", port_min=60000, port_max=60000, change_windows=["weeknights", "weekend"])
    assert (site["port_min"], site["port_max"]) == (60000, 60000)

    # The same checks on a change.
    res = ctl.client.patch(f"{API}/sites/east-1", json={"tunnel_pool": "100.64.1.0/24"}, headers=ctl.step_up_admin())
    assert res.status_code == 409 and "north-1" in res.json()["detail"]
    res = ctl.client.patch(f"{API}/sites/east-1", json={"change_windows": ["nope"]}, headers=ctl.step_up_admin())
    assert res.status_code == 422 and "nope" in res.json()["detail"]
    res = ctl.client.patch(f"{API}/sites/east-1", json={"time_zone": "Europe/Nowhere"}, headers=ctl.step_up_admin())
    assert res.status_code == 422 and "time_zone" in res.json()["detail"]
    after = ctl.client.get(f"{API}/sites/east-1", headers=admin(ctl)).json()
    assert after["revision"] == 1 and after["port_max"] == 60000 and after["time_zone"] == "UTC"


def test_a_site_with_change_windows_needs_a_policy(ctl):
    res = ctl.client.post(f"{API}/sites", json=site_body("east-1", change_windows=["weeknights"]), headers=ctl.step_up_admin())
    assert res.status_code == 409 and "no policy" in res.json()["detail"]
    assert ctl.add_site("east-1")["change_windows"] == []  # without windows, no policy is needed


def test_site_update_by_its_site_admin_only(ctl):
    two_sites(ctl)
    alice = ctl.add_user("alice", roles=[("site_admin", "north-1")])
    bob = ctl.add_user("bob", roles=[("site_admin", "south-1"), ("engineer", "north-1")])
    carol = ctl.add_user("carol", roles=[("site_admin", "south-1")])
    dave = ctl.add_user("dave", roles=[("engineer", "north-1")])
    eve = ctl.add_user("eve", roles=[("engineer", "south-1")])

    # Someone who can see north-1 but does not manage it: 403. Someone who cannot see it: 404.
    for person, status in ((bob, 403), (dave, 403), (carol, 404), (eve, 404)):
        res = ctl.client.patch(f"{API}/sites/north-1", json={"display_name": "Taken"}, headers=headers(ctl, person, step_up=True))
        assert res.status_code == status, (person.username, res.text)
    assert ctl.client.get(f"{API}/sites/north-1", headers=headers(ctl, eve)).status_code == 404
    assert ctl.client.get(f"{API}/sites/north-1", headers=headers(ctl, dave)).status_code == 200
    assert [s["name"] for s in ctl.client.get(f"{API}/sites", headers=headers(ctl, eve)).json()] == ["south-1"]
    assert ctl.client.get(f"{API}/sites/north-1", headers=admin(ctl)).json()["revision"] == 1

    res = ctl.client.patch(f"{API}/sites/north-1", json={"display_name": "North One", "port_max": 52999},
                           headers=headers(ctl, alice, step_up=True))
    assert res.status_code == 200, res.text
    site = res.json()
    assert (site["display_name"], site["port_max"], site["port_min"], site["revision"]) == ("North One", 52999, 51000, 2)
    res = ctl.client.patch(f"{API}/sites/north-1", json={"display_name": "North One"}, headers=headers(ctl, alice, step_up=True))
    assert res.status_code == 200 and res.json()["revision"] == 2  # nothing changed: no new revision
    res = ctl.client.patch(f"{API}/sites/north-1", json={"display_name": None}, headers=headers(ctl, alice, step_up=True))
    assert res.status_code == 422
    res = ctl.client.patch(f"{API}/sites/north-1", json={"port_max": 53999}, headers=headers(ctl, alice))
    assert res.status_code == 401 and res.json()["error"] == "step_up_required"

    updates = [e for e in ctl.events() if e["type"] == "site.update"]
    assert len(updates) == 1, updates
    assert updates[0]["actor"] == "alice" and updates[0]["category"] == "inventory"
    assert updates[0]["body"]["changes"] == {"display_name": "North One", "port_max": 52999}
    # Deleting is for admins only, even for the site's own site_admin.
    assert ctl.client.delete(f"{API}/sites/north-1", headers=headers(ctl, alice, step_up=True)).status_code == 403


def test_lan_networks_change_refused_while_a_device_would_fall_outside(ctl):
    two_sites(ctl)
    ctl.add_device("rtu-1", "north-1", addresses=["10.20.0.17"])
    ctl.add_device("rtu-2", "north-1", addresses=["10.20.5.1"])

    res = ctl.client.patch(f"{API}/sites/north-1", json={"lan_networks": ["10.20.0.0/24"]}, headers=ctl.step_up_admin())
    assert res.status_code == 409, res.text
    assert "rtu-2" in res.json()["detail"] and "rtu-1" not in res.json()["detail"]
    assert ctl.client.get(f"{API}/sites/north-1", headers=admin(ctl)).json()["lan_networks"] == [NORTH_NET]

    res = ctl.client.patch(f"{API}/sites/north-1", json={"lan_networks": ["10.20.0.0/24", "10.20.5.0/24"]}, headers=ctl.step_up_admin())
    assert res.status_code == 200 and res.json()["lan_networks"] == ["10.20.0.0/24", "10.20.5.0/24"]
    res = ctl.client.patch(f"{API}/sites/north-1", json={"lan_networks": []}, headers=ctl.step_up_admin())
    assert res.status_code == 200 and res.json()["lan_networks"] == []  # none: addresses are not checked
    # With no networks any address goes; narrowing again is checked against it.
    ctl.add_device("rtu-3", "north-1", addresses=["172.16.0.9"])
    res = ctl.client.patch(f"{API}/sites/north-1", json={"lan_networks": [NORTH_NET]}, headers=ctl.step_up_admin())
    assert res.status_code == 409 and "rtu-3" in res.json()["detail"]


def test_site_delete_refused_while_devices_agents_or_grants_remain(ctl):
    two_sites(ctl)
    eng = ctl.add_user("eng", roles=[("engineer", "north-1")])
    ctl.add_device("rtu-1", "north-1", lifecycle="decommissioned")
    res = ctl.client.post(f"{API}/sites/north-1/agents", json={"name": "agent-n1"}, headers=ctl.step_up_admin())
    assert res.status_code == 201, res.text

    def delete():
        return ctl.client.delete(f"{API}/sites/north-1", headers=ctl.step_up_admin())

    res = delete()
    assert res.status_code == 409 and "1 device(s), 1 agent(s) and 1 role grant(s)" in res.json()["detail"]
    assert ctl.client.delete(f"{API}/devices/rtu-1", headers=ctl.step_up_admin()).status_code == 204
    res = delete()
    assert res.status_code == 409 and "0 device(s), 1 agent(s)" in res.json()["detail"]
    assert ctl.client.delete(f"{API}/sites/north-1/agents/agent-n1", headers=ctl.step_up_admin()).status_code == 204
    res = delete()
    assert res.status_code == 409 and "1 role grant(s)" in res.json()["detail"]
    res = ctl.client.put(f"{API}/users/{eng.user_id}/roles", json={"roles": [{"role": "engineer", "site": "south-1"}]},
                         headers=ctl.step_up_admin())
    assert res.status_code == 200, res.text
    assert ctl.client.get(f"{API}/sites/north-1", headers=admin(ctl)).status_code == 200
    assert delete().status_code == 204
    assert ctl.client.get(f"{API}/sites/north-1", headers=admin(ctl)).status_code == 404
    assert ctl.client.delete(f"{API}/sites/north-1", headers=ctl.step_up_admin()).status_code == 404
    assert ("site.delete", "north-1") in inventory_events(ctl)


def test_agents_are_added_and_removed_by_the_site_admin(ctl):
    two_sites(ctl)
    alice = ctl.add_user("alice", roles=[("site_admin", "north-1")])
    res = ctl.client.post(f"{API}/sites/north-1/agents", json={"name": "agent-n1", "description": "Cabinet 2"},
                          headers=headers(ctl, alice, step_up=True))
    assert res.status_code == 201, res.text
    assert res.json()["agents"] == [{"name": "agent-n1", "description": "Cabinet 2"}]
    # Agent names are unique across sites; a site_admin elsewhere cannot add to south-1.
    res = ctl.client.post(f"{API}/sites/south-1/agents", json={"name": "agent-n1"}, headers=ctl.step_up_admin())
    assert res.status_code == 409 and "agent-n1" in res.json()["detail"]
    res = ctl.client.post(f"{API}/sites/south-1/agents", json={"name": "agent-s1"}, headers=headers(ctl, alice, step_up=True))
    assert res.status_code == 404
    res = ctl.client.post(f"{API}/sites/north-1/agents", json={"name": "-bad name"}, headers=headers(ctl, alice, step_up=True))
    assert res.status_code == 422
    res = ctl.client.post(f"{API}/sites/north-1/agents", json={"name": "agent-n2"}, headers=headers(ctl, alice))
    assert res.status_code == 401

    ctl.client.post(f"{API}/sites/north-1/agents", json={"name": "agent-n0"}, headers=ctl.step_up_admin())
    site = ctl.client.get(f"{API}/sites/north-1", headers=headers(ctl, alice)).json()
    assert [a["name"] for a in site["agents"]] == ["agent-n0", "agent-n1"]
    res = ctl.client.delete(f"{API}/sites/north-1/agents/agent-n9", headers=headers(ctl, alice, step_up=True))
    assert res.status_code == 404
    res = ctl.client.delete(f"{API}/sites/south-1/agents/agent-n1", headers=ctl.step_up_admin())
    assert res.status_code == 404  # the agent exists, but not at that site
    res = ctl.client.delete(f"{API}/sites/north-1/agents/agent-n1", headers=headers(ctl, alice, step_up=True))
    assert res.status_code == 204
    site = ctl.client.get(f"{API}/sites/north-1", headers=admin(ctl)).json()
    assert [a["name"] for a in site["agents"]] == ["agent-n0"]
    ev = [(e["type"], e["subject"], e["actor"], e["body"].get("site")) for e in ctl.events() if e["category"] == "inventory"
          and e["type"].startswith("agent.")]
    assert ev == [("agent.add", "agent-n1", "alice", "north-1"), ("agent.add", "agent-n0", "root", "north-1"),
                  ("agent.remove", "agent-n1", "alice", "north-1")]


def test_role_grants_for_a_missing_site_are_refused(ctl):
    ctl.add_site("north-1")
    body = {"username": "ghost", "display_name": "Ghost", "password": "correct horse battery staple",
            "roles": [{"role": "engineer", "site": "nowhere-1"}]}
    res = ctl.client.post(f"{API}/users", json=body, headers=ctl.step_up_admin())
    assert res.status_code == 422
    assert "no site 'nowhere-1'" in res.json()["detail"] and "create it first" in res.json()["detail"]
    users = ctl.client.get(f"{API}/users", headers=admin(ctl)).json()
    assert "ghost" not in [u["username"] for u in users]

    eng = ctl.add_user("eng", roles=[("engineer", "north-1")])
    res = ctl.client.put(f"{API}/users/{eng.user_id}/roles", json={"roles": [{"role": "engineer", "site": "north-1"},
                                                                             {"role": "approver", "site": "nowhere-1"}]},
                         headers=ctl.step_up_admin())
    assert res.status_code == 422 and "no site 'nowhere-1'" in res.json()["detail"]
    user = ctl.client.get(f"{API}/users/{eng.user_id}", headers=admin(ctl)).json()
    assert user["roles"] == [{"role": "engineer", "site": "north-1"}]


# ---- devices ----


def test_device_with_every_passport_field(ctl):
    two_sites(ctl)
    seen = iso(ctl.t - 60)
    body = full_device("RTU-0001", 1, mac="02-00-00-00-00-01", last_seen=seen)
    res = ctl.client.post(f"{API}/devices", json=body, headers=ctl.step_up_admin())
    assert res.status_code == 201, res.text
    dev = ctl.client.get(f"{API}/devices/RTU-0001", headers=admin(ctl)).json()
    assert dev["mac"] == "02:00:00:00:00:01"  # normalised
    for key in ("asset_id", "site", "device_type", "addresses", "iccid", "eid", "imsis", "firmware", "lifecycle", "ports", "description"):
        assert dev[key] == body[key], key
    assert datetime.fromisoformat(dev["last_seen"]) == datetime.fromisoformat(seen)
    assert dev["revision"] == 1
    ev = [e for e in ctl.events() if e["type"] == "device.create"]
    assert len(ev) == 1 and ev[0]["subject"] == "RTU-0001" and ev[0]["category"] == "inventory"
    assert ev[0]["body"]["site"] == "north-1"
    res = ctl.client.post(f"{API}/devices", json=full_device("RTU-0001", 2), headers=ctl.step_up_admin())
    assert res.status_code == 409 and "exists already" in res.json()["detail"]
    assert ctl.client.get(f"{API}/sites/north-1", headers=admin(ctl)).json()["devices"] == 1


def test_each_invalid_device_field_is_refused_naming_the_field(ctl):
    two_sites(ctl)
    good = iccid_for(5)
    bad_iccid = good[:-1] + str((int(good[-1]) + 1) % 10)
    good_eid = eid_for(5)
    bad_eid = good_eid[:-1] + str((int(good_eid[-1]) + 1) % 10)
    cases = [
        ({"iccid": bad_iccid}, "iccid", "check digit"),
        ({"iccid": "1234"}, "iccid", "not an ICCID"),
        ({"eid": bad_eid}, "eid", "check digits"),
        ({"eid": "8904"}, "eid", "not an EID"),
        ({"mac": "02:00:00:00:00"}, "mac", "not a MAC"),
        ({"mac": "01:00:5e:00:00:01"}, "mac", "multicast"),
        ({"imsis": ["26201"]}, "imsis", "not an IMSI"),
        ({"addresses": ["2001:db8::1"]}, "addresses", "IPv4"),
        ({"addresses": ["127.0.0.1"]}, "addresses", "loopback"),
        ({"addresses": ["10.99.0.1"]}, "addresses", "outside site north-1's networks"),
        ({"addresses": []}, "addresses", ""),
        ({"addresses": ["10.20.0.1", "10.20.0.1"]}, "addresses", "10.20.0.1 listed twice"),
        ({"imsis": ["262011234567890", "262011234567890"]}, "imsis", "262011234567890 listed twice"),
        ({"device_type": "toaster"}, "device_type", "not a device type of the active policy"),
        ({"site": "nowhere-1"}, "site", "no site"),
        ({"ports": {"telnet-ish": 23}}, "ports", "not a protocol of the catalogue"),
        ({"ports": {"iec104": 0}}, "ports", ""),
        ({"last_seen": iso(ctl.t + 3600)}, "last_seen", "in the future"),
        ({"last_seen": "2026-01-01T00:00:00"}, "last_seen", "timezone"),
        ({"lifecycle": "broken"}, "lifecycle", ""),
        ({"asset_id": "-leading-dash"}, "asset_id", ""),
    ]
    wrong = []
    for i, (fields, field, words) in enumerate(cases):
        res = ctl.client.post(f"{API}/devices", json={**full_device(f"bad-{i}", 10 + i), **fields}, headers=ctl.step_up_admin())
        if res.status_code != 422 or field not in problem_fields(res) or words not in res.text:
            wrong.append((fields, res.status_code, res.text))
    assert not wrong, wrong
    page = ctl.client.get(f"{API}/devices", headers=admin(ctl)).json()
    assert page["devices"] == []
    assert not [e for e in ctl.events() if e["type"] == "device.create"]
    # A device API caller sees every check-level problem at once, not only the first.
    res = ctl.client.post(f"{API}/devices", json=full_device("bad-x", 99, device_type="toaster", addresses=["10.99.0.1"],
                                                           ports={"nope": 1}), headers=ctl.step_up_admin())
    assert res.status_code == 422 and problem_fields(res) == {"device_type", "addresses", "ports"}


def test_a_lan_address_belongs_to_one_device_per_site(ctl):
    two_sites(ctl)
    ctl.add_site("west-1", lan_networks=[NORTH_NET])  # the same private range at another site is another LAN
    ctl.add_device("rtu-a", "north-1", addresses=["10.20.0.5", "10.20.0.6"])
    ctl.add_device("rtu-w", "west-1", addresses=["10.20.0.5"])
    res = ctl.client.post(f"{API}/devices", json={"asset_id": "rtu-b", "site": "north-1", "device_type": "substation-rtu",
                                                 "addresses": ["10.20.0.7", "10.20.0.6"]}, headers=ctl.step_up_admin())
    assert res.status_code == 422 and problem_fields(res) == {"addresses"}, res.text
    assert "10.20.0.6 is also the address of rtu-a" in res.text and "10.20.0.7" not in res.json()["detail"]
    ctl.add_device("rtu-b", "north-1", addresses=["10.20.0.7"])
    # Taking another device's address, or moving onto a site where the address is taken, is refused too.
    res = ctl.client.patch(f"{API}/devices/rtu-b", json={"addresses": ["10.20.0.5"]}, headers=ctl.step_up_admin())
    assert res.status_code == 422 and "10.20.0.5 is also the address of rtu-a" in res.text
    res = ctl.client.patch(f"{API}/devices/rtu-w", json={"site": "north-1"}, headers=ctl.step_up_admin())
    assert res.status_code == 422 and "10.20.0.5 is also the address of rtu-a" in res.text
    # Its own addresses again, and a changed field next to them, are fine.
    res = ctl.client.patch(f"{API}/devices/rtu-a", json={"addresses": ["10.20.0.6", "10.20.0.5"], "firmware": "2"},
                           headers=ctl.step_up_admin())
    assert res.status_code == 200, res.text


def test_iccid_and_eid_are_unique_across_devices(ctl):
    two_sites(ctl)
    ctl.add_device("rtu-a", "north-1", iccid=iccid_for(1), eid=eid_for(1))
    ctl.add_device("rtu-b", "south-1", addresses=["10.30.0.5"], iccid=iccid_for(2), eid=eid_for(2))
    for field, value in (("iccid", iccid_for(1)), ("eid", eid_for(1))):
        res = ctl.client.post(f"{API}/devices", json={"asset_id": "rtu-c", "site": "north-1", "device_type": "substation-rtu",
                                                     "addresses": ["10.20.0.9"], field: value}, headers=ctl.step_up_admin())
        assert res.status_code == 422 and problem_fields(res) == {field}, res.text
        assert "already bound to rtu-a" in res.text
        res = ctl.client.patch(f"{API}/devices/rtu-b", json={field: value}, headers=ctl.step_up_admin())
        assert res.status_code == 422 and "already bound to rtu-a" in res.text
    assert ctl.client.get(f"{API}/devices/rtu-b", headers=admin(ctl)).json()["iccid"] == iccid_for(2)
    # A site admin of south-1 learns that the SIM is taken, but not by which device elsewhere.
    sam = ctl.add_user("sam", roles=[("site_admin", "south-1")])
    for field, value in (("iccid", iccid_for(1)), ("eid", eid_for(1))):
        res = ctl.client.post(f"{API}/devices", json={"asset_id": "rtu-s", "site": "south-1", "device_type": "substation-rtu",
                                                     "addresses": ["10.30.0.9"], field: value}, headers=headers(ctl, sam, step_up=True))
        assert res.status_code == 422 and "already bound to a device at a site you cannot see" in res.text, res.text
        assert "rtu-a" not in res.text
    # Re-stating a device's own SIM is not a clash; freeing one lets another device take it.
    res = ctl.client.patch(f"{API}/devices/rtu-a", json={"iccid": iccid_for(1), "eid": eid_for(1)}, headers=ctl.step_up_admin())
    assert res.status_code == 200 and res.json()["revision"] == 1
    assert ctl.client.patch(f"{API}/devices/rtu-a", json={"iccid": None}, headers=ctl.step_up_admin()).json()["iccid"] is None
    res = ctl.client.patch(f"{API}/devices/rtu-b", json={"iccid": iccid_for(1)}, headers=ctl.step_up_admin())
    assert res.status_code == 200 and res.json()["iccid"] == iccid_for(1)


def test_update_changes_only_the_given_fields(ctl):
    two_sites(ctl)
    created = ctl.client.post(f"{API}/devices", json=full_device("rtu-1", 1), headers=ctl.step_up_admin()).json()

    def patch(body, expect=200):
        res = ctl.client.patch(f"{API}/devices/rtu-1", json=body, headers=ctl.step_up_admin())
        assert res.status_code == expect, res.text
        return res.json()

    dev = patch({"firmware": "4.3.0"})
    assert dev["firmware"] == "4.3.0" and dev["revision"] == 2
    for key in ("addresses", "mac", "iccid", "eid", "imsis", "ports", "description", "lifecycle", "site", "device_type"):
        assert dev[key] == created[key], key
    # last_seen is posture, not passport: it moves updated_at, not the revision.
    before = dev["updated_at"]
    dev = patch({"last_seen": iso(ctl.t)})
    assert dev["revision"] == 2 and dev["last_seen"] is not None and dev["updated_at"] != before
    assert patch({"firmware": "4.3.0"})["revision"] == 2  # the same value: no change
    dev = patch({"mac": None, "addresses": ["10.20.9.9"], "ports": {}})
    assert (dev["mac"], dev["addresses"], dev["ports"], dev["revision"]) == (None, ["10.20.9.9"], {}, 3)
    assert dev["iccid"] == created["iccid"] and dev["firmware"] == "4.3.0"
    for body in ({"addresses": None}, {"lifecycle": None}, {"site": None}, {"addresses": ["10.99.0.1"]}, {"site": "nowhere-1"},
                 {"device_type": "toaster"}, {"last_seen": iso(ctl.t + 7200)}):
        patch(body, expect=422)
    assert ctl.client.get(f"{API}/devices/rtu-1", headers=admin(ctl)).json()["revision"] == 3

    # Moving a device to another site checks the new site's networks.
    patch({"site": "south-1"}, expect=422)
    dev = patch({"site": "south-1", "addresses": ["10.30.0.4"]})
    assert (dev["site"], dev["revision"]) == ("south-1", 4)
    updates = [e["body"]["changes"] for e in ctl.events() if e["type"] == "device.update"]
    assert updates[0] == {"firmware": "4.3.0"}
    assert set(updates[1]) == {"last_seen"}
    assert updates[-1] == {"addresses": ["10.30.0.4"], "site": "south-1"}
    assert len(updates) == 4


def test_lifecycle_changes_and_delete_only_when_decommissioned(ctl):
    two_sites(ctl)
    dev = ctl.add_device("rtu-1", "north-1", lifecycle="provisioned")
    assert dev["lifecycle"] == "provisioned"
    assert ctl.client.post(f"{API}/devices", json={"asset_id": "rtu-2", "site": "north-1", "device_type": "substation-rtu",
                                                  "addresses": ["10.20.0.2"]}, headers=ctl.step_up_admin()).json()["lifecycle"] == "provisioned"
    res = ctl.client.delete(f"{API}/devices/rtu-1", headers=ctl.step_up_admin())
    assert res.status_code == 409 and "decommission it" in res.json()["detail"]
    revision = 1
    for state in ("active", "quarantined", "active", "decommissioned"):
        res = ctl.client.patch(f"{API}/devices/rtu-1", json={"lifecycle": state}, headers=ctl.step_up_admin())
        revision += 1
        assert res.status_code == 200 and (res.json()["lifecycle"], res.json()["revision"]) == (state, revision), res.text
    alice = ctl.add_user("alice", roles=[("site_admin", "south-1"), ("engineer", "north-1")])
    assert ctl.client.delete(f"{API}/devices/rtu-1", headers=headers(ctl, alice, step_up=True)).status_code == 403
    assert ctl.client.delete(f"{API}/devices/rtu-1", headers=ctl.step_up_admin()).status_code == 204
    assert ctl.client.get(f"{API}/devices/rtu-1", headers=admin(ctl)).status_code == 404
    assert ctl.client.delete(f"{API}/devices/rtu-1", headers=ctl.step_up_admin()).status_code == 404
    changes = [e["body"]["changes"].get("lifecycle") for e in ctl.events() if e["type"] == "device.update" and e["subject"] == "rtu-1"]
    assert changes == ["active", "quarantined", "active", "decommissioned"]
    assert ("device.delete", "rtu-1") in inventory_events(ctl)


def test_device_changes_need_site_admin_at_the_site(ctl):
    two_sites(ctl)
    alice = ctl.add_user("alice", roles=[("site_admin", "north-1"), ("engineer", "south-1")])
    eng = ctl.add_user("eng", roles=[("engineer", "north-1")])
    body = {"asset_id": "rtu-1", "site": "north-1", "device_type": "substation-rtu", "addresses": ["10.20.0.1"]}
    assert ctl.client.post(f"{API}/devices", json=body, headers=headers(ctl, eng, step_up=True)).status_code == 403
    assert ctl.client.post(f"{API}/devices", json=body, headers=headers(ctl, alice)).status_code == 401
    assert ctl.client.post(f"{API}/devices", json=body, headers=headers(ctl, alice, step_up=True)).status_code == 201
    south = {**body, "asset_id": "rtu-2", "site": "south-1", "addresses": ["10.30.0.1"]}
    assert ctl.client.post(f"{API}/devices", json=south, headers=headers(ctl, alice, step_up=True)).status_code == 403
    ctl.add_device("rtu-2", "south-1", addresses=["10.30.0.1"])
    assert ctl.client.patch(f"{API}/devices/rtu-2", json={"firmware": "x"}, headers=headers(ctl, alice, step_up=True)).status_code == 403
    # Moving her own device to a site she does not manage is refused too.
    res = ctl.client.patch(f"{API}/devices/rtu-1", json={"site": "south-1", "addresses": ["10.30.0.9"]},
                           headers=headers(ctl, alice, step_up=True))
    assert res.status_code == 403
    assert ctl.client.patch(f"{API}/devices/rtu-1", json={"firmware": "x"}, headers=headers(ctl, eng, step_up=True)).status_code == 403
    assert ctl.client.get(f"{API}/devices/rtu-1", headers=admin(ctl)).json()["site"] == "north-1"


def test_listing_filters_pages_and_scope(ctl):
    two_sites(ctl)
    for i in range(5):
        ctl.add_device(f"n-rtu-{i}", "north-1", addresses=[f"10.20.0.{i + 1}"], lifecycle="active" if i % 2 else "provisioned")
    for i in range(2):
        ctl.add_device(f"n-mc-{i}", "north-1", "meter-concentrator", addresses=[f"10.20.1.{i + 1}"])
    for i in range(3):
        ctl.add_device(f"s-rtu-{i}", "south-1", addresses=[f"10.30.0.{i + 1}"])

    def all_ids(h, **params):
        ids, after, pages = [], None, 0
        while True:
            res = ctl.client.get(f"{API}/devices", params={**params, **({"after": after} if after else {})}, headers=h)
            assert res.status_code == 200, res.text
            page = res.json()
            ids += [d["asset_id"] for d in page["devices"]]
            pages += 1
            if page["next_after"] is None:
                return ids, pages
            assert page["next_after"] == ids[-1]
            after = page["next_after"]

    everything = sorted([f"n-rtu-{i}" for i in range(5)] + ["n-mc-0", "n-mc-1"] + [f"s-rtu-{i}" for i in range(3)])
    ids, pages = all_ids(admin(ctl), limit=3)
    assert ids == everything and pages == 4
    ids, pages = all_ids(admin(ctl), limit=10)
    assert ids == everything and pages == 1  # an exactly full last page says so: no empty extra page
    assert all_ids(admin(ctl), site="south-1")[0] == ["s-rtu-0", "s-rtu-1", "s-rtu-2"]
    assert all_ids(admin(ctl), device_type="meter-concentrator")[0] == ["n-mc-0", "n-mc-1"]
    assert all_ids(admin(ctl), lifecycle="provisioned")[0] == ["n-rtu-0", "n-rtu-2", "n-rtu-4"]
    assert all_ids(admin(ctl), prefix="n-rtu", lifecycle="active", limit=1)[0] == ["n-rtu-1", "n-rtu-3"]
    assert all_ids(admin(ctl), prefix="x")[0] == []
    assert ctl.client.get(f"{API}/devices", params={"limit": 0}, headers=admin(ctl)).status_code == 422
    assert ctl.client.get(f"{API}/devices", params={"lifecycle": "gone"}, headers=admin(ctl)).status_code == 422

    eng = ctl.add_user("eng", roles=[("engineer", "north-1")])
    h = headers(ctl, eng)
    assert all_ids(h, limit=4)[0] == [x for x in everything if x.startswith("n-")]
    assert all_ids(h, site="south-1")[0] == []
    assert ctl.client.get(f"{API}/devices/s-rtu-0", headers=h).status_code == 404
    assert ctl.client.get(f"{API}/devices/s-rtu-0/passport", headers=h).status_code == 404
    assert ctl.client.get(f"{API}/devices/n-rtu-0", headers=h).status_code == 200
    soc = ctl.add_user("soc", roles=[("soc", None)])
    assert all_ids(headers(ctl, soc))[0] == everything



def test_prefix_filter_is_case_sensitive_on_every_database(ctl):
    ctl.apply_policy()
    ctl.add_site("north-1")
    for i, asset_id in enumerate(("RTU-1", "rtu-2", "rtu_3", "rtuX4")):
        ctl.add_device(asset_id, "north-1", addresses=[f"10.20.0.{i + 1}"])

    def listed(prefix):
        return [d["asset_id"] for d in ctl.client.get(f"{API}/devices", params={"prefix": prefix}, headers=admin(ctl)).json()["devices"]]

    assert listed("rtu_") == ["rtu_3"]  # '_' is a character here, not a LIKE wildcard
    assert listed("RTU") == ["RTU-1"]
    assert sorted(listed("rtu")) == ["rtu-2", "rtuX4", "rtu_3"]


# ---- signed passports ----


def signed(ctl, asset_id: str, h: dict | None = None) -> tuple[dict, str]:
    res = ctl.client.get(f"{API}/devices/{asset_id}/passport", headers=h or admin(ctl))
    assert res.status_code == 200, res.text
    key = ctl.client.get(f"{API}/controller/signing-key", headers=h or admin(ctl)).json()
    return res.json(), key["public_key"]


def test_passport_verifies_and_carries_the_baseline_of_its_type(ctl):
    two_sites(ctl)
    eng = ctl.add_user("eng", roles=[("engineer", "north-1")])
    ctl.client.post(f"{API}/devices", json=full_device("rtu-1", 1), headers=ctl.step_up_admin())
    ctl.add_device("mc-1", "north-1", "meter-concentrator", addresses=["10.20.1.1"])
    ctl.add_device("der-1", "north-1", "der-gateway", addresses=["10.20.2.1"])
    h = headers(ctl, eng)
    key = ctl.client.get(f"{API}/controller/signing-key", headers=h).json()
    assert key["key_id"] == key_id(base64.b64decode(key["public_key"]))
    policy = ctl.client.get(f"{API}/policy", headers=h).json()
    types = ctl.client.get(f"{API}/device-types", headers=h).json()
    protocols = ctl.client.get(f"{API}/protocols", headers=h).json()
    destinations = policy["document"]["destinations"]

    for asset_id, dtype in (("rtu-1", "substation-rtu"), ("mc-1", "meter-concentrator"), ("der-1", "der-gateway")):
        body, public_key = signed(ctl, asset_id, h)
        passport = SignedPassport.model_validate(body).verify(public_key)
        device = ctl.client.get(f"{API}/devices/{asset_id}", headers=h).json()
        assert (passport.asset_id, passport.device_type, passport.site) == (asset_id, dtype, "north-1")
        assert passport.addresses == device["addresses"] and passport.mac == device["mac"]
        assert (passport.sim.iccid, passport.sim.eid, passport.sim.imsis) == (device["iccid"], device["eid"], device["imsis"])
        assert (passport.firmware, passport.lifecycle, passport.revision) == (device["firmware"], device["lifecycle"], device["revision"])
        assert passport.policy_version == policy["version"]
        want = []
        for flow in types[dtype]["baseline"]:
            proto = protocols[flow["protocol"]]
            to = [{"name": n, "addresses": destinations[n].get("addresses") or [], "fqdn": destinations[n].get("fqdn")}
                  for n in flow["to"]]
            want.append({"protocol": flow["protocol"], "transport": proto["transport"], "ports": flow.get("ports") or proto["ports"],
                         "to": sorted(to, key=lambda d: d["name"])})
        got = [{**f.model_dump(mode="json"), "to": sorted(f.model_dump(mode="json")["to"], key=lambda d: d["name"])}
               for f in passport.baseline]
        assert got == want and got, asset_id
    rtu, _ = signed(ctl, "rtu-1")
    flow = rtu["passport"]["baseline"][0]
    assert (flow["protocol"], flow["transport"], flow["ports"]) == ("iec104", "tcp", [2404])
    assert {d["name"]: d["addresses"] for d in flow["to"]} == {"scada-master-a": ["198.51.100.10"], "scada-master-b": ["198.51.100.11"]}
    mc, _ = signed(ctl, "mc-1")
    assert mc["passport"]["baseline"][0]["to"] == [{"name": "mdm", "addresses": [], "fqdn": "mdm.grid.example.net"}]
    assert mc["passport"]["baseline"][0]["transport"] == "tcp+udp"


def test_passport_flow_ports_follow_the_policy_override(ctl):
    two_sites(ctl)
    ctl.add_device("rtu-1", "north-1")
    files = example_policy_files()
    doc = yaml.safe_load(files["device-types.yaml"])
    doc["device_types"]["substation-rtu"]["baseline"][0]["ports"] = [2405, 2406]
    files["device-types.yaml"] = yaml.safe_dump(doc)
    ctl.apply_policy(files)
    body, key = signed(ctl, "rtu-1")
    passport = SignedPassport.model_validate(body).verify(key)
    assert passport.baseline[0].ports == [2405, 2406]


_TAMPER = [
    ("asset_id", lambda p: p.update(asset_id="rtu-2")),
    ("device_type", lambda p: p.update(device_type="der-gateway")),
    ("site", lambda p: p.update(site="south-1")),
    ("addresses", lambda p: p.update(addresses=["10.20.0.99"])),
    ("mac", lambda p: p.update(mac="02:00:00:00:00:99")),
    ("sim.iccid", lambda p: p["sim"].update(iccid=iccid_for(77))),
    ("sim.eid", lambda p: p["sim"].update(eid=None)),
    ("sim.imsis", lambda p: p["sim"]["imsis"].append("262019999999999")),
    ("firmware", lambda p: p.update(firmware="evil")),
    ("lifecycle", lambda p: p.update(lifecycle="quarantined")),
    ("revision", lambda p: p.update(revision=p["revision"] + 1)),
    ("policy_version", lambda p: p.update(policy_version="sha256:" + "0" * 64)),
    ("baseline.ports", lambda p: p["baseline"][0].update(ports=[22])),
    ("baseline.protocol", lambda p: p["baseline"][0].update(protocol="ssh")),
    ("baseline.to.addresses", lambda p: p["baseline"][0]["to"][0]["addresses"].append("192.0.2.66")),
    ("baseline.extra", lambda p: p["baseline"].append({**p["baseline"][0], "protocol": "modbus", "ports": [502]})),
    ("baseline.removed", lambda p: p["baseline"].clear()),
]


def test_a_tampered_passport_or_another_key_does_not_verify(ctl):
    two_sites(ctl)
    ctl.client.post(f"{API}/devices", json=full_device("rtu-1", 1), headers=ctl.step_up_admin())
    body, key = signed(ctl, "rtu-1")
    assert SignedPassport.model_validate(body).verify(key).asset_id == "rtu-1"

    verified = []
    for name, change in _TAMPER:
        forged = json.loads(json.dumps(body))
        change(forged["passport"])
        assert forged != body, name
        try:
            SignedPassport.model_validate(forged).verify(key)
            verified.append(name)
        except ValueError as exc:
            assert "does not verify" in str(exc), name
    assert not verified, f"tampered passports verified: {verified}"

    bad_sig = base64.b64decode(body["signature"])
    bad_sig = bytes([bad_sig[0] ^ 1]) + bad_sig[1:]
    with pytest.raises(ValueError, match="does not verify"):
        SignedPassport.model_validate({**body, "signature": base64.b64encode(bad_sig).decode()}).verify(key)
    other = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    other_b64 = base64.b64encode(other).decode()
    with pytest.raises(ValueError, match="another controller key"):
        SignedPassport.model_validate(body).verify(other_b64)
    with pytest.raises(ValueError, match="does not verify"):  # a key_id that names the other key does not help
        SignedPassport.model_validate({**body, "key_id": key_id(other)}).verify(other_b64)


def test_signature_is_stable_per_revision_and_policy_and_changes_with_either(ctl):
    two_sites(ctl)
    ctl.add_device("rtu-1", "north-1", firmware="1.0")
    first, key = signed(ctl, "rtu-1")
    again, _ = signed(ctl, "rtu-1")
    assert again == first
    res = ctl.client.patch(f"{API}/devices/rtu-1", json={"last_seen": iso(ctl.t)}, headers=ctl.step_up_admin())
    assert res.status_code == 200 and res.json()["revision"] == 1
    assert signed(ctl, "rtu-1")[0]["signature"] == first["signature"]  # posture is not part of the passport

    ctl.client.patch(f"{API}/devices/rtu-1", json={"firmware": "1.1"}, headers=ctl.step_up_admin())
    second, _ = signed(ctl, "rtu-1")
    assert second["passport"]["revision"] == 2 and second["passport"]["firmware"] == "1.1"
    assert second["signature"] != first["signature"]
    SignedPassport.model_validate(second).verify(key)

    files = example_policy_files()
    files["extra.yaml"] = "wicket_policy: 1\ndestinations:\n  historian:\n    addresses: [198.51.100.20]\n"
    applied = ctl.apply_policy(files)
    third, _ = signed(ctl, "rtu-1")
    assert third["passport"]["policy_version"] == applied["version"] != second["passport"]["policy_version"]
    assert third["passport"]["revision"] == 2 and third["signature"] != second["signature"]
    assert SignedPassport.model_validate(third).verify(key).policy_version == applied["version"]
    assert signed(ctl, "rtu-1")[0] == third


# ---- regressions: bugs found while writing these tests, now fixed ----


def _quiet_client(ctl) -> TestClient:
    """A client that returns a server error as a 500 instead of raising it into the test."""
    return shared_client(ctl.app, raise_server_exceptions=False)


def test_site_patch_with_port_max_below_port_min_is_a_422(ctl):
    ctl.apply_policy()
    ctl.add_site("north-1")  # ports 51000-51999
    res = _quiet_client(ctl).patch(f"{API}/sites/north-1", json={"port_max": 50000}, headers=ctl.step_up_admin())
    assert res.status_code == 422 and "port_max" in res.json()["detail"]


def test_device_patch_with_an_address_twice_is_a_422(ctl):
    two_sites(ctl)
    ctl.add_device("rtu-1", "north-1")
    res = _quiet_client(ctl).patch(f"{API}/devices/rtu-1", json={"addresses": ["10.20.0.1", "10.20.0.1"]},
                                   headers=ctl.step_up_admin())
    assert res.status_code == 422 and "address" in res.json()["detail"]


def test_a_repeated_imsi_is_refused_naming_the_field(ctl):
    two_sites(ctl)
    res = ctl.client.post(f"{API}/devices", json=full_device("rtu-1", 1, imsis=["262011234567890"] * 2), headers=ctl.step_up_admin())
    assert res.status_code == 422 and problem_fields(res) == {"imsis"}, res.text
