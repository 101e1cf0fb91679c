"""What the agent keeps on disk (0700 directory, 0600 files), so a restart — also after kill -9 — knows
what it was enforcing, when each lane ends, and which evidence is not yet delivered.

Layout under the state directory:
  desired.json            the last desired state applied (highest generation)
  lanes/<session>.json    one record per open lane: its spec, its monotonic deadline, when it opened
  closed/<session>.json   sessions closed on this node before their end (so a re-sent state cannot reopen them)
  removed/<session>.json  lanes the controller removed, with their revision: only a newer revision opens again
                          (a stale or restored desired state cannot bring back a revoked lane)
  flows/<lane>.jsonl      connections that ended while the lane lived (conntrack DESTROY events)
  evidence/<id>.json      lane evidence waiting to be collected
  reports/<id>.json       device reports (baseline breaches, DNS health) waiting for the controller's receipt;
                          at most MAX_SPOOLED_REPORTS, the oldest dropped first (`ReportSpool`)
Every file is written to a temporary name and renamed: a crash leaves the old or the new file. Evidence
and ended sessions are also fsynced.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .wire import DesiredNodeState, DeviceReport, LaneEvidence, LaneSpec

log = logging.getLogger("wicket.agent.state")
# A report a minute is 16 hours of reports: a controller away longer than that loses the oldest.
MAX_SPOOLED_REPORTS = 1000


@dataclass
class LaneRecord:
    session_id: str
    name: str
    spec: dict
    opened_at: float  # wall clock
    deadline: float  # CLOCK_BOOTTIME seconds
    boot_id: str
    end_time: float  # the spec's end time the deadline was computed from (wall seconds)
    mark_id: int
    slot: int | None
    node_public_key: str | None
    backend: str
    handshakes_observed: int = 0
    last_handshake_seen: float | None = None
    flow_overrun: bool = False
    opened: bool = False  # its rules were committed (before that the record is an intent)
    evidence: str | None = None  # id of its evidence record, once written
    agent_gaps: list | None = None  # [[from_wall, to_wall], ...] when the agent was not running

    @property
    def lane(self) -> LaneSpec:
        # Parsed once: reconcile looks at every lane's spec on every pass.
        cached = self.__dict__.get("_lane")
        if cached is None or cached[0] is not self.spec:
            cached = (self.spec, LaneSpec.model_validate(self.spec))
            self.__dict__["_lane"] = cached
        return cached[1]


class StateDir:
    def __init__(self, path: str | os.PathLike):
        self.root = Path(path)
        self._closed: dict[str, float] | None = None
        self._removed: dict[str, tuple[int, float]] | None = None
        for sub in ("", "lanes", "closed", "removed", "flows", "evidence", "recordings", "reports"):
            d = self.root / sub
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        self.reports = ReportSpool(self.root / "reports")

    # ---- desired state ----

    def load_desired(self) -> DesiredNodeState | None:
        p = self.root / "desired.json"
        if not p.exists():
            return None
        return DesiredNodeState.model_validate_json(p.read_text())

    def save_desired(self, desired: DesiredNodeState, raw: str | None = None) -> None:
        write_atomic(self.root / "desired.json", raw if raw is not None else desired.model_dump_json())

    # ---- lanes ----

    def lane_records(self) -> dict[str, LaneRecord]:
        out = {}
        for p in (self.root / "lanes").glob("*.json"):
            try:
                rec = LaneRecord(**json.loads(p.read_text()))
            except (ValueError, TypeError):
                continue  # a record we cannot read: the lane is then an orphan and gets swept
            out[rec.session_id] = rec
        return out

    def save_lane(self, rec: LaneRecord) -> None:
        write_atomic(self.root / "lanes" / f"{rec.session_id}.json", json.dumps(asdict(rec)))  # asdict skips the cache

    def drop_lane(self, session_id: str) -> None:
        _unlink(self.root / "lanes" / f"{session_id}.json")

    # ---- local closes ----

    def closed(self) -> dict[str, float]:
        """Sessions that ended on this node -> their end (wall seconds). Cached: read once per process."""
        if self._closed is None:
            self._closed = {}
            for p in (self.root / "closed").glob("*.json"):
                try:
                    self._closed[p.stem] = float(json.loads(p.read_text())["until"])
                except (ValueError, KeyError):
                    continue
        return self._closed

    def mark_closed(self, session_id: str, until_wall: float) -> None:
        write_atomic(self.root / "closed" / f"{session_id}.json", json.dumps({"until": until_wall}), durable=True)
        self.closed()[session_id] = until_wall

    def forget_closed(self, session_id: str) -> None:
        _unlink(self.root / "closed" / f"{session_id}.json")
        self.closed().pop(session_id, None)

    # ---- lanes the controller removed ----

    def removed(self) -> dict[str, tuple[int, float]]:
        """Session → (the revision removed, when, wall seconds). Cached: read once per process."""
        if self._removed is None:
            self._removed = {}
            for p in (self.root / "removed").glob("*.json"):
                try:
                    data = json.loads(p.read_text())
                    self._removed[p.stem] = (int(data["revision"]), float(data["at"]))
                except (ValueError, KeyError, TypeError):
                    continue
        return self._removed

    def mark_removed(self, session_id: str, revision: int, at_wall: float) -> None:
        write_atomic(self.root / "removed" / f"{session_id}.json", json.dumps({"revision": revision, "at": at_wall}), durable=True)
        self.removed()[session_id] = (revision, at_wall)

    def forget_removed(self, session_id: str) -> None:
        _unlink(self.root / "removed" / f"{session_id}.json")
        self.removed().pop(session_id, None)

    # ---- flows that ended during a lane ----

    def append_flow(self, lane: str, record: dict) -> None:
        path = self.root / "flows" / f"{lane}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)

    def read_flows(self, lane: str) -> list[dict]:
        path = self.root / "flows" / f"{lane}.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line torn by a crash
        return out

    def drop_flows(self, lane: str) -> None:
        _unlink(self.root / "flows" / f"{lane}.jsonl")

    # ---- evidence ----

    def evidence_ident(self, evidence: LaneEvidence) -> str:
        base = f"{evidence.session_id or 'orphan'}-{int(evidence.closed_at.timestamp() * 1000)}-{evidence.lane}"
        ident, n = base, 1
        while self.has_evidence(ident):
            n += 1
            ident = f"{base}-{n}"
        return ident

    def spool(self, evidence: LaneEvidence, ident: str | None = None) -> str:
        ident = ident or self.evidence_ident(evidence)
        write_atomic(self.root / "evidence" / f"{ident}.json", evidence.model_dump_json(indent=1), durable=True)
        return ident

    def has_evidence(self, ident: str) -> bool:
        return (self.root / "evidence" / f"{ident}.json").exists()

    def pending_evidence(self) -> dict[str, LaneEvidence]:
        out = {}
        for p in sorted((self.root / "evidence").glob("*.json")):
            out[p.stem] = LaneEvidence.model_validate_json(p.read_text())
        return out

    def ack_evidence(self, ident: str) -> bool:
        if "/" in ident or ident.startswith("."):
            return False
        p = self.root / "evidence" / f"{ident}.json"
        if not p.exists():
            return False
        p.unlink()
        return True

    # ---- device reports ----

    def spool_report(self, report: DeviceReport) -> str:
        return self.reports.spool(report)

    def pending_reports(self) -> dict[str, DeviceReport]:
        return self.reports.pending()

    def ack_report(self, ident: str) -> bool:
        return self.reports.ack(ident)


class ReportSpool:
    """Device reports waiting for the controller's receipt, one durable file each, named so that name order is
    the order they were made in. The agent's loop writes them; the link thread reads them and deletes each one
    the controller receipts (deleting needs no lock: a file is whole from its rename until its unlink).

    The spool is capped at `limit` files: a controller away for long costs the oldest reports, with an ERROR
    line saying how many. Their breaches are then in no record of the controller; the agent's journal has the
    line."""

    def __init__(self, path: Path, limit: int = MAX_SPOOLED_REPORTS):
        self.path, self.limit = Path(path), limit

    def spool(self, report: DeviceReport) -> str:
        """Write `report` durably; its ident ("report-<window end, ms>", with "-2"… if that is taken)."""
        base = f"report-{int(report.window_end.timestamp() * 1000):013d}"
        ident, n = base, 1
        while (self.path / f"{ident}.json").exists():
            n += 1
            ident = f"{base}-{n}"
        write_atomic(self.path / f"{ident}.json", report.model_dump_json(), durable=True)
        self._cap()
        return ident

    def idents(self) -> list[str]:
        """The spooled reports' idents, oldest first."""
        try:
            return sorted((p.stem for p in self.path.glob("*.json")), key=_report_order)
        except OSError:
            return []

    def load(self, ident: str) -> DeviceReport:
        """One report; OSError when it is gone (receipted meanwhile), ValueError when it cannot be read."""
        return DeviceReport.model_validate_json((self.path / f"{ident}.json").read_text())

    def pending(self) -> dict[str, DeviceReport]:
        out = {}
        for ident in self.idents():
            try:
                out[ident] = self.load(ident)
            except (OSError, ValueError):
                continue
        return out

    def ack(self, ident: str) -> bool:
        if not _REPORT_IDENT.fullmatch(ident):
            return False  # the controller names only what it was sent; anything else is no file of ours
        try:
            (self.path / f"{ident}.json").unlink()
        except FileNotFoundError:
            return False
        return True

    def _cap(self) -> None:
        idents = self.idents()
        extra = len(idents) - self.limit
        if extra <= 0:
            return
        for ident in idents[:extra]:
            _unlink(self.path / f"{ident}.json")
        log.error("device reports: the spool holds more than %d reports (is the controller away?); dropped the %d oldest, "
                  "from %s to %s: their breaches and DNS changes will not reach the audit chain", self.limit, extra,
                  idents[0], idents[extra - 1])


_REPORT_IDENT = re.compile(r"report-[0-9]{13,}(?:-[0-9]+)?")


def _report_order(ident: str) -> tuple[str, int]:
    """Sort key: report-<ms> before report-<ms>-2 before report-<ms>-10."""
    base, _, n = ident.partition("-")[2].partition("-")
    return (base, int(n) if n.isdigit() else 1)


def write_atomic(path: Path, text: str, durable: bool = False) -> None:
    """Atomic replace. A rename survives the process being killed; `durable` also survives power loss
    (evidence and ended sessions need that; lane records and the desired state are rebuilt after a boot)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
