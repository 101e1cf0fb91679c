"""The audit chain: every auditable event, appended in order, hash-chained, with signed checkpoints.

A record is the exact text of one JSON object (`record_line`); what is hashed is that text, so anyone
can check a record without re-serialising it:

    leaf_k = SHA-256(line_k)            hash_k = SHA-256(hash_{k-1} ‖ leaf_k)            hash_0 = 32 zero bytes

Chaining leaves (not whole lines) lets an export leave out records that are not asked for — it keeps
their leaf — and still prove every record it shows is in the chain (`controller.audit.bundle`).

`controller.events.record` queues a record in the caller's transaction; the transaction seals its
records when it commits (`install`): it takes the head row's lock, numbers them, hashes them and
inserts them. A record that cannot be written makes the commit fail, so the action it records does not
happen (`AuditWriteError`).
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import event as sa_event
from sqlalchemy import insert, select, text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import AuditUnavailable
from ..models import AuditCheckpoint, AuditHead, AuditKey, Event
from .verify import GENESIS, key_id_of  # one definition, in the module an assessor reads

log = logging.getLogger("wicket.controller.audit")

FORMAT_VERSION = 1
PENDING = "wicket_audit_pending"
SEALED = "wicket_audit_sealed"


class AuditWriteError(AuditUnavailable):
    """The audit record of an action could not be written; the action was not done."""


# ---- records -------------------------------------------------------------------------------------


def record_line(*, seq: int, at: datetime, clock: str, category: str, type: str, result: str, actor: str | None,
                actor_id: int | None, subject: str | None, source: str | None, reason: str | None,
                session: str | None, device: str | None, body: dict) -> str:
    """The exact text of one record (format version 1; see docs/audit.md)."""
    obj = {"v": FORMAT_VERSION, "seq": seq, "time": rfc3339(at), "clock": clock, "category": category, "type": type,
           "result": result, "actor": actor, "actor_id": actor_id, "subject": subject, "source": source,
           "reason": reason, "session": session, "device": device, "body": body}
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def leaf_hash(line: str) -> str:
    return hashlib.sha256(line.encode()).hexdigest()


def chain_hash(prev: str, leaf: str) -> str:
    return hashlib.sha256(bytes.fromhex(prev) + bytes.fromhex(leaf)).hexdigest()


def rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def seal_rows(rows: list[Event], first_seq: int, prev: str) -> str:
    """Number, render and hash `rows` from `first_seq` after `prev`; returns the new head hash."""
    for i, row in enumerate(rows):
        row.seq = first_seq + i
        row.line = record_line(seq=row.seq, at=row.at, clock=row.clock, category=row.category, type=row.type,
                               result=row.result, actor=row.actor, actor_id=row.actor_id, subject=row.subject,
                               source=row.source, reason=row.reason, session=row.session_ref, device=row.device_ref,
                               body=row.body)
        row.leaf = leaf_hash(row.line)
        row.prev_hash = prev
        row.hash = prev = chain_hash(prev, row.leaf)
    return prev


def queue(session: Session, row: Event) -> None:
    """Queue a record in this transaction; it is sealed when the transaction commits."""
    session.info.setdefault(PENDING, []).append(row)


_TAKE = text("UPDATE audit_head SET seq = seq + :n WHERE id = 1 RETURNING seq, hash")
_MOVE = text("UPDATE audit_head SET hash = :hash WHERE id = 1")
_COLUMNS = ("seq", "at", "category", "type", "result", "actor_id", "actor", "subject", "source", "reason", "body", "clock",
            "session_ref", "device_ref", "line", "leaf", "prev_hash", "hash")


def _seal_pending(session: Session) -> None:
    pending: list[Event] = session.info.pop(PENDING, None) or []
    if not pending:
        return
    try:
        # The UPDATE takes the head's row lock (PostgreSQL) or the write lock (SQLite) before anything is
        # read: two transactions cannot both take the same sequence numbers. Core statements, not the ORM:
        # this runs in every audited transaction.
        last, prev = session.execute(_TAKE, {"n": len(pending)}).one()
        head = seal_rows(pending, last - len(pending) + 1, prev)
        session.execute(_MOVE, {"hash": head})
        session.execute(insert(Event), [{c: getattr(row, c) for c in _COLUMNS} for row in pending])
    except SQLAlchemyError as exc:
        health.failed(exc)
        raise AuditWriteError(f"the audit record could not be written ({_brief(exc)}); the action was not done") from exc
    session.info[SEALED] = len(pending)


def commit_failed(session: Session, exc: Exception) -> AuditWriteError | None:
    """A commit failed (a full disk, a lost server): if it carried audit records, that is an audit write
    failure — raised as one and counted — rather than a bare database error."""
    if not session.info.pop(SEALED, None) or not isinstance(exc, SQLAlchemyError):
        return None
    health.failed(exc)
    return AuditWriteError(f"the audit record could not be written ({_brief(exc)}); the action was not done")


def _drop_pending(session: Session, *_args) -> None:
    session.info.pop(PENDING, None)


def _committed(session: Session) -> None:
    if session.info.pop(SEALED, None):
        health.ok()


def install() -> None:
    """Seal queued records in every ORM session at commit. Idempotent."""
    if not sa_event.contains(Session, "before_commit", _seal_pending):
        sa_event.listen(Session, "before_commit", _seal_pending)
        sa_event.listen(Session, "after_rollback", _drop_pending)
        sa_event.listen(Session, "after_commit", _committed)


def _brief(exc: Exception) -> str:
    text = str(getattr(exc, "orig", None) or exc).splitlines()[0]
    return text[:200]


class _Health:
    """Whether the last audit write worked: an operator alert when it did not (IEC 62443 SR 2.10)."""

    def __init__(self) -> None:
        self.failures = 0
        self.last_error: str | None = None
        self.last_failure_at: datetime | None = None
        self.last_ok_at: datetime | None = None

    @property
    def failing(self) -> bool:
        """The newest audit write failed (no record has been written since)."""
        return self.last_failure_at is not None and (self.last_ok_at is None or self.last_ok_at < self.last_failure_at)

    def failed(self, exc: Exception) -> None:
        self.failures += 1
        self.last_error, self.last_failure_at = _brief(exc), datetime.now(UTC)
        log.error("AUDIT WRITE FAILED: %s — the action that caused it was refused", self.last_error)

    def ok(self) -> None:
        self.last_ok_at = datetime.now(UTC)


health = _Health()


# ---- the clock's synchronisation, stamped in every record ---------------------------------------


class _Timex(ctypes.Structure):
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                ("_rest", ctypes.c_long * 30)]


_STA_UNSYNC, _TIME_ERROR = 0x0040, 5
_clock_cache: tuple[float, str] = (0.0, "unknown")


def clock_state() -> str:
    """"synced" when the kernel says an NTP/PTP daemon disciplines the clock, "unsynced" when it says not,
    "unknown" when it cannot be asked. Asked at most every 10 s."""
    global _clock_cache
    checked, state = _clock_cache
    if time.monotonic() - checked < 10:
        return state
    try:
        tx = _Timex()
        rc = ctypes.CDLL(None, use_errno=True).adjtimex(ctypes.byref(tx))
        state = "unknown" if rc < 0 else ("unsynced" if rc == _TIME_ERROR or tx.status & _STA_UNSYNC else "synced")
    except (OSError, AttributeError):
        state = "unknown"
    _clock_cache = (time.monotonic(), state)
    return state


# ---- signing and checkpoints ---------------------------------------------------------------------


@dataclass(frozen=True)
class AuditSigner:
    """The controller's Ed25519 key, as the audit chain uses it."""

    private_key: Ed25519PrivateKey

    @property
    def public_raw(self) -> bytes:
        return self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(self.public_raw).decode()

    @property
    def key_id(self) -> str:
        return key_id_of(self.public_raw)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)


def checkpoint_statement(tree_size: int, head_hash: str, at: datetime, kid: str) -> str:
    return json.dumps({"v": FORMAT_VERSION, "kind": "wicket.audit.checkpoint", "tree_size": tree_size,
                       "head_hash": head_hash, "time": rfc3339(at), "key_id": kid}, sort_keys=True, separators=(",", ":"))


def register_key(factory: sessionmaker[Session], signer: AuditSigner) -> None:
    """List the signing key in `audit_keys` (bundles carry every key that ever signed)."""
    with factory() as s, s.begin():
        if s.get(AuditKey, signer.key_id) is None:
            try:
                with s.begin_nested():
                    s.add(AuditKey(key_id=signer.key_id, public_key=signer.public_key_b64, created_at=datetime.now(UTC)))
            except IntegrityError:
                pass  # another replica listed it at the same moment


class Checkpointer:
    """Signs a checkpoint at every multiple of `every` records, and at the head every `interval_s` seconds
    when it moved. Several replicas may run one: a checkpoint of a size that exists is not made twice."""

    def __init__(self, factory: sessionmaker[Session], signer: AuditSigner, *, every: int = 1000, interval_s: float = 60):
        self.factory, self.signer, self.every, self.interval_s = factory, signer, every, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self, now: datetime | None = None, *, at_head: bool = False) -> list[int]:
        """Make the checkpoints that are due; `at_head` forces one at the head. Returns their sizes."""
        now = now or datetime.now(UTC)
        with self.factory() as s:
            head = s.scalar(select(AuditHead.seq).where(AuditHead.id == 1)) or 0
            last = s.execute(select(AuditCheckpoint.tree_size, AuditCheckpoint.created_at)
                             .order_by(AuditCheckpoint.tree_size.desc()).limit(1)).first()
        done = last.tree_size if last else 0
        sizes = list(range((done // self.every + 1) * self.every, head + 1, self.every))
        stale = last is None or (now - last.created_at).total_seconds() >= self.interval_s
        if head > done and (at_head or stale) and head not in sizes:
            sizes.append(head)
        return [size for size in sizes if self._make(size, now)]

    def _make(self, size: int, now: datetime) -> bool:
        with self.factory() as s, s.begin():
            head_hash = s.scalar(select(Event.hash).where(Event.seq == size))
            if head_hash is None:
                return False
            statement = checkpoint_statement(size, head_hash, now, self.signer.key_id)
            sig = base64.b64encode(self.signer.sign(statement.encode())).decode()
            try:
                with s.begin_nested():
                    s.add(AuditCheckpoint(tree_size=size, head_hash=head_hash, statement=statement, signature=sig,
                                          key_id=self.signer.key_id, created_at=now))
            except IntegrityError:
                return False
        return True

    def start(self, period_s: float = 1.0) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(period_s,), name="audit-checkpoints", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            try:
                self.run_once()
            except Exception:
                log.exception("audit checkpoint failed; retrying")


def head(factory: sessionmaker[Session]) -> tuple[int, str]:
    with factory() as s:
        row = s.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1)).first()
        return (row.seq, row.hash) if row else (0, GENESIS)
