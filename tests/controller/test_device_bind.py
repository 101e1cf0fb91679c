"""`POST /devices/{asset}/bind` (`wicket devices bind`): identifiers read off a device at installation are
bound, its passport turns active (the site's baseline lists it from a new generation), and its type's
commissioning grant is asked for the caller. Refusals: other identifiers bound already (unless rebind),
identifiers of another device, a quarantined or decommissioned device, callers who do not manage the site."""

from __future__ import annotations

from .helpers import API, eid_for, headers, iccid_for
from .session_helpers import DER, METER, NODE, SITE, _check, world

NEW_DER = "DER-NEW"


def bind(ctl, person, asset: str, expect: int = 200, **body) -> dict:
    return _check(ctl.client.post(f"{API}/devices/{asset}/bind", json=body, headers=headers(ctl, person, step_up=True)), expect)


def installer_world(ctl):
    w = world(ctl)
    sara = ctl.add_user("sara", roles=[("site_admin", SITE)])
    ctl.add_device(NEW_DER, SITE, device_type="der-gateway", addresses=["10.20.0.40"], lifecycle="provisioned")
    return w, sara


def generation(ctl) -> int:
    return _check(ctl.client.get(f"{API}/nodes/{NODE}/desired", headers=ctl.auth(ctl.admin_token())), 200)["generation"]


def baseline_devices(ctl) -> set[str]:
    desired = _check(ctl.client.get(f"{API}/nodes/{NODE}/desired", headers=ctl.auth(ctl.admin_token())), 200)
    return {d["asset_id"] for d in desired["baseline"]["devices"]}


def test_binding_activates_the_passport_and_opens_the_commissioning_grant(ctl):
    w, sara = installer_world(ctl)
    assert NEW_DER not in baseline_devices(ctl)
    before = generation(ctl)
    out = bind(ctl, sara, NEW_DER, iccid=iccid_for(1), imsis=["262011234567890"], eid=eid_for(1), mac="00:1A:2B:3C:4D:5E",
               reason="install WO-881")
    d = out["device"]
    assert (d["lifecycle"], d["iccid"], d["imsis"], d["eid"], d["mac"], d["revision"]) == (
        "active", iccid_for(1), ["262011234567890"], eid_for(1), "00:1a:2b:3c:4d:5e", 2)
    assert d["last_seen"] is not None and out["rebound"] is False
    assert generation(ctl) > before and NEW_DER in baseline_devices(ctl)
    # the pushed state holds it too: the change reached the node when the call returned
    assert NEW_DER in {x.asset_id for x in ctl.nodes.desired[NODE].baseline.devices}
    c = out["commissioning"]
    assert c["task"] == "der-commissioning-mqtt" and c["refused"] is None and c["activation_error"] is None
    g = c["grant"]
    assert (g["state"], g["device"], g["user"], g["reason"]) == ("active", NEW_DER, "sara", "install WO-881")
    assert g["id"] in {x.session_id for x in ctl.nodes.desired[NODE].grants}
    event = next(e for e in ctl.events(subject=NEW_DER) if e["type"] == "device.bind")
    assert (event["actor"], event["body"]["previous_lifecycle"], event["body"]["rebind"]) == ("sara", "provisioned", False)
    assert event["body"]["identifiers"] == {"iccid": iccid_for(1), "eid": eid_for(1), "imsis": ["262011234567890"],
                                            "mac": "00:1a:2b:3c:4d:5e"}
    # sign-off closes the commissioning grant
    res = ctl.client.post(f"{API}/grants/{g['id']}/close", json={"reason": "commissioned, telemetry flowing"},
                          headers=headers(ctl, sara))
    assert res.status_code == 200 and res.json()["grants"][0]["state"] == "closed", res.text
    assert ctl.nodes.desired[NODE].grants == []
    assert w  # the example's people exist for the other tests


def test_other_identifiers_need_rebind_and_anothers_iccid_is_refused(ctl):
    _, sara = installer_world(ctl)
    bind(ctl, sara, NEW_DER, iccid=iccid_for(1))
    again = bind(ctl, sara, NEW_DER, iccid=iccid_for(1))  # the same identifiers: bound again, nothing replaced
    assert again["rebound"] is False and again["device"]["iccid"] == iccid_for(1)
    res = bind(ctl, sara, NEW_DER, expect=409, iccid=iccid_for(2))
    assert f"bound to other identifiers already (iccid {iccid_for(1)})" in res["detail"] and "--rebind" in res["detail"]
    out = bind(ctl, sara, NEW_DER, iccid=iccid_for(2), rebind=True, reason="SIM swapped, WO-990")
    assert out["rebound"] is True and out["device"]["iccid"] == iccid_for(2)
    event = [e for e in ctl.events(subject=NEW_DER) if e["type"] == "device.bind"][-1]
    assert event["body"]["rebind"] is True and event["body"]["replaced"] == {"iccid": iccid_for(1)}
    assert event["body"]["note"] == "SIM swapped, WO-990"
    res = bind(ctl, sara, DER, expect=409, iccid=iccid_for(2))
    assert f"iccid: {iccid_for(2)} is already bound to {NEW_DER}" in res["detail"]
    res = bind(ctl, sara, DER, expect=422, iccid="8949000000000000001")  # a wrong check digit
    assert "check digit" in res["detail"]
    res = bind(ctl, sara, DER, expect=422, imsis=["262011234567890"])
    assert "an ICCID, an EID or a MAC, at least" in res["detail"]


def test_quarantined_and_decommissioned_devices_are_not_bound(ctl):
    _, sara = installer_world(ctl)
    for lifecycle in ("quarantined", "decommissioned"):
        res = ctl.client.patch(f"{API}/devices/{NEW_DER}", json={"lifecycle": lifecycle}, headers=ctl.step_up_admin())
        assert res.status_code == 200, res.text
        res = bind(ctl, sara, NEW_DER, expect=409, iccid=iccid_for(3))
        assert f"{NEW_DER} is {lifecycle}" in res["detail"]
    assert NEW_DER not in baseline_devices(ctl)
    assert not [e for e in ctl.events(subject=NEW_DER) if e["type"] == "device.bind"]


def test_who_may_bind_and_what_the_commissioning_grant_does_for_others(ctl):
    w, sara = installer_world(ctl)
    bind(ctl, w.erin, NEW_DER, expect=403, iccid=iccid_for(4))  # an engineer sees the device, does not manage it
    ctl.add_site("south-9")
    elsewhere = ctl.add_user("sven", roles=[("site_admin", "south-9")])
    bind(ctl, elsewhere, NEW_DER, expect=404, iccid=iccid_for(4))
    # a meter concentrator's type names no commissioning: none is asked for
    assert bind(ctl, sara, METER, iccid=iccid_for(5))["commissioning"] is None
    # the admin may bind, but the commissioning task is not for admins: the bind stands, the grant is refused
    out = bind(ctl, w.root, NEW_DER, iccid=iccid_for(4), addresses=["10.20.0.41"])
    assert out["device"]["lifecycle"] == "active" and out["device"]["addresses"] == ["10.20.0.41"]
    c = out["commissioning"]
    assert c["grant"] is None and "may be requested by contractor, engineer, site_admin" in c["refused"]
    res = ctl.client.post(f"{API}/devices/{METER}/bind", json={"iccid": iccid_for(5), "addresses": ["10.20.0.17"]},
                          headers=headers(ctl, sara, step_up=True))
    assert res.status_code == 422 and "10.20.0.17 is also the address of RTU-17" in res.text, res.text
