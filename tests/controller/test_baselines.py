"""Device baselines in a node's desired state: which devices, which profiles and destinations, the site's
handling of hosts without a passport, and every change that must bump the site's nodes' generation
(devices created, changed, moved, imported; a policy applied; the site's settings). Also the cost of the
desired state for a site with 5 000 devices.

Contents and bumps run on SQLite and PostgreSQL; the CLI and the timing on SQLite only."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import insert, select

from controller.models import Device, Site
from controller.session_lanes import desired_state
from nodeagent.wire import DesiredNodeState

from . import test_cli
from .conftest import example_policy_files
from .helpers import API, admin, iso

SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
server, cli = test_cli.server, test_cli.cli

# Destinations with IPv6: the agent enforces IPv4, so `dual` keeps only its IPv4 address and `v6-only` is
# left out, with the flows that name only it.
V6_POLICY = """\
wicket_policy: 1
destinations:
  dual: {addresses: [198.51.100.20, "2001:db8::20"]}
  v6-only: {addresses: ["2001:db8::21"]}
device_types:
  v6-sensor:
    title: A sensor whose collector is IPv6-only
    access: [ssh]
    baseline:
      - {protocol: mqtt-tls, to: [v6-only]}
      - {protocol: https, to: [dual, v6-only], ports: [8443]}
  quiet-box:
    title: A type without a baseline
    access: [ssh]
"""


def desired(ctl, node: str) -> dict:
    res = ctl.client.get(f"{API}/nodes/{node}/desired", headers=admin(ctl))
    assert res.status_code == 200, res.text
    return res.json()


def generation(ctl, node: str) -> int:
    return desired(ctl, node)["generation"]


def patch_site(ctl, site: str, expect: int = 200, **body) -> dict:
    res = ctl.client.patch(f"{API}/sites/{site}", json=body, headers=ctl.step_up_admin())
    assert res.status_code == expect, res.text
    return res.json()


def patch_device(ctl, asset: str, **body) -> dict:
    res = ctl.client.patch(f"{API}/devices/{asset}", json=body, headers=ctl.step_up_admin())
    assert res.status_code == 200, res.text
    return res.json()


# ---- contents ----


def test_no_policy_no_baseline_then_the_sites_active_devices_with_their_types_profiles(ctl):
    ctl.add_site("north-1")
    ctl.add_agent("north-1", "edge-n")
    assert desired(ctl, "edge-n")["baseline"] is None and desired(ctl, "edge-n")["grants"] == []
    before = generation(ctl, "edge-n")
    ctl.apply_policy({**example_policy_files(), "v6.yaml": V6_POLICY})
    assert generation(ctl, "edge-n") == before + 1
    assert desired(ctl, "edge-n")["baseline"] == {"unpassported": "router", "device_networks": [], "destinations": [],
                                                   "profiles": [], "devices": []}

    ctl.add_site("south-1")
    ctl.add_device("RTU-1", "north-1", "substation-rtu", addresses=["10.20.0.11"])
    ctl.add_device("RTU-2", "north-1", "substation-rtu", addresses=["10.20.0.12", "10.20.1.12"])
    ctl.add_device("MC-1", "north-1", "meter-concentrator", addresses=["10.20.0.13"])
    ctl.add_device("V6-1", "north-1", "v6-sensor", addresses=["10.20.0.14"])
    ctl.add_device("Q-1", "north-1", "quiet-box", addresses=["10.20.0.15"])
    ctl.add_device("NEW-1", "north-1", "der-gateway", addresses=["10.20.0.16"], lifecycle="provisioned")
    ctl.add_device("QUAR-1", "north-1", "der-gateway", addresses=["10.20.0.17"], lifecycle="quarantined")
    ctl.add_device("SOUTH-1", "south-1", "der-gateway", addresses=["10.20.0.18"])

    b = desired(ctl, "edge-n")["baseline"]
    assert b["devices"] == [
        {"asset_id": "MC-1", "addresses": ["10.20.0.13"], "profile": "meter-concentrator"},
        {"asset_id": "Q-1", "addresses": ["10.20.0.15"], "profile": "quiet-box"},
        {"asset_id": "RTU-1", "addresses": ["10.20.0.11"], "profile": "substation-rtu"},
        {"asset_id": "RTU-2", "addresses": ["10.20.0.12", "10.20.1.12"], "profile": "substation-rtu"},
        {"asset_id": "V6-1", "addresses": ["10.20.0.14"], "profile": "v6-sensor"},
    ]
    # only the types the site's active devices have (no der-gateway); a type without a baseline: no flows, default deny
    assert b["profiles"] == [
        {"name": "meter-concentrator", "flows": [{"protocol": "dlms", "transport": "tcp+udp", "ports": [4059], "to": ["mdm"]}]},
        {"name": "quiet-box", "flows": []},
        {"name": "substation-rtu", "flows": [{"protocol": "iec104", "transport": "tcp", "ports": [2404],
                                             "to": ["scada-master-a", "scada-master-b"]}]},
        {"name": "v6-sensor", "flows": [{"protocol": "https", "transport": "tcp", "ports": [8443], "to": ["dual"]}]},
    ]
    # only the destinations those flows name; IPv6 addresses left out (der-broker and v6-only are not there)
    assert b["destinations"] == [
        {"name": "dual", "addresses": ["198.51.100.20"], "fqdn": None},
        {"name": "mdm", "addresses": [], "fqdn": "mdm.grid.example.net"},
        {"name": "scada-master-a", "addresses": ["198.51.100.10"], "fqdn": None},
        {"name": "scada-master-b", "addresses": ["198.51.100.11"], "fqdn": None},
    ]


def test_site_settings_reach_the_baseline_and_bad_ones_change_nothing(ctl):
    ctl.apply_policy()
    ctl.add_site("north-1")
    ctl.add_agent("north-1", "edge-n")
    gen = generation(ctl, "edge-n")
    res = ctl.client.patch(f"{API}/sites/north-1", json={"unpassported": "deny"}, headers=ctl.step_up_admin())
    assert res.status_code == 422 and "unpassported = deny needs device_networks" in res.text, res.text
    res = ctl.client.patch(f"{API}/sites/north-1", json={"device_networks": ["192.0.2.1/24"]}, headers=ctl.step_up_admin())
    assert res.status_code == 422 and "has host bits set" in res.text, res.text
    res = ctl.client.patch(f"{API}/sites/north-1", json={"device_networks": ["2001:db8::/64"]}, headers=ctl.step_up_admin())
    assert res.status_code == 422 and "IPv4 networks only" in res.text, res.text
    res = ctl.client.patch(f"{API}/sites/north-1", json={"unpassported": "allow"}, headers=ctl.step_up_admin())
    assert res.status_code == 422, res.text
    assert generation(ctl, "edge-n") == gen
    site = ctl.client.get(f"{API}/sites/north-1", headers=admin(ctl)).json()
    assert (site["unpassported"], site["device_networks"], site["revision"]) == ("router", [], 1)

    site = patch_site(ctl, "north-1", unpassported="deny", device_networks=["192.0.2.0/24", "10.20.0.0/16"])
    assert (site["unpassported"], site["device_networks"]) == ("deny", ["192.0.2.0/24", "10.20.0.0/16"])
    assert generation(ctl, "edge-n") == gen + 1
    b = desired(ctl, "edge-n")["baseline"]
    assert (b["unpassported"], b["device_networks"]) == ("deny", ["192.0.2.0/24", "10.20.0.0/16"])
    # deny stays, so the networks cannot go; back to router, they can
    res = ctl.client.patch(f"{API}/sites/north-1", json={"device_networks": []}, headers=ctl.step_up_admin())
    assert res.status_code == 422 and "needs device_networks" in res.text
    patch_site(ctl, "north-1", unpassported="router", device_networks=[])
    assert generation(ctl, "edge-n") == gen + 2
    patch_site(ctl, "north-1", display_name="North One")  # not in the desired state: no new generation
    assert generation(ctl, "edge-n") == gen + 2
    update = next(e for e in reversed(ctl.events()) if e["type"] == "site.update" and "unpassported" in e["body"]["changes"])
    assert update["body"]["changes"] == {"unpassported": "router", "device_networks": []}


def test_every_change_of_a_baseline_bumps_the_nodes_of_its_sites_and_nothing_else_does(ctl):
    ctl.apply_policy()
    ctl.add_site("north-1", lan_networks=["10.20.0.0/16"])
    ctl.add_site("south-1")
    ctl.add_agent("north-1", "edge-n")
    ctl.add_agent("south-1", "edge-s")

    def gens():
        return generation(ctl, "edge-n"), generation(ctl, "edge-s")

    def moved(n: int, s: int, action) -> None:
        before = gens()
        action()
        assert gens() == (before[0] + n, before[1] + s), action

    moved(1, 0, lambda: ctl.add_device("RTU-1", "north-1", addresses=["10.20.0.11"]))
    moved(0, 0, lambda: ctl.add_device("NEW-1", "north-1", addresses=["10.20.0.12"], lifecycle="provisioned"))
    moved(1, 0, lambda: patch_device(ctl, "NEW-1", lifecycle="active"))
    moved(0, 0, lambda: patch_device(ctl, "RTU-1", description="cabinet 3", firmware="4.2", last_seen=iso(ctl.t)))
    moved(1, 0, lambda: patch_device(ctl, "RTU-1", addresses=["10.20.0.21"]))
    moved(1, 0, lambda: patch_device(ctl, "RTU-1", device_type="der-gateway"))
    moved(1, 1, lambda: patch_device(ctl, "RTU-1", site="south-1", addresses=["10.30.0.21"]))
    moved(0, 1, lambda: patch_device(ctl, "RTU-1", lifecycle="quarantined"))
    moved(0, 0, lambda: patch_device(ctl, "RTU-1", lifecycle="decommissioned"))
    moved(0, 0, lambda: ctl.client.delete(f"{API}/devices/RTU-1", headers=ctl.step_up_admin()))

    header = "asset_id,device_type,site,addresses,lifecycle\n"

    def csv_import(text: str, update: bool = False) -> None:
        res = ctl.client.post(f"{API}/devices/import", json={"csv": header + text, "update": update},
                              headers=ctl.step_up_admin())
        assert res.status_code == 200, res.text

    moved(0, 1, lambda: csv_import("S-1,der-gateway,south-1,10.30.0.1,active\nS-2,der-gateway,south-1,10.30.0.2,provisioned\n"))
    moved(0, 0, lambda: csv_import("S-2,der-gateway,south-1,10.30.0.2,provisioned\n", update=True))
    moved(1, 1, lambda: csv_import("S-1,der-gateway,north-1,10.20.0.1,active\n", update=True))
    moved(0, 0, lambda: ctl.client.post(f"{API}/devices/import", headers=ctl.step_up_admin(), json={
        "csv": header + "S-9,der-gateway,south-1,10.30.0.9,active\n", "dry_run": True}))
    assert "S-9" not in {d["asset_id"] for d in desired(ctl, "edge-s")["baseline"]["devices"]}
    files = example_policy_files()
    files["device-types.yaml"] = files["device-types.yaml"].replace("max_silence: 6h", "max_silence: 7h")
    moved(1, 1, lambda: ctl.apply_policy(files))
    assert [d["asset_id"] for d in desired(ctl, "edge-n")["baseline"]["devices"]] == ["NEW-1", "S-1"]


# ---- the CLI ----


@SQLITE
def test_wicket_sites_update_sets_the_unpassported_choice_and_refuses_deny_without_networks(ctl, cli):
    ctl.apply_policy()
    ctl.add_site("north-1")
    ctl.advance(30)
    cli.login(ctl, ctl.admin)
    res = cli("sites", "update", "north-1", "--unpassported", "deny", "--totp", test_cli.fresh(ctl))
    assert res.exit_code == 1 and "unpassported = deny needs device_networks" in res.stderr, res.output
    res = cli("sites", "update", "north-1", "--unpassported", "deny", "--device-network", "192.0.2.7/24",
              "--totp", test_cli.fresh(ctl))
    assert res.exit_code == 1 and "192.0.2.7/24" in res.stderr and "host bits" in res.stderr, res.output
    res = cli("sites", "update", "north-1", "--unpassported", "block", "--totp", test_cli.fresh(ctl))
    assert res.exit_code == 2 and "one of router, deny" in res.stderr, res.output
    site = ctl.client.get(f"{API}/sites/north-1", headers=admin(ctl)).json()
    assert (site["unpassported"], site["device_networks"], site["revision"]) == ("router", [], 1)

    res = cli("sites", "update", "north-1", "--unpassported", "deny", "--device-network", "192.0.2.0/24",
              "--totp", test_cli.fresh(ctl))
    assert res.exit_code == 0, res.output
    res = cli("sites", "show", "north-1")
    assert "unpassported:     deny" in res.stdout and "device networks:  192.0.2.0/24" in res.stdout, res.stdout
    res = cli("sites", "update", "north-1", "--unpassported", "router", "--clear", "device-networks", "--totp", test_cli.fresh(ctl))
    assert res.exit_code == 0, res.output
    site = ctl.client.get(f"{API}/sites/north-1", headers=admin(ctl)).json()
    assert (site["unpassported"], site["device_networks"]) == ("router", [])


# ---- cost ----


@SQLITE
def test_the_desired_state_of_a_site_with_5000_devices_stays_cheap(ctl, capsys):
    ctl.apply_policy()
    ctl.add_site("north-1")
    ctl.add_agent("north-1", "edge-n")
    factory = ctl.app.state.auth.factory
    types = ("substation-rtu", "meter-concentrator", "der-gateway")
    with factory() as s, s.begin():
        site_id = s.scalar(select(Site.id).where(Site.name == "north-1"))
        now = ctl.app.state.auth.now()
        s.execute(insert(Device), [
            {"asset_id": f"M-{n:05d}", "device_type": types[n % 3], "site_id": site_id,
             "addresses": [f"10.{20 + n // 65536}.{n // 256 % 256}.{n % 256}"], "lifecycle": "active", "imsis": [], "ports": {},
             "description": "", "revision": 1, "created_at": now, "updated_at": now} for n in range(1, 5001)])
    with factory() as s:
        desired_state(s, "edge-n")  # the policy compiled once per version
        times = []
        for _ in range(5):
            start = time.perf_counter()
            state = desired_state(s, "edge-n")
            times.append(time.perf_counter() - start)
    assert len(state.baseline.devices) == 5000 and len(state.baseline.profiles) == 3
    sent = state.model_dump_json()
    assert DesiredNodeState.model_validate_json(sent).model_dump_json() == sent  # the agent validates what it receives
    best = min(times) * 1000
    with capsys.disabled():
        print(f"\n  desired_state, 5 000 devices: best {best:.0f} ms of 5 (median {sorted(times)[2] * 1000:.0f} ms)")
    assert best < 1000, f"{best:.0f} ms"
