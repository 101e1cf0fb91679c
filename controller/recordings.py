"""Payload recordings (pcap) agents deliver over the link, stored under `<data_dir>/recordings/`.

A recording arrives after its lane's evidence, in chunks from offset 0. It is kept only if its SHA-256
is the one in the evidence the agent signed; then it is listed (`session_recordings`), its receipt is
an audit record (`session.recording`), and the SOC may download it. A chunk out of order drops the
partial file: the agent starts again from 0 on its next connection.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from nodeagent.wire import RecordingChunk

from . import events
from .db import transaction
from .models import LaneEvidenceRecord, SessionRecording

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


class RecordingRefused(ValueError):
    pass


class RecordingStore:
    def __init__(self, factory: sessionmaker[Session], root: Path):
        self.factory, self.root = factory, root
        self.partial = root / ".partial"

    def receive(self, node: str, chunk: RecordingChunk) -> bool | None:
        """Take one chunk. None: more to come; True: stored (or stored before); RecordingRefused: why not."""
        self.partial.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.partial / f"{_SAFE.sub('_', node)}--{_SAFE.sub('_', chunk.ident)}.pcap"
        if chunk.offset == 0:
            if self._stored(node, chunk.ident):
                tmp.unlink(missing_ok=True)
                return True
            tmp.unlink(missing_ok=True)
        have = tmp.stat().st_size if tmp.exists() else 0
        if chunk.offset != have:
            tmp.unlink(missing_ok=True)
            raise RecordingRefused(f"chunk at offset {chunk.offset}, expected {have}: send the recording again from 0")
        try:
            data = base64.b64decode(chunk.data, validate=True)
        except (binascii.Error, ValueError):
            tmp.unlink(missing_ok=True)
            raise RecordingRefused("chunk is not base64") from None
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, data)
            if chunk.last:
                os.fsync(fd)
        finally:
            os.close(fd)
        if not chunk.last:
            return None
        return self._finish(node, chunk, tmp)

    def _stored(self, node: str, ident: str) -> bool:
        with self.factory() as s:
            return s.scalar(select(SessionRecording.id).where(SessionRecording.node == node,
                                                              SessionRecording.ident == ident)) is not None

    def _finish(self, node: str, chunk: RecordingChunk, tmp: Path) -> bool:
        digest = _sha256(tmp)
        now = datetime.now(UTC)
        with transaction(self.factory) as s:
            ev = s.scalar(select(LaneEvidenceRecord).where(LaneEvidenceRecord.node == node, LaneEvidenceRecord.ident == chunk.ident))
            if ev is None:
                tmp.unlink(missing_ok=True)
                raise RecordingRefused(f"no evidence {chunk.ident} from node {node}: the evidence goes first")
            signed = (ev.body.get("recording") or {}).get("sha256")
            mismatch = digest != signed or (chunk.sha256 and chunk.sha256 != digest)
            if mismatch:
                tmp.unlink(missing_ok=True)
                events.record(s, at=now, category="evidence", type="session.recording", result="failure",
                              actor=events.agent_actor(node), subject=ev.session_id, reason="hash_mismatch",
                              session_id=ev.session_id, ident=chunk.ident, received_sha256=digest, signed_sha256=signed)
        if mismatch:  # raised after the commit, so the refusal's record stays
            raise RecordingRefused(f"the recording's SHA-256 {digest} is not the {signed} its evidence was signed with")
        with transaction(self.factory) as s:
            ev = s.scalar(select(LaneEvidenceRecord).where(LaneEvidenceRecord.node == node, LaneEvidenceRecord.ident == chunk.ident))
            final = self.root / _SAFE.sub("_", ev.session_id or "orphan") / f"{_SAFE.sub('_', node)}--{_SAFE.sub('_', chunk.ident)}.pcap"
            final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.replace(tmp, final)
            try:
                with s.begin_nested():
                    s.add(SessionRecording(node=node, ident=chunk.ident, session_id=ev.session_id, sha256=digest,
                                           size=final.stat().st_size, path=str(final.relative_to(self.root)),
                                           truncated=bool((ev.body.get("recording") or {}).get("truncated")), received_at=now))
            except IntegrityError:
                return True  # another replica stored it in the same moment
            events.record(s, at=now, category="evidence", type="session.recording", result="success",
                          actor=events.agent_actor(node), subject=ev.session_id, session_id=ev.session_id,
                          device=ev.body.get("device_id"), ident=chunk.ident, sha256=digest, size=final.stat().st_size,
                          truncated=bool((ev.body.get("recording") or {}).get("truncated")))
        return True

    def file(self, rec: SessionRecording) -> Path:
        """Where a recording's file is: under this replica's recordings directory (a shared mount when
        there are several replicas, like the keys)."""
        return self.root / rec.path

    def find(self, session_id: str) -> list[SessionRecording]:
        with self.factory() as s:
            return list(s.scalars(select(SessionRecording).where(SessionRecording.session_id == session_id)
                                  .order_by(SessionRecording.id)))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
