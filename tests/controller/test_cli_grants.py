"""`wicket grant …` and `wicket device bind` against a real HTTP server (the fixtures of test_cli.py), SQLite
only: what they decide is the API's, tested on both databases; here, what the commands send and say."""

from __future__ import annotations

import re

import pytest

from . import test_cli
from .helpers import API, headers, iccid_for, iso
from .session_helpers import DER, METER, SITE, policy_files, world
from .test_grants import GRANT_TASKS

SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
server, cli = test_cli.server, test_cli.cli


def fresh_for(ctl, person) -> str:
    """A step-up code of `person` from a step nobody has used yet."""
    ctl.advance(30)
    return ctl.code(person)


def ids(text: str) -> list[str]:
    return re.findall(r"\b([sg]-[a-z2-9]{12})\b", text)


@SQLITE
def test_open_list_show_close_a_grant_and_a_refused_group(ctl, cli):
    w = world(ctl, policy_files(**{"grants-test.yaml": GRANT_TASKS}))
    ctl.advance(30)
    cli.login(ctl, w.erin)
    res = cli("grant", "open", "der-commissioning-mqtt", "--device", DER, "--for", "1h", "--reason", "commissioning WO-5",
              "--totp", fresh_for(ctl, w.erin))
    assert res.exit_code == 0, res.output
    sid = ids(res.stdout)[0]
    assert f"Grant {sid} is active: der-commissioning-mqtt on {DER} (mqtt-tls tcp/8883 → der-commissioning) until " in res.stdout
    assert f"Sign off when done: wicket grant close {sid} --reason TEXT" in res.stdout
    res = cli("grant", "list")
    assert res.exit_code == 0 and sid in res.stdout and "active" in res.stdout, res.output
    res = cli("grant", "show", sid)
    assert "flows:" in res.stdout and "mqtt-tls tcp/8883 → der-commissioning" in res.stdout, res.stdout
    res = cli("grant", "close", sid, "--reason", "signed off by the installer")
    assert res.exit_code == 0 and f"Grant {sid} is closed" in res.stdout, res.output

    res = cli("grant", "open", "fw-window", "--device", METER, "--device", "NOPE-1", "--reason", "FW 7.2",
              "--totp", fresh_for(ctl, w.erin))
    assert res.exit_code == 1 and "no device NOPE-1" in res.stderr, res.output
    res = cli("grant", "open", "fw-window", "--device", METER, "--type", "meter-concentrator", "--reason", "FW 7.2")
    assert res.exit_code == 2 and "name the devices" in res.stderr
    ctl.client.patch(f"{API}/devices/{METER}", json={"lifecycle": "quarantined"}, headers=ctl.step_up_admin())
    res = cli("grant", "open", "fw-window", "--type", "meter-concentrator", "--site", SITE, "--reason", "FW 7.2",
              "--totp", fresh_for(ctl, w.erin))
    assert res.exit_code == 1 and "has no active meter-concentrator" in res.stderr, res.output
    ctl.client.patch(f"{API}/devices/{METER}", json={"lifecycle": "active"}, headers=ctl.step_up_admin())
    ctl.add_device("MC-Q", SITE, device_type="meter-concentrator", addresses=["10.20.0.60"], lifecycle="quarantined")
    res = cli("grant", "open", "fw-window", "--device", METER, "--device", "MC-Q", "--reason", "FW 7.2",
              "--totp", fresh_for(ctl, w.erin))
    assert res.exit_code == 1, res.output
    assert "  MC-Q: MC-Q is quarantined" in res.stderr and "no grant was created" in res.stderr


@SQLITE
def test_a_group_waits_is_approved_by_another_opened_and_signed_off(ctl, cli):
    w = world(ctl, policy_files(**{"grants-test.yaml": GRANT_TASKS}))
    ctl.add_device("MC-2", SITE, device_type="meter-concentrator", addresses=["10.20.0.28"], last_seen=iso(ctl.t))
    ctl.advance(30)
    cli.login(ctl, w.erin)
    res = cli("grant", "open", "fw-window", "--type", "meter-concentrator", "--site", SITE, "--reason", "FW 7.2 campaign",
              "--totp", fresh_for(ctl, w.erin))
    assert res.exit_code == 0, res.output
    group = ids(res.stdout)[0]
    assert res.stdout.startswith(f"Group {group}: fw-window on 2 devices (2 pending_approval).")
    assert f"wicket grant activate {group}" in res.stdout
    res = ctl.client.post(f"{API}/grants/{group}/approve", json={"reason": "campaign plan checked"},
                          headers=headers(ctl, w.alex, step_up=True))
    assert res.status_code == 200, res.text
    res = cli("grant", "activate", group, "--totp", fresh_for(ctl, w.erin))
    assert res.exit_code == 0 and f"Opened group {group}:" in res.stdout and res.stdout.count("active") == 2, res.output
    res = cli("grant", "close", group, "--reason", "campaign done")
    assert res.exit_code == 0 and res.stdout.count("closed") == 2, res.output


@SQLITE
def test_wicket_device_bind_shows_the_passport_and_the_commissioning_grant(ctl, cli):
    world(ctl)
    sara = ctl.add_user("sara", roles=[("site_admin", SITE)])
    ctl.add_device("DER-NEW", SITE, device_type="der-gateway", addresses=["10.20.0.40"], lifecycle="provisioned")
    ctl.advance(30)
    cli.login(ctl, sara)
    res = cli("device", "bind", "--asset", "DER-NEW", "--iccid", iccid_for(7), "--imsi", "262011234567890",
              "--totp", fresh_for(ctl, sara))
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(f"Bound DER-NEW (iccid {iccid_for(7)}, imsi 262011234567890): its passport is active (revision 2)")
    sid = ids(res.stdout)[0]
    assert f"Grant {sid} is active: der-commissioning-mqtt on DER-NEW" in res.stdout
    res = cli("devices", "bind", "DER-NEW", "--iccid", iccid_for(8), "--totp", fresh_for(ctl, sara))
    assert res.exit_code == 1 and "bound to other identifiers already" in res.stderr and "--rebind" in res.stderr
    res = cli("devices", "bind", "DER-NEW", "--iccid", iccid_for(8), "--rebind", "--totp", fresh_for(ctl, sara))
    assert res.exit_code == 0 and res.stdout.startswith("Rebound DER-NEW"), res.output
    res = cli("devices", "bind", "DER-NEW", "--imsi", "262011234567890")
    assert res.exit_code == 2 and "--iccid, --eid or --mac" in res.stderr
    res = cli("grant", "close", sid, "--reason", "commissioned")
    assert res.exit_code == 0, res.output
