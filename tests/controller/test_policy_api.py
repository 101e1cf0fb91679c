"""Policy API: check, diff, apply (admin, step-up; refused when it would strand the inventory),
history and versions, the catalogue endpoints, and evaluate (the engine's dry run, for oneself or, for
admins, soc and approvers, for someone else; `at` and `source` change the decision).

Every test runs on SQLite and PostgreSQL (the `ctl` fixture)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import yaml

from controller.policy import CHECKS
from controller.policy_store import PolicyStore

from .conftest import example_policy_files
from .helpers import admin, headers, iso

API = "/api/v1"











def edited(change) -> dict[str, str]:
    """The example policy with `change(docs)` applied to its parsed files (docs: file name → YAML data)."""
    docs = {name: yaml.safe_load(text) for name, text in example_policy_files().items()}
    change(docs)
    return {name: yaml.safe_dump(doc, sort_keys=False) for name, doc in docs.items() if doc is not None}


def section(files: dict[str, str], name: str) -> dict:
    out = {}
    for text in files.values():
        out.update((yaml.safe_load(text) or {}).get(name) or {})
    return out


def where(docs: dict, sect: str) -> dict:
    """The section `sect` of whichever example file holds it."""
    return next(d[sect] for d in docs.values() if d and sect in d)


# ---- check, diff ----


def test_check_returns_the_version_and_counts_and_changes_nothing(ctl):
    files = example_policy_files()
    res = ctl.client.post(f"{API}/policy/check", json={"files": files}, headers=admin(ctl))
    assert res.status_code == 200, res.text
    out = res.json()
    assert out["version"].startswith("sha256:") and len(out["version"]) == 7 + 64
    for name in ("destinations", "device_types", "tasks", "change_windows", "locations"):
        assert out[name] == len(section(files, name)) > 0, name
    assert ctl.client.get(f"{API}/policy/history", headers=admin(ctl)).json() == []
    assert ctl.client.get(f"{API}/policy", headers=admin(ctl)).status_code == 404

    # Comments and layout do not change the version; a change of meaning does.
    commented = {name: "# reviewed\n" + yaml.safe_dump(yaml.safe_load(text), sort_keys=True, indent=4) for name, text in files.items()}
    again = ctl.client.post(f"{API}/policy/check", json={"files": commented}, headers=admin(ctl)).json()
    assert again["version"] == out["version"]
    longer = edited(lambda d: where(d, "tasks")["iec104-diagnostics"]["duration"].update(max="2h"))
    other = ctl.client.post(f"{API}/policy/check", json={"files": longer}, headers=admin(ctl)).json()
    assert other["version"] != out["version"] and other["tasks"] == out["tasks"]

    applied = ctl.apply_policy(files)
    assert applied["version"] == out["version"]
    assert out["protocols"] == len(ctl.client.get(f"{API}/protocols", headers=admin(ctl)).json())


def test_check_reports_every_problem_with_file_and_line(ctl):
    files = example_policy_files()
    files["broken.yaml"] = ("wicket_policy: 1\n"
                            "tasks:\n"
                            "  broken:\n"
                            "    title: Broken\n"
                            "    protocols: [iec104]\n"
                            "    device_types: [substation-rtu]\n"
                            "    roles: [wizard]\n"
                            "    duration: {default: 2h, max: 1h}\n")
    res = ctl.client.post(f"{API}/policy/check", json={"files": files}, headers=admin(ctl))
    assert res.status_code == 422 and res.json()["error"] == "policy_invalid", res.text
    problems = res.json()["problems"]
    assert len(problems) == 2, problems
    assert problems[0].startswith("broken.yaml:7: tasks.broken.roles") and "'engineer'" in problems[0]
    assert problems[1].startswith("broken.yaml:8: tasks.broken.duration") and "longer than max" in problems[1]
    assert all(p in res.json()["detail"] for p in problems)

    res = ctl.client.post(f"{API}/policy/check", json={"files": {"a.yaml": "wicket_policy: 1\ntasks: [\n"}}, headers=admin(ctl))
    assert res.status_code == 422 and res.json()["problems"][0].startswith("a.yaml:3: not valid YAML")
    res = ctl.client.post(f"{API}/policy/check", json={"files": {"../etc.yaml": "wicket_policy: 1\n"}}, headers=admin(ctl))
    assert res.status_code == 422
    # An invalid policy cannot be applied either, and nothing is.
    res = ctl.client.post(f"{API}/policy/apply", json={"files": files}, headers=ctl.step_up_admin())
    assert res.status_code == 422 and res.json()["problems"] == problems
    assert ctl.client.get(f"{API}/policy/history", headers=admin(ctl)).json() == []


def test_diff_compares_with_the_active_policy(ctl):
    files = example_policy_files()
    first = ctl.client.post(f"{API}/policy/diff", json={"files": files}, headers=admin(ctl)).json()
    assert first["active_version"] is None
    assert "+ tasks.iec104-diagnostics" in first["changes"] and "+ device_types.substation-rtu" in first["changes"]
    applied = ctl.apply_policy(files)

    same = ctl.client.post(f"{API}/policy/diff", json={"files": files}, headers=admin(ctl)).json()
    assert same == {"version": applied["version"], "active_version": applied["version"], "changes": []}

    def change(docs):
        tasks = where(docs, "tasks")
        tasks["iec104-diagnostics"]["duration"]["max"] = "2h"
        del tasks["der-commissioning"]
        where(docs, "destinations")["historian"] = {"addresses": ["198.51.100.20"]}

    res = ctl.client.post(f"{API}/policy/diff", json={"files": edited(change)}, headers=admin(ctl))
    assert res.status_code == 200, res.text
    out = res.json()
    assert out["active_version"] == applied["version"] != out["version"]
    assert sorted(out["changes"]) == sorted(["~ tasks.iec104-diagnostics.duration.max: 1h → 2h", "- tasks.der-commissioning",
                                             "+ destinations.historian"])
    assert len(ctl.client.get(f"{API}/policy/history", headers=admin(ctl)).json()) == 1  # a diff applies nothing


# ---- apply ----


def test_apply_needs_admin_and_step_up_and_records_the_changes(ctl):
    ctl.add_site("north-1")
    boss = ctl.add_user("boss", roles=[("site_admin", None)])
    files = example_policy_files()
    res = ctl.client.post(f"{API}/policy/apply", json={"files": files}, headers=headers(ctl, boss, step_up=True))
    assert res.status_code == 403
    res = ctl.client.post(f"{API}/policy/apply", json={"files": files}, headers=admin(ctl))
    assert res.status_code == 401 and res.json()["error"] == "step_up_required"
    assert ctl.client.get(f"{API}/policy/history", headers=admin(ctl)).json() == []

    first = ctl.apply_policy(files, comment="initial policy")
    assert (first["applied_by"], first["comment"], first["files"]) == ("root", "initial policy", sorted(files))
    assert "+ tasks.rtu-config-change" in first["changes"]
    second_files = edited(lambda d: where(d, "tasks")["iec104-diagnostics"]["duration"].update(max="2h"))
    second = ctl.apply_policy(second_files, comment="longer diagnostics")
    assert second["changes"] == ["~ tasks.iec104-diagnostics.duration.max: 1h → 2h"]
    assert second["id"] > first["id"]

    applies = [e for e in ctl.events() if e["type"] == "policy.apply"]
    assert [(e["category"], e["result"]) for e in applies] == [("policy", "success"), ("policy", "success")]
    assert [e["subject"] for e in applies] == [f"policy-{first['id']}", f"policy-{second['id']}"]
    assert applies[0]["body"]["previous"] is None and applies[0]["body"]["version"] == first["version"]
    assert applies[0]["body"]["change_count"] == len(first["changes"])
    assert applies[1]["body"]["changes"] == second["changes"]
    assert applies[1]["body"]["previous"] == first["version"] and applies[1]["actor"] == "root"

    # Re-applying the active version (even reformatted) is refused and changes nothing.
    for again in (second_files, {k: "# again\n" + v for k, v in second_files.items()}):
        res = ctl.client.post(f"{API}/policy/apply", json={"files": again, "comment": "again"}, headers=ctl.step_up_admin())
        assert res.status_code == 409 and "already the active version" in res.json()["detail"]
    assert len(ctl.client.get(f"{API}/policy/history", headers=admin(ctl)).json()) == 2
    applies = [e for e in ctl.events() if e["type"] == "policy.apply"]
    assert [e["result"] for e in applies] == ["success", "success", "failure", "failure"]
    assert all(e["reason"] == "already_active" and e["subject"] is None for e in applies[2:])
    assert all("already the active version" in e["body"]["detail"] for e in applies[2:])
    # Going back to an earlier version is a new apply, not a repeat.
    back = ctl.apply_policy(files, comment="back")
    assert back["version"] == first["version"] and back["changes"] == ["~ tasks.iec104-diagnostics.duration.max: 2h → 1h"]


def test_another_replica_uses_a_new_policy_within_its_refresh_interval(ctl):
    """Two controllers on one database: the one that applies uses the new version at once, the other
    once its refresh interval has passed."""
    ctl.apply_policy()
    here = ctl.app.state.policies
    there = PolicyStore(ctl.app.state.auth, refresh_seconds=0.3)
    first = there.require_active().version
    assert here.require_active().version == first
    ctl.apply_policy(edited(lambda d: where(d, "tasks")["iec104-diagnostics"]["duration"].update(max="2h")))
    second = here.require_active().version
    assert second != first
    assert there.require_active().version == first  # still within its interval
    time.sleep(0.35)
    assert there.require_active().version == second


def test_apply_refuses_a_policy_that_strands_the_inventory(ctl):
    ctl.apply_policy()
    ctl.add_site("north-1", change_windows=["weeknights"])
    ctl.add_device("der-1", "north-1", "der-gateway")
    ctl.add_device("der-2", "north-1", "der-gateway", addresses=["10.20.0.18"])
    active = ctl.client.get(f"{API}/policy", headers=admin(ctl)).json()

    def no_der(docs):
        del where(docs, "device_types")["der-gateway"]
        del where(docs, "tasks")["der-commissioning"]
        del where(docs, "tasks")["der-commissioning-mqtt"]

    def no_weeknights(docs):
        del where(docs, "change_windows")["weeknights"]

    for change, words in ((no_der, "device type 'der-gateway' is still used by 2 device(s) (der-1, der-2)"),
                          (no_weeknights, "site north-1 names change window(s) weeknights")):
        files = edited(change)
        assert ctl.client.post(f"{API}/policy/check", json={"files": files}, headers=admin(ctl)).status_code == 200
        res = ctl.client.post(f"{API}/policy/apply", json={"files": files}, headers=ctl.step_up_admin())
        assert res.status_code == 409 and words in res.json()["detail"], res.text
        now = ctl.client.get(f"{API}/policy", headers=admin(ctl)).json()
        assert (now["id"], now["version"]) == (active["id"], active["version"])
    assert "der-gateway" in ctl.client.get(f"{API}/device-types", headers=admin(ctl)).json()
    # Each refusal is on record, with what stood in the way.
    applies = [e for e in ctl.events() if e["type"] == "policy.apply"]
    assert [e["result"] for e in applies] == ["success", "failure", "failure"]
    assert [e["reason"] for e in applies[1:]] == ["would_strand_inventory"] * 2
    assert "der-gateway" in applies[1]["body"]["detail"] and "weeknights" in applies[2]["body"]["detail"]

    # Once the inventory no longer needs them, the same policies apply.
    for asset in ("der-1", "der-2"):
        ctl.client.patch(f"{API}/devices/{asset}", json={"lifecycle": "decommissioned"}, headers=ctl.step_up_admin())
        assert ctl.client.delete(f"{API}/devices/{asset}", headers=ctl.step_up_admin()).status_code == 204
    applied = ctl.apply_policy(edited(no_der))
    assert "- device_types.der-gateway" in applied["changes"]
    res = ctl.client.patch(f"{API}/sites/north-1", json={"change_windows": ["weekend"]}, headers=ctl.step_up_admin())
    assert res.status_code == 200, res.text
    ctl.apply_policy(edited(lambda d: (no_der(d), no_weeknights(d))))


# ---- history, versions, catalogue ----


def test_history_and_versions_return_the_files_as_written(ctl):
    eng = ctl.add_user("eng", roles=[("engineer", None)])
    h = headers(ctl, eng)
    assert ctl.client.get(f"{API}/policy", headers=h).status_code == 404
    for path in ("/tasks", "/protocols", "/device-types"):
        res = ctl.client.get(API + path, headers=h)
        assert res.status_code == 409 and "no policy" in res.json()["detail"], path

    files = example_policy_files()
    first = ctl.apply_policy(files, comment="first")
    second_files = {**files, "zz-extra.yaml": "# historian, added later\nwicket_policy: 1\ndestinations:\n"
                                              "  historian: {addresses: [198.51.100.20]}   # the plant historian\n"}
    second = ctl.apply_policy(second_files, comment="second")

    history = ctl.client.get(f"{API}/policy/history", headers=h).json()
    assert [(v["id"], v["comment"], v["version"]) for v in history] == [
        (second["id"], "second", second["version"]), (first["id"], "first", first["version"])]
    assert history[0]["files"] == sorted(second_files) and history[1]["files"] == sorted(files)
    for version, sent in ((first, files), (second, second_files)):
        full = ctl.client.get(f"{API}/policy/versions/{version['id']}", headers=h).json()
        assert full["sources"] == sent  # byte for byte, comments included
        assert full["version"] == version["version"]
    full = ctl.client.get(f"{API}/policy/versions/{second['id']}", headers=h).json()
    assert full["document"]["destinations"]["historian"]["addresses"] == ["198.51.100.20"]
    assert ctl.client.get(f"{API}/policy", headers=h).json()["id"] == second["id"]
    assert ctl.client.get(f"{API}/policy/versions/{second['id'] + 100}", headers=h).status_code == 404
    assert ctl.client.get(f"{API}/policy/versions/0", headers=h).status_code == 422
    assert ctl.client.get(f"{API}/policy/history").status_code == 401


def test_tasks_protocols_and_device_types_follow_the_active_policy(ctl):
    eng = ctl.add_user("eng", roles=[("engineer", None)])
    files = example_policy_files()
    files["zz-protocols.yaml"] = "wicket_policy: 1\nprotocols:\n  iccp: {title: ICCP / TASE.2, transport: tcp, ports: [102]}\n"
    ctl.apply_policy(files)
    h = headers(ctl, eng)
    tasks = ctl.client.get(f"{API}/tasks", headers=h).json()
    assert set(tasks) == set(section(files, "tasks"))
    diag = ctl.client.get(f"{API}/tasks/iec104-diagnostics", headers=h).json()
    assert diag == tasks["iec104-diagnostics"]
    assert (diag["protocols"], diag["device_types"], diag["duration"]) == (["iec104"], ["substation-rtu"], {"default": "30m", "max": "1h"})
    assert ctl.client.get(f"{API}/tasks/no-such-task", headers=h).status_code == 404
    assert ctl.client.get(f"{API}/tasks/Bad Name", headers=h).status_code == 422

    protocols = ctl.client.get(f"{API}/protocols", headers=h).json()
    assert protocols["iec104"]["ports"] == [2404] and protocols["iec104"]["transport"] == "tcp"
    assert protocols["iccp"]["ports"] == [102] and "dlms" in protocols
    types = ctl.client.get(f"{API}/device-types", headers=h).json()
    assert set(types) == set(section(files, "device_types"))
    assert types["substation-rtu"]["baseline"][0]["to"] == ["scada-master-a", "scada-master-b"]

    ctl.apply_policy(edited(lambda d: where(d, "tasks").pop("der-commissioning")))
    assert "der-commissioning" not in ctl.client.get(f"{API}/tasks", headers=h).json()
    assert "iccp" not in ctl.client.get(f"{API}/protocols", headers=h).json()


# ---- evaluate ----


def last_weeknight(now: datetime) -> datetime:
    """The latest Monday 23:00 UTC before `now`: inside the example's `weeknights` window (Mon-Thu 22:00-04:00)."""
    day = now.replace(hour=23, minute=0, second=0, microsecond=0)
    while day.weekday() != 0 or day >= now:
        day -= timedelta(days=1)
    return day


class World:
    """The example policy; north-1 (UTC, weeknights) with an active RTU, a quarantined one and a meter
    concentrator; an engineer, a contractor, an approver and soc at north-1; an engineer at south-1."""

    def __init__(self, ctl):
        self.ctl = ctl
        ctl.apply_policy()
        ctl.add_site("north-1", lan_networks=["10.20.0.0/16"], change_windows=["weeknights"])
        ctl.add_site("south-1", lan_networks=["10.30.0.0/16"])
        seen = iso(ctl.t)
        ctl.add_device("rtu-1", "north-1", last_seen=seen)
        ctl.add_device("rtu-q", "north-1", addresses=["10.20.0.18"], lifecycle="quarantined", last_seen=seen)
        ctl.add_device("mc-1", "north-1", "meter-concentrator", addresses=["10.20.1.1"], last_seen=iso(ctl.t - 7 * 3600))
        self.eng = ctl.add_user("eng", roles=[("engineer", "north-1")])
        until = iso(ctl.t + 30 * 86400)
        self.con = ctl.add_user("con", roles=[("contractor", "north-1")], kind="contractor", sponsor="eng", valid_until=until)
        self.appr = ctl.add_user("appr", roles=[("approver", "north-1")])
        self.soc = ctl.add_user("soc", roles=[("soc", None)])
        self.far = ctl.add_user("far", roles=[("engineer", "south-1")])

    def evaluate(self, person, expect: int = 200, **body) -> dict:
        res = self.ctl.client.post(f"{API}/policy/evaluate", json=body, headers=headers(self.ctl, person))
        assert res.status_code == expect, res.text
        return res.json()


def trace(decision: dict) -> dict[str, str]:
    return {t["check"]: t["result"] for t in decision["trace"]}


def test_an_engineer_evaluates_for_themselves(ctl):
    w = World(ctl)
    before = [e for e in ctl.events() if e["category"] != "authentication"]
    d = w.evaluate(w.eng, device="rtu-1", task="iec104-diagnostics")
    assert (d["outcome"], d["reason"], d["failed_checks"]) == ("allow", "allowed", [])
    assert [t["check"] for t in d["trace"]] == list(CHECKS)
    assert set(trace(d).values()) <= {"pass", "not_applicable"}
    assert d["access"] == [{"protocol": "iec104", "transport": "tcp", "port": 2404, "address": "10.20.0.17"}]
    assert d["duration"] == "30m" and d["approvals_required"] == 0 and d["recording"] == "metadata"
    assert d["policy_version"] == ctl.client.get(f"{API}/policy", headers=admin(ctl)).json()["version"]
    evaluated = datetime.fromisoformat(d["evaluated_at"])
    assert abs(evaluated.timestamp() - ctl.t) < 1
    assert datetime.fromisoformat(d["ends_at"]) - evaluated == timedelta(minutes=30)

    d = w.evaluate(w.eng, device="rtu-q", task="iec104-diagnostics")
    assert (d["outcome"], d["failed_checks"], d["reason"]) == ("deny", ["device_lifecycle"], "rtu-q is quarantined")
    assert d["access"] == [] and d["ends_at"] is None
    d = w.evaluate(w.eng, device="rtu-1", task="iec104-diagnostics", duration="3h")
    assert d["failed_checks"] == ["duration"] and d["reason"] == "3h asked; task 'iec104-diagnostics' allows at most 1h"
    d = w.evaluate(w.eng, device="mc-1", task="iec104-diagnostics")  # wrong type for the task; silent past its 6h limit
    assert d["outcome"] == "deny" and d["failed_checks"] == ["task_device_type", "device_seen", "protocol"]
    assert "task 'iec104-diagnostics' is for substation-rtu; mc-1 is a meter-concentrator" == d["reason"]
    d = w.evaluate(w.eng, device="rtu-1", task="no-such-task")
    assert d["failed_checks"] == ["task"] and "there is no task 'no-such-task'" in d["reason"]
    assert trace(d)["task_role"] == "not_evaluated"
    w.evaluate(w.eng, expect=404, device="no-such-device", task="iec104-diagnostics")
    w.evaluate(w.eng, expect=422, device="rtu-1", task="iec104-diagnostics", duration="soon")
    # An engineer of another site cannot see rtu-1 at all, so asking about it is a 404, as GET /devices/rtu-1 is.
    w.evaluate(w.far, expect=404, device="rtu-1", task="iec104-diagnostics")
    # A dry run: nothing is recorded.
    assert [e for e in ctl.events() if e["category"] != "authentication"] == before


def test_a_contractor_needs_approval_and_the_partner_gateway(ctl):
    w = World(ctl)
    d = w.evaluate(w.con, device="rtu-1", task="iec104-diagnostics", source="203.0.113.5")
    assert d["outcome"] == "allow_with_approval" and d["failed_checks"] == []
    assert d["approvals_required"] == 1 and d["approval_reasons"] == ["contractors always need approval"]
    assert trace(d)["location"] == "pass"
    d = w.evaluate(w.con, device="rtu-1", task="iec104-diagnostics", source="198.51.100.7")
    assert (d["outcome"], d["failed_checks"]) == ("deny", ["location"])
    assert "contractors-via-partner-gateway" in d["reason"] and "198.51.100.7" in d["reason"]
    d = w.evaluate(w.con, device="rtu-1", task="iec104-diagnostics")  # default source: the test client, not an address
    assert d["failed_checks"] == ["location"]
    d = w.evaluate(w.con, device="rtu-1", task="rtu-config-change", source="203.0.113.5")
    assert "task_role" in d["failed_checks"]


def test_evaluating_for_someone_else_needs_approver_soc_or_admin(ctl):
    w = World(ctl)
    w.evaluate(w.eng, expect=403, device="rtu-1", task="iec104-diagnostics", user="con")
    w.evaluate(w.con, expect=403, device="rtu-1", task="iec104-diagnostics", user="eng")
    assert w.evaluate(w.eng, device="rtu-1", task="iec104-diagnostics", user="eng")["outcome"] == "allow"  # oneself by name
    for person in (w.appr, w.soc):
        d = w.evaluate(person, device="rtu-1", task="iec104-diagnostics", user="con", source="203.0.113.9")
        assert d["outcome"] == "allow_with_approval", person.username
        account = next(t for t in d["trace"] if t["check"] == "account")
        assert account["inputs"]["user"] == "con" and account["inputs"]["kind"] == "contractor"
    res = ctl.client.post(f"{API}/policy/evaluate", json={"device": "rtu-1", "task": "iec104-diagnostics", "user": "eng"},
                          headers=admin(ctl))
    assert res.status_code == 200 and res.json()["outcome"] == "allow"
    w.evaluate(w.soc, expect=404, device="rtu-1", task="iec104-diagnostics", user="nobody")
    # The approver evaluating for themselves holds no requesting role for the task.
    d = w.evaluate(w.appr, device="rtu-1", task="iec104-diagnostics")
    assert d["failed_checks"] == ["task_role"]


def test_at_and_source_move_the_decision(ctl):
    w = World(ctl)
    monday_night = last_weeknight(datetime.fromtimestamp(ctl.t, UTC))
    control_room = "192.0.2.10"

    def config(**body):
        return w.evaluate(w.eng, device="rtu-1", task="rtu-config-change", **body)

    d = config(at=iso(monday_night), source=control_room)
    assert d["outcome"] == "allow_with_approval" and d["approvals_required"] == 2, d
    assert d["approval_reasons"] == ["task 'rtu-config-change' requires approval"]
    assert d["access"] == [{"protocol": "ssh", "transport": "tcp", "port": 22, "address": "10.20.0.17"}]
    window = next(t for t in d["trace"] if t["check"] == "change_window")
    assert window["result"] == "pass" and window["inputs"]["window"] == ["weeknights"]
    assert datetime.fromisoformat(d["evaluated_at"]) == monday_night

    noon = monday_night.replace(hour=12)
    d = config(at=iso(noon), source=control_room)
    assert (d["outcome"], d["failed_checks"]) == ("deny", ["change_window"])
    assert f"the next opens at {noon:%Y-%m-%d} 22:00 UTC" in d["reason"]
    d = config(at=iso(monday_night), source="198.51.100.7")
    assert (d["outcome"], d["failed_checks"]) == ("deny", ["location"])
    assert "config-changes-from-control-room" in d["reason"]
    assert config(at=iso(noon), source="198.51.100.7")["failed_checks"] == ["change_window", "location"]

    # Near the window's end the default 45m does not fit; 30m does.
    late = monday_night + timedelta(hours=4, minutes=30)  # Tuesday 03:30, the window closes at 04:00
    d = config(at=iso(late), source=control_room)
    assert d["failed_checks"] == ["change_window"] and "ask for at most 30m" in d["reason"]
    assert config(at=iso(late), source=control_room, duration="30m")["outcome"] == "allow_with_approval"

    # The window is in the site's time zone: 23:00 in Tokyo is 14:00 UTC.
    ctl.add_site("east-1", time_zone="Asia/Tokyo", lan_networks=["10.40.0.0/16"], change_windows=["weeknights"])
    ctl.add_device("rtu-e", "east-1", addresses=["10.40.0.1"], last_seen=iso(ctl.t))
    res = ctl.client.put(f"{API}/users/{w.eng.user_id}/roles", json={"roles": [{"role": "engineer", "site": "north-1"},
                                                                               {"role": "engineer", "site": "east-1"}]},
                         headers=ctl.step_up_admin())
    assert res.status_code == 200, res.text
    tokyo_night = monday_night.replace(hour=14)
    d = w.evaluate(w.eng, device="rtu-e", task="rtu-config-change", at=iso(tokyo_night), source=control_room)
    assert d["outcome"] == "allow_with_approval", d["reason"]
    assert config(at=iso(tokyo_night), source=control_room)["failed_checks"] == ["change_window"]
    # `at` far from the device's last report: the posture check fails.
    d = w.evaluate(w.eng, device="rtu-1", task="iec104-diagnostics", at=iso(datetime.fromtimestamp(ctl.t, UTC) + timedelta(days=2)))
    assert d["failed_checks"] == ["device_seen"]


# ---- regressions: bugs found while writing these tests, now fixed ----


def test_evaluate_does_not_reveal_devices_outside_the_callers_sites(ctl):
    w = World(ctl)
    assert ctl.client.get(f"{API}/devices/rtu-1", headers=headers(ctl, w.far)).status_code == 404
    res = ctl.client.post(f"{API}/policy/evaluate", json={"device": "rtu-1", "task": "iec104-diagnostics"}, headers=headers(ctl, w.far))
    assert "10.20.0.17" not in res.text and "10.20.0.0/16" not in res.text
    assert res.status_code == 404, res.text


def test_apply_refuses_a_policy_that_drops_a_protocol_devices_name(ctl):
    files = example_policy_files()
    files["zz-protocols.yaml"] = "wicket_policy: 1\nprotocols:\n  iccp: {title: ICCP / TASE.2, transport: tcp, ports: [102]}\n"
    ctl.apply_policy(files)
    ctl.add_site("north-1")
    ctl.add_device("rtu-1", "north-1", ports={"iccp": 1102})
    res = ctl.client.post(f"{API}/policy/apply", json={"files": example_policy_files()}, headers=ctl.step_up_admin())
    patched = ctl.client.patch(f"{API}/devices/rtu-1", json={"firmware": "2.0"}, headers=ctl.step_up_admin())
    assert res.status_code == 409 and "iccp" in res.json()["detail"], res.text
    assert patched.status_code == 200, patched.text
