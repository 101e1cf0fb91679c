"""`wicket policy|tasks|protocols|device-types|sites|devices` against a real HTTP server, on SQLite and
PostgreSQL (the server and CLI fixtures of test_cli.py). Effects are checked through the API; a few
flows per test keep the number of servers small."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

from controller import cli_inventory
from controller.cli import app
from controller.cli_common import Api, CliError
from controller.identifiers import eid_check, luhn_digit
from controller.policy import load_files
from controller.policy.diff import diff

from . import test_cli
from .conftest import EXAMPLE_POLICY, example_policy_files
from .test_cli import fresh

server, cli, admin = test_cli.server, test_cli.cli, test_cli.admin  # the CLI fixtures of test_cli.py

ICCID = [base + luhn_digit(base) for base in ("894900000000000001", "894900000000000002", "894900000000000003")]
EID = "89049032" + "0" * 21 + "1"
EID = EID + eid_check(EID)
HEADER = "asset_id,device_type,site,addresses,mac,iccid,eid,imsis,firmware,lifecycle,last_seen,ports,description\n"


def api_get(ctl, admin, path: str, **params):
    res = ctl.client.get(path, params=params, headers=ctl.auth(admin.token()))
    assert res.status_code == 200, res.text
    return res.json()


def edit(text: str, old: str, new: str) -> str:
    """The first `old` replaced: the example policy's wording may change, so fail loudly if it is gone."""
    assert old in text, f"the example policy no longer holds {old!r}"
    return text.replace(old, new, 1)


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


# ---- policy files ----


def test_policy_check_works_offline_and_names_file_and_line_of_every_problem(tmp_path):
    runner = CliRunner()
    env = {"WICKET_CONFIG_DIR": str(tmp_path / "no-login"), "WICKET_CONTROLLER": None}  # no controller, no login
    res = runner.invoke(app, ["policy", "check", str(EXAMPLE_POLICY)], env=env)
    assert res.exit_code == 0, res.output
    version = load_files(example_policy_files()).version
    assert res.stdout.splitlines() == [
        f"Policy OK: version {version}",
        "4 file(s): 13 protocols, 6 destinations, 3 device types, 7 tasks, 3 change windows, 2 locations"]

    bad = tmp_path / "bad"
    shutil.copytree(EXAMPLE_POLICY, bad)
    tasks = edit((bad / "tasks.yaml").read_text(), "{default: 30m, max: 1h}", "{default: 30m, max: 1h, maxx: 2h}")
    (bad / "tasks.yaml").write_text(tasks)
    (bad / "extra.yml").write_text("wicket_policy: 1\nlocations:\n  x: [unclosed\n")
    res = runner.invoke(app, ["policy", "check", str(bad)], env=env)
    assert res.exit_code == 1
    assert res.stderr.splitlines() == [
        "wicket: the policy is not valid (2 problem(s)):",
        f"{bad / 'extra.yml'}:4: not valid YAML: expected ',' or ']', but got '<stream end>'",
        f"{bad / 'tasks.yaml'}:{line_of(tasks, 'maxx')}: tasks.iec104-diagnostics.duration.maxx: unknown key "
        "(check the spelling; docs/policy.md lists every key)"]
    assert res.stdout == ""

    res = runner.invoke(app, ["policy", "check", str(bad / "tasks.yaml"), str(EXAMPLE_POLICY)], env=env)
    assert res.exit_code == 2 and "have the same name" in res.stderr


def test_policy_diff_apply_history_show_with_step_up(ctl, admin, tmp_path):
    res = admin("policy", "diff", str(EXAMPLE_POLICY))
    assert res.exit_code == 0, res.output
    assert "(active: none)" in res.stdout and "  + tasks.iec104-diagnostics" in res.stdout.splitlines()

    policy = load_files(example_policy_files())
    used = fresh(ctl)  # the login's step: a second use is refused, and nothing is applied
    res = admin("policy", "apply", str(EXAMPLE_POLICY), "--yes", "--totp", ctl.code(ctl.admin, offset_steps=-1))
    assert res.exit_code == 1 and "TOTP code" in res.stderr
    res = admin("policy", "apply", str(EXAMPLE_POLICY), "--comment", "first", input=f"y\n{used}\n")  # confirm, then the code
    assert res.exit_code == 0, res.output
    assert "Apply policy sha256:" in res.stdout and res.stdout.endswith(
        f"Applied policy 1: version {policy.version} ({len(diff(None, policy.canonical))} change(s)).\n")
    active = api_get(ctl, admin, "/api/v1/policy")
    assert active["comment"] == "first" and active["sources"] == example_policy_files()

    for cmd in ("diff", "apply"):  # the same files again: nothing to do, and no step-up asked
        res = admin("policy", cmd, str(EXAMPLE_POLICY))
        assert res.exit_code == 0 and res.stdout.startswith("No changes: these files are the active policy"), res.output
    assert len(api_get(ctl, admin, "/api/v1/policy/history")) == 1

    changed = tmp_path / "changed"
    shutil.copytree(EXAMPLE_POLICY, changed)
    (changed / "tasks.yaml").write_text(edit((changed / "tasks.yaml").read_text(), "{default: 30m, max: 1h}", "{default: 30m, max: 2h}"))
    res = admin("policy", "apply", str(changed), input="n\n")  # declined: nothing applied
    assert res.exit_code == 1 and "~ tasks.iec104-diagnostics.duration.max: 1h → 2h" in res.stdout
    assert len(api_get(ctl, admin, "/api/v1/policy/history")) == 1
    res = admin("policy", "apply", str(changed), "--yes", "-m", "longer diagnostics", "--totp", fresh(ctl))
    assert res.exit_code == 0 and "Applied policy 2:" in res.stdout and "(1 change(s))" in res.stdout, res.output
    applied = {p.name: p.read_text() for p in changed.iterdir()}

    broken = changed / "tasks.yaml"
    broken.write_text(edit(broken.read_text(), "roles: [engineer]", "roles: [engineer, wizard]"))
    res = admin("policy", "diff", str(changed))  # the controller's problems, one per line
    assert res.exit_code == 1
    assert res.stderr.splitlines()[0] == "wicket: the policy is not valid (1 problem(s), nothing changed):"
    assert re.fullmatch(rf"tasks\.yaml:{line_of(broken.read_text(), 'wizard')}: tasks\.rtu-config-change\.roles\[1\]: .*",
                        res.stderr.splitlines()[1])

    rows = admin("policy", "history").stdout.splitlines()
    assert re.match(r"ID\s+VERSION\s+APPLIED\s+BY\s+FILES\s+COMMENT", rows[0])
    assert re.match(r"2\s+sha256:\S+…\s+.*\sroot\s+4\s+longer diagnostics$", rows[1]) and rows[2].startswith("1 ")
    out = tmp_path / "out"
    res = admin("policy", "show", "--files", str(out))
    assert res.exit_code == 0 and "2 (version sha256:" in res.stdout and "7 tasks" in res.stdout
    assert {p.name: p.read_text() for p in out.iterdir()} == applied
    (out / "tasks.yaml").write_text("local edit\n")
    res = admin("policy", "show", "--files", str(out))
    assert res.exit_code == 2 and "tasks.yaml would be overwritten" in res.stderr
    assert (out / "tasks.yaml").read_text() == "local edit\n"

    listing = admin("tasks", "list").stdout
    assert re.search(r"^iec104-diagnostics\s+iec104\s+substation-rtu\s+contractor, engineer\s+30m \(max 2h\)\s+-\s+-\s", listing, re.M)
    assert re.search(r"^rtu-config-change\s+ssh\s+substation-rtu\s+engineer\s+45m \(max 2h\)\s+2 approver\(s\)\s+yes\s", listing, re.M)
    assert "change window:  required" in admin("tasks", "show", "rtu-config-change").stdout
    assert admin("tasks", "show", "nope").exit_code == 1
    assert re.search(r"^iec104\s+tcp\s+2404\s+-\s+IEC 60870-5-104$", admin("protocols").stdout, re.M)
    assert re.search(r"^meter-concentrator\s+dlms, ssh\s+dlms → mdm\s+6h\s", admin("device-types").stdout, re.M)


# ---- sites and devices ----


def test_sites_and_devices_by_hand(ctl, admin):
    ctl.apply_policy()
    res = admin("sites", "add", "north-1", "--display-name", "North 1", "--time-zone", "Europe/Berlin",
                "--tunnel-pool", "100.64.0.0/22", "--ports", "51000-51999", "--endpoint", "north.example.net",
                "--lan-network", "10.20.0.0/16", "--window", "weeknights", "--window", "weekend", "--totp", fresh(ctl))
    assert res.exit_code == 0, res.output
    site = api_get(ctl, admin, "/api/v1/sites/north-1")
    assert (site["time_zone"], site["tunnel_pool"], site["port_min"], site["port_max"], site["public_endpoint"],
            site["lan_networks"], site["change_windows"]) == (
        "Europe/Berlin", "100.64.0.0/22", 51000, 51999, "north.example.net", ["10.20.0.0/16"], ["weeknights", "weekend"])
    res = admin("sites", "add", "south", "--display-name", "South")
    assert res.exit_code == 2 and "--time-zone, --tunnel-pool, --ports, --endpoint" in res.stderr

    assert admin("sites", "agent-add", "north-1", "agent-a", "--description", "cabinet 3", "--totp", fresh(ctl)).exit_code == 0
    res = admin("sites", "update", "north-1", "--clear", "windows", "--display-name", "North One", "--totp", fresh(ctl))
    assert res.exit_code == 0, res.output
    shown = admin("sites", "show", "north-1").stdout
    assert re.search(r"^agents:\s+agent-a \(cabinet 3\)$", shown, re.M) and re.search(r"^change windows:\s+-$", shown, re.M)
    assert re.search(r"^display name:\s+North One$", shown, re.M)

    res = admin("devices", "add", "RTU-1", "--type", "substation-rtu", "--site", "north-1", "--address", "10.20.0.17",
                "--address", "10.20.0.18", "--iccid", ICCID[0], "--eid", EID, "--port", "iec104=2405", "--lifecycle", "active",
                "--totp", fresh(ctl))
    assert res.exit_code == 0, res.output
    device = api_get(ctl, admin, "/api/v1/devices/RTU-1")
    assert (device["addresses"], device["iccid"], device["eid"], device["ports"], device["lifecycle"]) == (
        ["10.20.0.17", "10.20.0.18"], ICCID[0], EID, {"iec104": 2405}, "active")

    res = admin("devices", "add", "RTU-2", "--type", "substation-rtu", "--site", "north-1", "--address", "192.0.2.9",
                "--port", "telnet=23", "--totp", fresh(ctl))  # two problems: one line each
    assert res.exit_code == 1
    assert res.stderr.splitlines()[1:] == ["addresses: 192.0.2.9 is outside site north-1's networks (10.20.0.0/16)",
                                           "ports: 'telnet' is not a protocol of the catalogue"]

    res = admin("devices", "update", "RTU-1", "--firmware", "2.1", "--clear", "ports", "--totp", fresh(ctl))
    assert res.exit_code == 0 and "revision 2" in res.stdout, res.output
    device = api_get(ctl, admin, "/api/v1/devices/RTU-1")
    assert (device["firmware"], device["ports"], device["iccid"]) == ("2.1", {}, ICCID[0])
    assert re.search(r"^RTU-1\s+substation-rtu\s+north-1\s+active\s+10.20.0.17, 10.20.0.18\s+2.1\s+-\s+2$",
                     admin("devices", "list").stdout, re.M)

    res = admin("devices", "delete", "RTU-1", "--yes", "--totp", fresh(ctl))
    assert res.exit_code == 1 and "decommission it before deleting" in res.stderr
    assert admin("devices", "update", "RTU-1", "--lifecycle", "decommissioned", "--totp", fresh(ctl)).exit_code == 0
    assert admin("devices", "delete", "RTU-1", input=f"y\n{fresh(ctl)}\n").exit_code == 0
    assert ctl.client.get("/api/v1/devices/RTU-1", headers=ctl.auth(admin.token())).status_code == 404


def test_devices_import_is_all_or_nothing_and_export_round_trips(ctl, admin, tmp_path, monkeypatch):
    monkeypatch.setattr(cli_inventory, "PAGE", 2)  # `devices list` must follow next_after across pages
    ctl.apply_policy()
    ctl.add_site("north-1", lan_networks=["10.20.0.0/16"])
    good = tmp_path / "good.csv"
    good.write_text(HEADER + "".join(
        f"MC-{i},meter-concentrator,north-1,10.20.1.{i + 10},,{ICCID[i]},,,1.0,active,,dlms=4060,row {i}\n" for i in range(3)))
    res = admin("devices", "import", str(good), "--dry-run", "--totp", fresh(ctl))
    assert res.exit_code == 0 and res.stdout == "Dry run, nothing was written: 3 created, 0 updated, 0 unchanged.\n"
    assert api_get(ctl, admin, "/api/v1/devices")["devices"] == []
    res = admin("devices", "import", str(good), "--totp", fresh(ctl))
    assert res.exit_code == 0 and res.stdout == "Imported: 3 created, 0 updated, 0 unchanged.\n", res.output

    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER
                   + "MC-7,meter-concentrator,north-1,10.20.1.7,,,,,,active,,,fine on its own\n"
                   + f"MC-8,meter-concentrator,north-1,10.20.1.8,,{ICCID[0]},,,,active,,,\n"
                   + "MC-9,toaster,north-1,10.99.0.1,,,,,,active,,,\n")
    res = admin("devices", "import", str(bad), "--totp", fresh(ctl))
    assert res.exit_code == 1
    assert res.stderr.splitlines() == [
        "wicket: 3 problem(s), nothing was written:",
        f"{bad}:3: MC-8: iccid: {ICCID[0]} is already bound to MC-0",
        f"{bad}:4: MC-9: addresses: 10.99.0.1 is outside site north-1's networks (10.20.0.0/16)",
        f"{bad}:4: MC-9: device_type: 'toaster' is not a device type of the active policy "
        "(it has: der-gateway, meter-concentrator, substation-rtu)"]
    listed = json.loads(admin("devices", "list", "--json").stdout)
    assert [d["asset_id"] for d in listed] == ["MC-0", "MC-1", "MC-2"]  # two pages of 2; MC-7 was not written
    res = admin("devices", "import", str(good), "--totp", fresh(ctl))
    assert res.exit_code == 1 and "exists already" in res.stderr

    exported = tmp_path / "export.csv"
    res = admin("devices", "export", "-o", str(exported))
    assert res.exit_code == 0 and res.stderr == f"Exported 3 device(s) to {exported}.\n"
    rows = list(csv.DictReader(io.StringIO(exported.read_text())))
    assert [(r["asset_id"], r["iccid"], r["ports"], r["description"]) for r in rows] == [
        (f"MC-{i}", ICCID[i], "dlms=4060", f"row {i}") for i in range(3)]
    before = {d["asset_id"]: d["revision"] for d in listed}
    res = admin("devices", "import", str(exported), "--update", "--totp", fresh(ctl))
    assert res.exit_code == 0 and res.stdout == "Imported: 0 created, 0 updated, 3 unchanged.\n", res.output
    assert {d["asset_id"]: d["revision"] for d in json.loads(admin("devices", "list", "--json").stdout)} == before
    assert admin("devices", "export").stdout == exported.read_text()
    assert admin("devices", "list", "--prefix", "MC-1").stdout.splitlines()[1].startswith("MC-1 ")


def test_passport_verify_accepts_the_controllers_signature_and_refuses_a_tampered_one(ctl, admin, monkeypatch):
    ctl.apply_policy()
    ctl.add_site("north-1")
    ctl.add_device("RTU-1", "north-1", firmware="1.0")
    key = api_get(ctl, admin, "/api/v1/controller/signing-key")
    res = admin("devices", "passport", "RTU-1", "--verify")
    assert res.exit_code == 0, res.output
    assert res.stderr == f"signature OK (key {key['key_id']})\n"
    signed = json.loads(res.stdout)
    assert signed["passport"]["asset_id"] == "RTU-1" and signed["passport"]["firmware"] == "1.0"

    tampered = json.loads(json.dumps(signed))
    tampered["passport"]["baseline"][0]["to"][0]["addresses"] = ["192.0.2.66"]  # redirect the SCADA flow
    with pytest.raises(CliError, match="signature check failed: the passport's signature does not verify"):
        cli_inventory.verify_passport(tampered, key["public_key"], "RTU-1")
    with pytest.raises(CliError, match="the passport is for RTU-1, not RTU-2"):
        cli_inventory.verify_passport(signed, key["public_key"], "RTU-2")
    cli_inventory.verify_passport(signed, key["public_key"], "RTU-1")  # the untouched one still verifies

    real_call = Api.call

    def in_transit(self, method, path, **kw):  # a passport altered between the controller and the CLI
        out = real_call(self, method, path, **kw)
        if path.endswith("/passport"):
            out["passport"]["lifecycle"] = "active" if out["passport"]["lifecycle"] != "active" else "quarantined"
        return out

    monkeypatch.setattr(Api, "call", in_transit)
    res = admin("devices", "passport", "RTU-1", "--verify")
    assert res.exit_code == 1 and res.stdout == ""
    assert res.stderr == "wicket: signature check failed: the passport's signature does not verify\n"


# ---- explain ----


def test_explain_shows_the_trace_and_exits_2_for_a_deny(ctl, admin):
    ctl.apply_policy()
    ctl.add_site("north-1")
    seen = datetime.fromtimestamp(ctl.t, UTC).isoformat()
    ctl.add_device("RTU-1", "north-1", last_seen=seen)
    ctl.add_device("RTU-2", "north-1", lifecycle="quarantined", last_seen=seen)
    ctl.add_user("bob", roles=[("engineer", "north-1")])

    res = admin("policy", "explain", "--device", "RTU-2", "--task", "iec104-diagnostics", "--user", "bob")
    assert res.exit_code == 2, res.output
    lines = res.stdout.splitlines()
    assert lines[0] == "deny: RTU-2 is quarantined" and lines[1] == "failed checks: device_lifecycle"
    assert re.search(r"^device_lifecycle\s+fail\s+RTU-2 is quarantined$", res.stdout, re.M)
    assert re.search(r"^account\s+pass\s", res.stdout, re.M)

    res = admin("policy", "explain", "--device", "RTU-1", "--task", "iec104-diagnostics", "--user", "bob", "--for", "45m")
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("allow: ") and "access: iec104 tcp/2404 to 10.20.0.17" in res.stdout
    decision = json.loads(admin("policy", "explain", "--device", "RTU-1", "--task", "iec104-diagnostics", "--user", "bob",
                                "--for", "45m", "--json").stdout)
    assert decision["outcome"] == "allow" and decision["duration"] == "45m"
    assert [c["check"] for c in decision["trace"]][:3] == ["account", "site_scope", "task"] and len(decision["trace"]) == 12

    res = admin("policy", "explain", "--device", "RTU-1", "--task", "iec104-diagnostics", "--user", "bob", "--for", "3h", "--json")
    assert res.exit_code == 2 and json.loads(res.stdout)["failed_checks"] == ["duration"]
    res = admin("policy", "explain", "--device", "RTU-1", "--task", "iec104-diagnostics", "--at", "2026-06-01T10:00")
    assert res.exit_code == 2 and "needs a time zone" in res.stderr  # a usage error exits 2 as well, on stderr
