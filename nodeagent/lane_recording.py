"""Payload recording of lanes whose task asks for it (`recording: payload`, always for break-glass).

While a lane lives, its packets go to `<state>/recordings/live/<lane>.pcap` (`nodeagent.recording`). When it
ends, the recorder stops before the lane's interface goes, its SHA-256 and counts go into the lane's
signed evidence, and the file is renamed after the evidence record (`<ident>.pcap`); the link uploads it
once the evidence is receipted, and deletes it when the controller has stored it. A recording that
could not run is not silent: the evidence says why.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime
from pathlib import Path

from .recording import Recorder, RecordingError
from .wire import LaneSpec, RecordingInfo

log = logging.getLogger("wicket.agent.recording")


class Recorders:
    def __init__(self, directory: Path, cap_bytes: int):
        self.dir, self.cap = Path(directory), cap_bytes
        self._running: dict[str, Recorder] = {}
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()

    def ensure(self, name: str, spec: LaneSpec, *, resume: bool = False) -> str | None:
        """Record lane `name` if its spec asks for payload and it is not recorded yet; a note if it cannot be."""
        if spec.recording != "payload":
            return None
        with self._lock:
            if name in self._running:
                return None
            path = self.dir / "live" / f"{name}.pcap"
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            resume = resume and path.exists()
            rec = Recorder(name, path, spec.recording_cap_bytes or self.cap, resume=resume,
                           prior=_load_prior(path) if resume else None)
            try:
                rec.start()
            except (RecordingError, OSError) as exc:
                self._errors[name] = f"the payload recording could not start: {exc}"
                log.error("lane %s: %s", name, self._errors[name])
                return self._errors[name]
            self._running[name] = rec
            self._errors.pop(name, None)
        return None

    def stop(self, name: str, spec: LaneSpec | None) -> RecordingInfo | None:
        """Stop lane `name`'s recording; what the evidence says about it (None: no recording was asked)."""
        with self._lock:
            rec = self._running.pop(name, None)
            error = self._errors.pop(name, None)
        if rec is None:
            if spec is None or spec.recording != "payload":
                return None
            return RecordingInfo(error=error or "no recording was running for this lane (the agent could not start it)")
        r = rec.stop()
        notes = None  # the recorder's own notes (e.g. "resumed after N packets") are in the agent's log
        if r.end_reason not in ("stopped", "interface gone"):
            notes = f"the recorder ended: {r.end_reason}" + (f" ({'; '.join(r.notes)})" if r.notes else "")
        return RecordingInfo(sha256=r.sha256, size=r.size, packets=r.packets, bytes=r.bytes,
                             dropped_by_cap=r.dropped_by_cap, kernel_drops=r.kernel_drops, truncated=r.truncated,
                             linktype=r.linktype, started_at=r.started_at,
                             stopped_at=r.stopped_at or datetime.now(UTC), error=notes[:500] if notes else None)

    def file_as(self, name: str, ident: str) -> None:
        """The lane's evidence is `ident`: its recording takes that name, which the link uploads by."""
        src = self.dir / "live" / f"{name}.pcap"
        if src.exists():
            src.replace(self.dir / f"{ident}.pcap")
        _prior_path(src).unlink(missing_ok=True)

    def stop_all(self) -> None:
        """The agent stops; its lanes live on. Each file stays, with its counts beside it (drops, whether
        the cap was reached, when it began: the pcap cannot hold them), and the next start resumes it."""
        with self._lock:
            running, self._running = self._running, {}
        for name, rec in running.items():
            result = rec.stop()
            try:
                _prior_path(self.dir / "live" / f"{name}.pcap").write_text(json.dumps(result.to_dict()))
            except OSError as exc:
                log.warning("lane %s: could not keep the recording's counts: %s", name, exc)



def _prior_path(pcap: Path) -> Path:
    return pcap.with_suffix(".counts.json")


def _load_prior(pcap: Path) -> dict | None:
    try:
        return json.loads(_prior_path(pcap).read_text())
    except (OSError, ValueError):
        return None
