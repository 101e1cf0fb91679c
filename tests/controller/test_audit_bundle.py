"""Export bundles from a real controller database (SQLite and PostgreSQL), verified offline, and "who had
access to device X between t1 and t2" answered from the chain: from the database's rows and from a
bundle, agreeing with each other and with the sessions API."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from controller.audit import verify
from controller.audit.bundle import access_from_bundle, export_bundle, who_had_access
from controller.audit.chain import Checkpointer
from controller.db import session_factory
from controller.models import Event

from .helpers import iso
from .session_helpers import (
    DIAG,
    METER,
    RTU,
    TWO_PERSON,
    access,
    activate,
    approve,
    close,
    policy_files,
    request,
    revoke,
    world,
)

SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # what it tests does not depend on the database

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

METER_TASK = "meter-diagnostics"
METER_POLICY = """\
wicket_policy: 1
tasks:
  meter-diagnostics:
    title: DLMS reads from a concentrator (tests)
    protocols: [dlms]
    device_types: [meter-concentrator]
    roles: [engineer]
    duration: {default: 30m, max: 1h}
"""


def when(ctl) -> datetime:
    return datetime.fromtimestamp(ctl.t, UTC)


def rows(factory) -> list[Event]:
    with factory() as s:
        return list(s.scalars(select(Event).order_by(Event.seq)))


@pytest.fixture
def history(ctl):
    """Three sessions: A (erin, RTU-17, no approval, closed), B (eve, RTU-17, two approvers, revoked by
    sam) and C (erin, MC-1, closed), with checkpoints every 10 records; t0..t3 between them."""
    w = world(ctl, policy_files(**{"meter-test.yaml": METER_POLICY}))
    factory = session_factory(ctl.app.state.engine)
    cp = Checkpointer(factory, ctl.app.state.audit_signer, every=10, interval_s=3600)
    marks = {"t0": when(ctl)}
    a = request(ctl, w.erin, RTU, DIAG)["id"]
    ctl.advance(600)
    close(ctl, w.erin, a)
    cp.run_once(when(ctl))
    ctl.advance(60)
    marks["t1"] = when(ctl)
    b = request(ctl, w.eve, RTU, TWO_PERSON)["id"]
    approve(ctl, w.alex, b)
    approve(ctl, w.ana, b)  # the second approval activates nothing: eve activates
    activate(ctl, w.eve, b)
    ctl.advance(120)
    marks["t2"] = when(ctl)  # B is open here
    c = request(ctl, w.erin, METER, METER_TASK)["id"]
    ctl.advance(300)
    revoke(ctl, w.sam, b)
    close(ctl, w.erin, c)
    ctl.advance(60)
    marks["t3"] = when(ctl)
    cp.run_once(when(ctl))
    return {"w": w, "factory": factory, "cp": cp, "a": a, "b": b, "c": c, **marks}


def export(ctl, h, path, **kw):
    return export_bundle(h["factory"], path, signer=ctl.app.state.audit_signer, exported_by="root",
                         checkpoint_now=lambda: h["cp"].run_once(when(ctl), at_head=True), **kw)


def test_the_whole_chain_exports_and_verifies_with_the_controller_key(ctl, history, tmp_path):
    h = history
    everything = rows(h["factory"])
    summary = export(ctl, h, tmp_path / "all.tar.gz")
    assert summary.ok, summary.report.text()
    assert (summary.first_seq, summary.last_seq, summary.full, summary.redacted) == (1, len(everything), len(everything), 0)
    report = verify.verify_bundle(tmp_path / "all.tar.gz", [ctl.app.state.audit_signer.key_id], deep=True)
    assert report.ok and report.anchored_start and report.anchored_end, report.text()
    assert report.head_hash == everything[-1].hash
    assert [e["seq"] for e in verify.bundle_events(tmp_path / "all.tar.gz")] == [r.seq for r in everything]
    # the same records verify from the live rows too, with their stored leaf and prev_hash
    from controller.models import AuditCheckpoint, AuditKey

    with h["factory"]() as s:
        cps, keys = list(s.scalars(select(AuditCheckpoint))), list(s.scalars(select(AuditKey)))
    live = verify_records_live(everything, cps, keys)
    assert live.ok, live.text()


def verify_records_live(rows_, cps, keys):
    return verify.verify_records(rows_, cps, keys, expected_head=(rows_[-1].seq, rows_[-1].hash))


@SQLITE
def test_a_device_export_holds_its_records_and_redacts_the_rest(ctl, history, tmp_path):
    h = history
    path = tmp_path / "rtu.tar.gz"
    summary = export(ctl, h, path, device=RTU)
    assert summary.ok, summary.report.text()
    shown = {e["seq"]: e for e in verify.bundle_events(path)}
    everything = rows(h["factory"])
    inside = [r for r in everything if summary.first_seq <= r.seq <= summary.last_seq]
    rtu_sessions = {r.session_ref for r in everything if r.device_ref == RTU and r.session_ref}
    assert set(shown) == {r.seq for r in inside if r.device_ref == RTU or r.session_ref in rtu_sessions}
    assert {h["a"], h["b"]} <= rtu_sessions and h["c"] not in {e["session"] for e in shown.values()}
    assert summary.redacted == len(inside) - len(shown) > 0
    with tarfile.open(path) as tar:
        manifest = json.load(tar.extractfile(next(m for m in tar if m.name.endswith("manifest.json"))))
    assert manifest["scope"]["device"] == RTU and manifest["records"]["redacted"] == summary.redacted

    answer = who_had_access(verify.bundle_events(path), RTU, h["t0"], h["t3"])
    assert [(x["session"], x["engineer"], x["approvers"], x["end_reason"]) for x in answer] == [
        (h["a"], "erin", [], "closed_by_engineer"), (h["b"], "eve", ["alex", "ana"], "revoked")]
    assert answer[1]["ended_by"] == "sam" and all(x["seqs"] for x in answer)
    from_db = who_had_access(everything, RTU, h["t0"], h["t3"])
    assert _people(from_db) == _people(answer)
    api = access(ctl, h["w"].sam, RTU, h["t0"].timestamp(), h["t3"].timestamp())
    assert [(x["session_id"], x["user"], x["approved_by"]) for x in api] == _people(answer)


def _people(answer):
    return [(x["session"], x["engineer"], x["approvers"]) for x in answer]


@SQLITE
def test_a_window_that_starts_inside_a_session_carries_its_earlier_records(ctl, history, tmp_path):
    """B was opened before t2 and revoked after it: a device export from t2 still says who and who approved."""
    h = history
    path = tmp_path / "late.tar.gz"
    summary = export(ctl, h, path, device=RTU, since=h["t2"], until=h["t3"])
    assert summary.ok, summary.report.text()
    assert summary.carried_sessions == [h["b"]]
    report, answer = access_from_bundle(path, RTU, h["t2"], h["t3"], trusted_keys=[ctl.app.state.audit_signer.key_id])
    assert report.ok
    assert [(x["session"], x["engineer"], x["approvers"], x["end_reason"]) for x in answer] == [
        (h["b"], "eve", ["alex", "ana"], "revoked")]
    assert who_had_access(rows(h["factory"]), RTU, h["t2"], h["t3"]) == answer
    # a window in which RTU-17 has no record at all, B open throughout
    quiet = tmp_path / "quiet.tar.gz"
    summary = export(ctl, h, quiet, device=RTU, since=h["t2"], until=h["t2"] + timedelta(seconds=10))
    assert summary.ok and summary.carried_sessions == [h["b"]], summary.report.text()
    answer = who_had_access(verify.bundle_events(quiet), RTU, h["t2"], h["t2"] + timedelta(seconds=10))
    assert [(x["session"], x["approvers"], x["ended_at"]) for x in answer] == [(h["b"], ["alex", "ana"], None)]
    # before B: only A, which ended before t1
    assert [x["session"] for x in who_had_access(rows(h["factory"]), RTU, h["t0"], h["t1"])] == [h["a"]]


@SQLITE
def test_a_session_export_and_an_empty_one(ctl, history, tmp_path):
    h = history
    summary = export(ctl, h, tmp_path / "c.tar.gz", session=h["c"])
    assert summary.ok, summary.report.text()
    assert {e["session"] for e in verify.bundle_events(tmp_path / "c.tar.gz")} == {h["c"]}
    summary = export(ctl, h, tmp_path / "none.tar.gz", device="NO-SUCH-DEVICE")
    assert summary.ok and summary.records == 0, summary.report.text()


@SQLITE
def test_an_export_without_a_checkpoint_at_its_end_warns(ctl, history, tmp_path):
    h = history
    from controller import events
    from controller.db import transaction

    with transaction(h["factory"]) as s:  # a record after the last checkpoint
        events.record(s, category="account", type="test.event", result="success", actor="root")
    summary = export_bundle(h["factory"], tmp_path / "x.tar.gz", signer=ctl.app.state.audit_signer, exported_by="root")
    assert summary.ok and not summary.report.anchored_end
    assert any("no verified checkpoint covers" in w for w in summary.report.warnings)


def test_a_line_changed_in_the_database_shows_in_the_export(ctl, history, tmp_path):
    """Whether the changed record is shown in full or redacted, its link breaks, and the verifier names it."""
    h = history
    everything = rows(h["factory"])
    target = next(r for r in everything if r.type == "session.revoke")  # RTU-17's, between MC-1's records
    with h["factory"]() as s, s.begin():
        s.execute(update(Event).where(Event.seq == target.seq).values(line=target.line.replace('"sam"', '"mallory"')))
    for name, scope, shown in (("all", {}, True), ("meter", {"device": METER}, False)):
        summary = export(ctl, h, tmp_path / f"{name}.tar.gz", **scope)
        assert summary.first_seq <= target.seq <= summary.last_seq
        assert (target.seq in {e["seq"] for e in verify.bundle_events(summary.path)}) == shown
        assert not summary.ok, name
        first = summary.report.problems[0]
        assert (first.where, first.seq) == ("record", target.seq), summary.report.text()


@SQLITE
def test_the_readme_procedure_checks_a_bundle_by_hand(ctl, history, tmp_path):
    """README.txt's check.py, run by python3 in the unpacked folder: OK on the bundle, an error on a cut one."""
    h = history
    path = tmp_path / "rtu.tar.gz"
    summary = export(ctl, h, path, device=RTU, since=h["t1"])
    assert summary.first_seq > 1 and summary.redacted > 0  # a base hash to check, and leaves to chain through
    (tmp_path / "unpacked").mkdir()
    subprocess.run(["tar", "xzf", path], cwd=tmp_path / "unpacked", check=True, timeout=60)  # as README.txt says
    folder = tmp_path / "unpacked" / f"wicket-audit-{summary.first_seq}-{summary.last_seq}"
    readme = (folder / "README.txt").read_text()
    script = readme.split("# --- check.py ---\n")[1].split("# --- end of check.py ---")[0]
    (folder / "check.py").write_text(script)
    done = subprocess.run([sys.executable, "check.py"], cwd=folder, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("OK"), done.stderr
    log = (folder / "records.log").read_bytes()
    (folder / "records.log").write_bytes(log[: log.rindex(b"\n", 0, len(log) - 1) + 1])  # the last record gone
    done = subprocess.run([sys.executable, "check.py"], cwd=folder, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "end early" in done.stderr
    listed = json.loads((folder / "manifest.json").read_text())["files"]
    check = "".join(f"{sha}  {name}\n" for name, sha in listed.items())
    done = subprocess.run(["sha256sum", "-c"], cwd=folder, input=check, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "records.log: FAILED" in done.stdout


def test_who_had_access_reads_the_lifecycle(ctl):
    """From hand-made records: an activation the node could not open is no access; the window cuts."""
    def ev(seq, type_, t, sid, **body):
        return {"seq": seq, "type": type_, "time": f"2026-11-26T{t}:00.000000Z", "result": body.pop("result", "success"),
                "actor": body.pop("actor", "erin"), "reason": body.pop("reason", None), "session": sid,
                "device": "RTU-9", "subject": sid, "body": {"session_id": sid, "user": "erin", "device": "RTU-9", **body}}

    records = [
        ev(1, "session.request", "08:00", "s1"), ev(2, "session.activate", "08:01", "s1"),
        ev(3, "session.activate", "08:01", "s1", result="failure", actor="agent:edge", reason="lane_failed"),
        ev(4, "session.request", "09:00", "s2"), ev(5, "session.approve", "09:01", "s2", actor="alex"),
        ev(6, "session.activate", "09:02", "s2"), ev(7, "session.open", "09:02", "s2", actor="agent:edge"),
        ev(8, "session.expire", "10:02", "s2", actor="system", reason="expired"),
        ev(9, "session.request", "11:00", "s3"), ev(10, "session.activate", "11:00", "s3"),
        ev(11, "session.open", "11:00", "s3", actor="agent:edge"),
    ]
    window = [(x["session"], x["ended_at"], x["end_reason"]) for x in who_had_access(records, "RTU-9", "2026-11-26T08:00:00Z",
                                                                                       "2026-11-26T12:00:00Z")]
    assert window == [("s2", "2026-11-26T10:02:00.000000Z", "expired"), ("s3", None, None)]
    assert [x["session"] for x in who_had_access(records, "RTU-9", "2026-11-26T10:30:00Z", "2026-11-26T10:59:00Z")] == []
    assert [x["seqs"] for x in who_had_access(records, "RTU-9", None, "2026-11-26T09:30:00Z")] == [[4, 5, 6, 7, 8]]
    assert who_had_access(records, "RTU-1") == []
    assert iso(datetime(2026, 1, 1, tzinfo=UTC))  # helpers import used by the suite's style
