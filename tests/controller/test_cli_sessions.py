"""`wicket request|status|config|approvals|approve|extend|close|revoke|break-glass|review|access|sessions`
against a real HTTP server (the server fixture of test_cli.py), on SQLite and PostgreSQL. Each person has
their own CLI state; effects are checked through the API, the fake nodes and the audit events."""

from __future__ import annotations

import re
import stat
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from controller import cli_sessions, wgconf
from controller.session_lanes import mint_keypair

from . import test_cli
from .conftest import example_policy_files
from .helpers import API, iso
from .test_cli import Cli

server = test_cli.server  # the HTTP server fixture of test_cli.py

SITE, NODE = "north-1", "edge-1"
DIAG = ("--device", "RTU-17", "--task", "iec104-diagnostics")


@pytest.fixture
def lab(ctl, server, tmp_path):
    """The example policy, one site with an agent, an RTU and a DER gateway; bob (engineer) and alice
    (approver) logged in with their own `wicket`."""
    ctl.apply_policy()
    ctl.add_site(SITE, lan_networks=["10.20.0.0/16"])
    ctl.add_agent(SITE, NODE)
    ctl.add_device("RTU-17", SITE, last_seen=iso(ctl.t))
    ctl.add_device("DER-1", SITE, device_type="der-gateway", last_seen=iso(ctl.t))
    people = {"bob": ctl.add_user("bob", roles=[("engineer", SITE)]), "alice": ctl.add_user("alice", roles=[("approver", SITE)])}
    clis = {}
    for name, person in people.items():
        ctl.advance(30)
        clis[name] = Cli(server, tmp_path / f"cli-{name}")
        clis[name].login(ctl, person)
    return SimpleNamespace(ctl=ctl, people=people, tmp=tmp_path, **clis)


def totp(lab, name: str) -> str:
    """A step-up code from a step this person has not used yet."""
    lab.ctl.advance(30)
    return lab.ctl.code(lab.people[name])


def run(lab, name: str, *args: str, step_up: bool = False, expect: int = 0, **kw):
    res = getattr(lab, name)(*args, *(("--totp", totp(lab, name)) if step_up else ()), **kw)
    assert res.exit_code == expect, res.output
    return res


def request(lab, *args: str, expect: int = 0):
    return run(lab, "bob", "request", *args, "--reason", "fault 4711 at the feeder", step_up=True, expect=expect)


def sid_of(text: str) -> str:
    return re.search(r"\bs-[a-z2-9]{12}\b", text).group(0)


def api_session(lab, sid: str) -> dict:
    res = lab.ctl.client.get(f"{API}/sessions/{sid}", headers=lab.ctl.auth(lab.ctl.admin_token()))
    assert res.status_code == 200, res.text
    return res.json()


def session_events(lab, sid: str, type_: str) -> list[dict]:
    return [e for e in lab.ctl.events() if e["subject"] == sid and e["type"] == type_]


def ends_in(s: dict) -> str:
    """What the CLI should say, from the API's own end time and time left."""
    end = datetime.fromisoformat(s["end_at"]).astimezone(UTC)
    m, sec = divmod(s["seconds_left"], 60)
    return f"ends in {m}m {sec}s at {end:%H:%M} UTC"


def private_mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- request → config ----


def test_request_opens_at_once_and_config_serves_file_and_qr_from_one_download(lab):
    res = request(lab, *DIAG, "--for", "30m")
    sid = sid_of(res.stdout)
    s = api_session(lab, sid)
    assert s["state"] == "active" and s["duration"] == "30m"
    assert f"Session {sid} is active: iec104-diagnostics on RTU-17 (10.20.0.17: iec104 tcp/2404), 30m." in res.stdout
    assert f"It {ends_in(s)}." in res.stdout
    assert f"Next: wicket config {sid} -o {sid}.conf" in res.stdout

    status = run(lab, "bob", "status", sid).stdout
    assert re.search(rf"^ends:\s+{re.escape(ends_in(api_session(lab, sid)))}$", status, re.M), status
    assert "warning" not in status and f"not downloaded yet: wicket config {sid}" in status

    conf = lab.tmp / f"{sid}.conf"
    res = run(lab, "bob", "config", sid, "-o", str(conf), "--qr")
    text = conf.read_text()
    assert private_mode(conf) == 0o600
    assert "PrivateKey = " in text and wgconf.PLACEHOLDER not in text and "AllowedIPs = 10.20.0.17/32" in text
    assert wgconf.qr_terminal(text) in res.stdout  # the QR is of the very file written
    assert f"sudo wg-quick up {conf.resolve()}" in res.stdout and "Scan from QR code" in res.stdout
    assert [e["result"] for e in session_events(lab, sid, "session.config")] == ["success"]  # one download served both

    res = run(lab, "bob", "config", sid, "-o", str(lab.tmp / "again.conf"), expect=1)
    assert res.stderr.startswith(f"wicket: already downloaded: the config of session {sid} was downloaded at ")
    assert f"hint: wicket close {sid}" in res.stderr and not (lab.tmp / "again.conf").exists()
    assert [e.get("reason") for e in session_events(lab, sid, "session.config")] == [None, "already_downloaded"]


def test_config_never_overwrites_without_force_and_writes_every_output_private(lab):
    sid = sid_of(request(lab, *DIAG).stdout)
    conf = lab.tmp / "rtu.conf"
    conf.write_text("my notes\n")
    res = run(lab, "bob", "config", sid, "-o", str(conf), expect=2)
    assert f"{conf} exists" in res.stderr and conf.read_text() == "my notes\n"
    assert api_session(lab, sid)["config_available"]  # refused before the download: it is still there
    assert run(lab, "bob", "config", sid, expect=2).stderr.startswith("wicket: where should the one-time config go?")

    png, svg = lab.tmp / "rtu.png", lab.tmp / "rtu.svg"
    run(lab, "bob", "config", sid, "-o", str(conf), "--png", str(png), "--svg", str(svg), "--force")
    text = conf.read_text()
    assert text.startswith(f"# wicket session: {sid}\n")
    assert png.read_bytes() == wgconf.qr_png(text) and svg.read_bytes() == wgconf.qr_svg(text)
    assert {private_mode(p) for p in (conf, png, svg)} == {0o600}
    assert len(session_events(lab, sid, "session.config")) == 1


def test_bring_your_own_key_is_filled_in_locally(lab):
    private, public = mint_keypair()
    (lab.tmp / "wg.pub").write_text(public + "\n")
    (lab.tmp / "wg.key").write_text(private + "\n")
    res = request(lab, *DIAG, "--public-key-file", str(lab.tmp / "wg.pub"))
    sid = sid_of(res.stdout)
    assert api_session(lab, sid)["key_mode"] == "byok" and "--private-key-file YOUR-KEY" in res.stdout

    res = run(lab, "bob", "config", sid, "--qr", expect=2)  # a QR without the key would not import
    assert "--private-key-file" in res.stderr and api_session(lab, sid)["config_available"]

    conf = lab.tmp / "byok.conf"
    res = run(lab, "bob", "config", sid, "-o", str(conf), "--qr", "--private-key-file", str(lab.tmp / "wg.key"))
    text = conf.read_text()
    assert f"PrivateKey = {private}\n" in text and wgconf.PLACEHOLDER not in text and wgconf.BYOK_NOTE not in text
    assert wgconf.qr_terminal(text) in res.stdout and private_mode(conf) == 0o600


# ---- decisions and approval ----


def test_a_denied_request_names_every_failed_check_and_exits_1(lab):
    res = request(lab, "--device", "DER-1", "--task", "rtu-config-change", "--trace", expect=1)
    sid = sid_of(res.stderr)
    decision = api_session(lab, sid)["decision"]
    failed = [c for c in decision["trace"] if c["result"] == "fail"]
    assert len(failed) >= 2  # the device type, the protocol, the window …: all of them, not the first
    assert res.stderr.splitlines() == [f"wicket: request {sid} denied: {len(failed)} check(s) failed:",
                                       *[f"  {c['check']}: {c['reason']}" for c in failed]]
    for c in decision["trace"]:  # --trace: every check, passed ones too
        assert f"{c['check']}: {c['reason'] or '-'}" in res.stdout


def test_a_request_waits_for_an_approver_who_sees_the_decision(lab):
    res = request(lab, "--device", "DER-1", "--task", "der-commissioning")
    sid = sid_of(res.stdout)
    s = api_session(lab, sid)
    assert s["state"] == "pending_approval"
    assert f"Request {sid} waits for approval: der-commissioning on DER-1, 1h." in res.stdout
    assert f"It needs 1 approver(s) with the approver role at site {SITE}, none of them you." in res.stdout
    assert f"  why: {s['decision']['approval_reasons'][0]}" in res.stdout
    res = run(lab, "bob", "approve", sid, "--reason", "mine", step_up=True, expect=1)
    assert res.stderr == f"wicket: approving needs the approver role at site {SITE}\n"

    queue = run(lab, "alice", "approvals", "--trace").stdout
    assert f"{sid}  request: bob asks for der-commissioning on DER-1 at {SITE} for 1h" in queue
    assert f"  decision:  {s['decision']['reason']}" in queue and "  approvals: 0 of 1" in queue
    assert all(f"{c['check']}: {c['reason'] or '-'}" in queue for c in s["decision"]["trace"])

    res = run(lab, "alice", "approve", sid, "--reason", "commissioning agreed", step_up=True)
    assert res.stdout.startswith(f"Approved {sid}: bob can open it (wicket activate {sid})")
    assert run(lab, "alice", "approvals").stdout == "Nothing waits for your approval.\n"
    res = run(lab, "bob", "activate", sid, step_up=True)
    assert f"Session {sid} is active: der-commissioning on DER-1" in res.stdout
    assert sid in lab.ctl.nodes.lanes(NODE)


def test_a_rejected_request_shows_who_rejected_it(lab):
    sid = sid_of(request(lab, "--device", "DER-1", "--task", "der-commissioning").stdout)
    assert run(lab, "alice", "reject", sid, "--reason", "not this week").stdout == f"Rejected request {sid}.\n"
    assert re.search(r"^state:\s+rejected by alice at .* UTC$", run(lab, "bob", "status", sid).stdout, re.M)
    assert "is rejected: there is nothing to approve" in run(lab, "alice", "approve", sid, "--reason", "late", step_up=True, expect=1).stderr


def test_a_lane_that_does_not_open_says_so_and_activate_retries(lab):
    lab.ctl.nodes.unreachable.add(NODE)
    res = request(lab, *DIAG, expect=1)
    sid = sid_of(res.stdout)
    assert "wicket: the lane did not open: the site's agent could not open the lane" in res.stderr
    assert f"hint: wicket activate {sid}" in res.stderr and api_session(lab, sid)["state"] == "approved"
    lab.ctl.nodes.unreachable.clear()
    assert f"Session {sid} is active" in run(lab, "bob", "activate", sid, step_up=True).stdout


# ---- the running session ----


def test_status_warns_near_the_end_and_extend_moves_the_end(lab):
    sid = sid_of(request(lab, *DIAG, "--for", "30m").stdout)
    lab.ctl.advance(13 * 60)
    assert "warning" not in run(lab, "bob", "status", sid).stdout
    lab.ctl.advance(13 * 60)  # (a login lapses after 15 min unused)
    res = run(lab, "bob", "status")  # no ID: the one open session
    assert f"session:    {sid}" in res.stdout
    assert f"warning: {sid} ends in less than 5 minutes; to extend: wicket extend {sid}" in res.stdout

    res = run(lab, "bob", "extend", sid, "--by", "15m", "--reason-code", "no-such-code", step_up=True, expect=1)
    assert "is not one of task 'iec104-diagnostics'" in res.stderr
    before = datetime.fromisoformat(api_session(lab, sid)["end_at"])
    res = run(lab, "bob", "extend", sid, "--by", "15m", "--reason-code", "fault-still-open", step_up=True)
    s = api_session(lab, sid)
    assert datetime.fromisoformat(s["end_at"]) == before + timedelta(minutes=15)
    assert res.stdout == f"Extended {sid} by 15m: it now {ends_in(s)}.\n" and s["seconds_left"] > 5 * 60
    status = run(lab, "bob", "status", sid).stdout
    assert "warning" not in status and re.search(r"^extension 1:\s+\+15m \(fault-still-open\)$", status, re.M)


def test_an_extension_that_needs_reapproval_waits_in_the_queue(lab):
    files = example_policy_files()
    old = "max_total: 30m                   # ... adding at most 30m in all"
    assert old in files["tasks.yaml"], "the example policy's wording changed"
    files["tasks.yaml"] = files["tasks.yaml"].replace(old, "max_total: 30m\n      reapproval: true")
    lab.ctl.apply_policy(files)
    sid = sid_of(request(lab, *DIAG).stdout)
    res = run(lab, "bob", "extend", sid, "--by", "15m", "--reason-code", "fault-still-open", "--note", "crew late", step_up=True)
    assert res.stdout.startswith(f"Extension of {sid} by 15m requested: it waits for approval; the session still ends in ")

    queue = run(lab, "alice", "approvals").stdout
    assert f"{sid}  extension: bob asks for 15m more of iec104-diagnostics on RTU-17 at {SITE}" in queue
    assert "  reason:    fault-still-open (crew late)" in queue and "  approvals: 0 of 1" in queue
    res = run(lab, "alice", "approve", sid, "--reason", "crew is on its way", step_up=True)
    assert res.stdout == f"Approved the extension of {sid}: it now {ends_in(api_session(lab, sid))}.\n"
    status = run(lab, "bob", "status", sid).stdout
    assert re.search(r"^extension 1:\s+\+15m \(fault-still-open\), approved by alice$", status, re.M)
    assert "approvals:" not in status  # the request needed none; the extension's answer is on its own line


def test_status_watch_counts_down_until_the_session_ends(lab, monkeypatch):
    sid = sid_of(request(lab, *DIAG, "--for", "30m").stdout)

    def a_minute_passes(_seconds):
        lab.ctl.advance(60)
        lab.ctl.tick()
    monkeypatch.setattr(cli_sessions, "_pause", a_minute_passes)
    out = run(lab, "bob", "status", sid, "--watch").stdout.splitlines()
    countdown = [line for line in out if line.startswith(f"{sid}: ends in ")]
    assert 25 <= len(countdown) <= 31  # about one a minute, and it stopped
    assert sum(line.startswith(f"warning: {sid} ends in less than 5 minutes") for line in out) == 1
    assert re.fullmatch(rf"{sid} has ended: expired at .* UTC, \S+", out[-1]), out[-1]
    assert api_session(lab, sid)["state"] == "expired" and sid not in lab.ctl.nodes.lanes(NODE)

    def ctrl_c(_seconds):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli_sessions, "_pause", ctrl_c)
    sid = sid_of(request(lab, *DIAG).stdout)
    res = run(lab, "bob", "status", sid, "--watch")  # exit 0, no "Aborted!", no traceback
    assert "Aborted" not in res.output and api_session(lab, sid)["state"] == "active"


def test_sessions_lists_mine_or_every_one_with_filters(lab):
    closed = sid_of(request(lab, *DIAG).stdout)
    assert run(lab, "bob", "close", closed, "--reason", "done").stdout == f"Closed {closed}; its lane is being removed.\n"
    assert closed not in lab.ctl.nodes.lanes(NODE)
    active = sid_of(request(lab, *DIAG).stdout)

    rows = run(lab, "bob", "sessions").stdout.splitlines()
    assert re.match(r"ID\s+STATE\s+USER\s+DEVICE\s+TASK\s+ENDS/ENDED\s+LEFT$", rows[0])
    assert [r.split()[:2] for r in rows[1:]] == [[active, "active"], [closed, "closed"]]  # newest first
    assert re.search(r"\s\d+m \d+s$", rows[1]) and rows[2].endswith(" -")
    assert [r.split()[0] for r in run(lab, "bob", "sessions", "--state", "closed").stdout.splitlines()[1:]] == [closed]
    assert run(lab, "alice", "sessions").stdout == "No sessions.\n"  # alice has none of her own
    assert {r.split()[0] for r in run(lab, "alice", "sessions", "--all", "--device", "RTU-17").stdout.splitlines()[1:]} == {active, closed}
    assert run(lab, "bob", "sessions", "--state", "finished", expect=2).stderr.startswith("wicket: unknown state 'finished'")

    res = run(lab, "bob", "revoke", active, "--reason", "mine to end", expect=1)
    assert res.stderr == f"wicket: revoking needs the approver, soc or admin role at site {SITE}\n"
    res = run(lab, "alice", "revoke", active, "--reason", "feeder switched back")
    assert res.stdout == f"Revoked {active} (bob, iec104-diagnostics on RTU-17).\n"
    assert api_session(lab, active)["state"] == "revoked" and active not in lab.ctl.nodes.lanes(NODE)


def test_who_had_access_to_a_device(lab):
    start = iso(lab.ctl.t - 60)
    sid = sid_of(request(lab, *DIAG).stdout)
    run(lab, "bob", "close", sid)
    rows = run(lab, "alice", "access", "RTU-17", "--from", start, "--to", iso(lab.ctl.t + 60)).stdout.splitlines()
    assert re.match(r"SESSION\s+USER\s+TASK\s+FROM\s+TO\s+STATE\s+APPROVED BY\s+TUNNEL ADDRESS$", rows[0])
    assert rows[1].split()[:3] == [sid, "bob", "iec104-diagnostics"] and "closed_by_engineer" in rows[1]
    assert api_session(lab, sid)["tunnel_address"] in rows[1]
    later = iso(lab.ctl.t + 3600)
    res = run(lab, "alice", "access", "RTU-17", "--from", later, "--to", iso(lab.ctl.t + 7200))
    assert res.stdout.startswith("Nobody had access to RTU-17 between ")
    res = run(lab, "bob", "access", "RTU-17", "--from", start, "--to", later, expect=1)  # an engineer may not ask
    assert res.stderr == "wicket: who had access to a device is for approvers, soc, site admins and admins at site north-1\n"


# ---- break-glass ----


def _grant_break_glass(lab, name: str) -> None:
    person = lab.people[name]
    roles = [{"role": r, "site": site} for r, site in [*person.roles, ("break_glass", SITE)]]
    res = lab.ctl.client.put(f"{API}/users/{person.user_id}/roles", json={"roles": roles}, headers=lab.ctl.step_up_admin())
    assert res.status_code == 200, res.text


def test_break_glass_finds_the_task_shouts_and_is_reviewed_by_someone_else(lab):
    _grant_break_glass(lab, "bob")
    res = run(lab, "bob", "break-glass", "--device", "RTU-17", "--reason", "protection trip, control room blind",
              "--incident", "INC-7", step_up=True)
    sid = sid_of(res.stdout)
    s = api_session(lab, sid)
    assert s["task"] == "iec104-diagnostics" and s["break_glass"] and s["state"] == "active"  # the type's one break-glass task
    assert "BREAK-GLASS: emergency access WITHOUT approval." in res.stderr
    assert f"Session {sid} is active" in res.stdout and f"wicket review {sid} --note" in res.stdout
    assert [e["result"] for e in session_events(lab, sid, "break_glass.open")] == ["success"]

    res = run(lab, "bob", "break-glass", "--device", "DER-1", "--reason", "inverter fault", "--incident", "INC-8", expect=1)
    assert res.stderr.startswith("wicket: no task may be opened under break-glass on a der-gateway (DER-1)")
    res = run(lab, "bob", "break-glass", "--device", "DER-1", "--task", "der-commissioning", "--reason", "inverter fault",
              "--incident", "INC-8", step_up=True, expect=1)
    assert re.search(r"^wicket: break-glass s-[a-z2-9]{12} denied: \d+ check\(s\) failed:$", res.stderr, re.M)
    assert "  task_role: task 'der-commissioning' may not be used under break-glass" in res.stderr

    res = run(lab, "bob", "review", sid, "--note", "all fine", step_up=True, expect=1)
    assert res.stderr == f"wicket: reviewing break-glass needs the approver, soc or admin role at site {SITE}\n"
    res = run(lab, "alice", "review", sid, "--note", "pcap checked: reads only", step_up=True)
    assert res.stdout == f"Reviewed break-glass session {sid} (incident INC-7, bob).\n"
    assert api_session(lab, sid)["reviewed_by"] == "alice"


# ---- input checked before anything is spent ----


def test_bad_input_is_refused_before_asking_the_controller(lab):
    assert "is not a session ID" in run(lab, "bob", "status", "s-BAD", expect=2).stderr
    assert "is not a session ID" in run(lab, "bob", "config", "nope", "--qr", expect=2).stderr
    both = run(lab, "bob", "request", *DIAG, "--reason", "x" * 5, "--public-key", "k", "--public-key-file", "f", expect=2)
    assert "not both" in both.stderr
    res = run(lab, "bob", "request", *DIAG, "--reason", "x" * 5, "--public-key", "not-a-key", expect=2)
    assert "not a WireGuard key" in res.stderr
    assert [e for e in lab.ctl.events() if e["category"] == "session"] == []  # nothing was requested
