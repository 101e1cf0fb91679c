"""Bugs found while writing docs/inventory.md and docs/policy.md, all fixed since: their regression tests. Others found then are covered elsewhere: /policy/evaluate reading devices
at other sites and CSV --update taking devices from other sites (test_authz_matrix.py,
test_device_import.py), a policy dropping a protocol that passports name in `ports`
(test_policy_api.py)."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from controller.models import PolicyVersion
from controller.policy import PolicyError, load_files

from .conftest import example_policy_files


def test_csv_update_keeps_fields_whose_column_is_absent(ctl):
    ctl.apply_policy()
    ctl.add_site("north-1", lan_networks=["10.20.0.0/16"])
    ctl.add_device("RTU-1", "north-1", mac="00:1b:44:11:3a:b7", imsis=["262011234567890"], firmware="4.2.1",
                   description="bay 4")
    csv = "asset_id,device_type,site,addresses,firmware\nRTU-1,substation-rtu,north-1,10.20.4.18,\n"
    res = ctl.client.post("/api/v1/devices/import", json={"csv": csv, "update": True}, headers=ctl.step_up_admin())
    assert res.status_code == 200, res.text
    assert res.json()["updated"] == 1
    device = ctl.client.get("/api/v1/devices/RTU-1", headers=ctl.auth(ctl.admin_token())).json()
    assert device["addresses"] == ["10.20.4.18"]
    assert device["firmware"] is None  # an empty cell in a column the file has clears the field
    assert (device["lifecycle"], device["mac"], device["imsis"], device["description"]) == \
        ("active", "00:1b:44:11:3a:b7", ["262011234567890"], "bay 4")


def test_a_yaml_error_is_reported_alone():
    files = example_policy_files()
    files["tasks.yaml"] = files["tasks.yaml"].replace("    protocols: [iec104]", "    protocols: [iec104", 1)
    with pytest.raises(PolicyError) as caught:
        load_files(files)
    assert caught.value.problems and all(p.startswith("tasks.yaml:") for p in caught.value.problems)


def test_diff_works_when_the_stored_policy_no_longer_fits(ctl):
    ctl.apply_policy()
    # What an upgrade that retires a key looks like to the store: the stored document no longer fits.
    with ctl.app.state.auth.factory() as s:
        row = s.scalar(select(PolicyVersion))
        document = dict(row.document)
        document["tasks"] = {**document["tasks"], "iec104-diagnostics": {**document["tasks"]["iec104-diagnostics"], "retired": 1}}
        row.document = document
        s.commit()
    headers = ctl.auth(ctl.admin_token())
    res = ctl.client.get("/api/v1/tasks", headers=headers)
    assert res.status_code == 409, res.text
    res = ctl.client.post("/api/v1/policy/diff", json={"files": example_policy_files()}, headers=headers)
    assert res.status_code == 200, res.text
    assert res.json()["changes"] == ["~ tasks.iec104-diagnostics.retired: 1 → (unset)"]
