"""The agent's spool of device reports (`nodeagent.state.ReportSpool`): durable files in name order, deleted by
their receipt, capped with the oldest dropped and said so. Delivery over the link is in
tests/controller/test_device_reports.py (the agent's real link client against a real controller)."""

from __future__ import annotations

import logging
import os
import stat
from datetime import UTC, datetime, timedelta

from nodeagent.state import ReportSpool, StateDir
from nodeagent.wire import Breach, DeviceReport

T0 = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def report(minute: int = 0, packets: int = 1) -> DeviceReport:
    end = T0 + timedelta(minutes=minute)
    return DeviceReport(node_id="rtr-1", window_start=end - timedelta(minutes=1), window_end=end, devices=1,
                        breaches=[Breach(asset_id="rtu-1", source="192.0.2.10", destination="203.0.113.9", proto="tcp",
                                         port=443, packets=packets)])


def test_a_report_is_spooled_private_and_whole_and_read_back_in_order(tmp_path):
    state = StateDir(tmp_path)
    later, first, again = state.spool_report(report(1)), state.spool_report(report(0)), state.spool_report(report(1, 2))
    assert (first, later, again) == ("report-1893553445678", "report-1893553505678", "report-1893553505678-2")
    assert stat.S_IMODE(os.stat(tmp_path / "reports").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "reports" / f"{first}.json").st_mode) == 0o600
    pending = state.pending_reports()
    assert list(pending) == [first, later, again]
    assert pending[again] == report(1, 2)
    assert not [p for p in (tmp_path / "reports").iterdir() if p.name.startswith(".")]


def test_a_receipt_deletes_its_report_and_nothing_else(tmp_path):
    state = StateDir(tmp_path)
    ident = state.spool_report(report())
    (tmp_path / "evidence" / "report-1893553445678.json").write_text("{}")
    for foreign in ("../evidence/report-1893553445678", "report-", "s-0-1-wkab1abcdefghij", ".report-1893553445678", ""):
        assert not state.ack_report(foreign)
    assert (tmp_path / "evidence" / "report-1893553445678.json").exists()
    assert state.ack_report(ident) and state.pending_reports() == {}
    assert not state.ack_report(ident), "a second receipt finds nothing"


def test_an_unreadable_report_is_skipped_not_fatal(tmp_path):
    state = StateDir(tmp_path)
    (tmp_path / "reports" / "report-0000000000001.json").write_text("{torn")
    ident = state.spool_report(report())
    assert list(state.pending_reports()) == [ident]


def test_the_spool_keeps_the_newest_and_says_how_many_it_dropped(tmp_path, caplog):
    spool = ReportSpool(tmp_path, limit=3)
    idents = [spool.spool(report(m)) for m in range(3)]
    assert not caplog.records
    with caplog.at_level(logging.ERROR, logger="wicket.agent.state"):
        idents += [spool.spool(report(m)) for m in (3, 4)]
    assert spool.idents() == idents[2:]
    dropped = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(dropped) == 2 and all("dropped the 1 oldest" in m for m in dropped)
    assert idents[0] in dropped[0] and idents[1] in dropped[1]
