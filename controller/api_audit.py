"""Audit API (read-only; admin or soc): the chain's head, checkpoints and keys, a live
check of the chain, export bundles for offline verification, "who had access to device X", SIEM sink
health, and sessions' payload recordings."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Path, Query, Request
from fastapi.responses import FileResponse
from sqlalchemy import select

from . import events
from .audit import bundle, chain, shipper, verify
from .db import transaction
from .deps import AuditReader, AuthDep, CurrentPrincipal, Source
from .errors import Invalid, NotFound
from .identifiers import ASSET_ID
from .models import AuditCheckpoint, AuditKey, Event
from .schemas import DB_INT_MAX, ErrorOut

SESSION_ID = r"^s-[a-z2-9]{12}$"
_ERRORS = {401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 404: {"model": ErrorOut}, 422: {"model": ErrorOut}}
router = APIRouter(prefix="/api/v1", responses=_ERRORS, tags=["audit"])




@router.get("/audit/head", summary="The chain's head and its newest checkpoint")
def head(_reader: AuditReader, auth: AuthDep) -> dict:
    seq, head_hash = chain.head(auth.factory)
    with auth.factory() as s:
        cp = s.scalar(select(AuditCheckpoint).order_by(AuditCheckpoint.tree_size.desc()).limit(1))
    return {"seq": seq, "hash": head_hash, "write_failures": chain.health.failures,
            "last_write_error": chain.health.last_error,
            "checkpoint": _checkpoint(cp) if cp else None}


@router.get("/audit/checkpoints", summary="Signed checkpoints, oldest first")
def checkpoints(_reader: AuditReader, auth: AuthDep, after: int = Query(0, ge=0, le=DB_INT_MAX), limit: int = Query(100, ge=1, le=1000)) -> list[dict]:
    with auth.factory() as s:
        rows = s.scalars(select(AuditCheckpoint).where(AuditCheckpoint.tree_size > after)
                         .order_by(AuditCheckpoint.tree_size).limit(limit))
        return [_checkpoint(c) for c in rows]


@router.get("/audit/keys", summary="Public keys that sign checkpoints and bundles (pin one with `wicket audit verify --trust`)")
def keys(_caller: CurrentPrincipal, auth: AuthDep) -> list[dict]:
    with auth.factory() as s:
        return [{"key_id": k.key_id, "public_key": k.public_key, "algorithm": "ed25519", "created_at": k.created_at,
                 "retired_at": k.retired_at} for k in s.scalars(select(AuditKey).order_by(AuditKey.created_at))]


@router.get("/audit/verify", summary="Check the stored chain in place: hashes, numbering, checkpoints, the head")
def verify_live(_reader: AuditReader, auth: AuthDep) -> dict:
    # The head first, then only what it covers: records appended meanwhile are not "missing at the end".
    head_seq, head_hash = chain.head(auth.factory)
    with auth.factory() as s:
        cps = list(s.scalars(select(AuditCheckpoint).where(AuditCheckpoint.tree_size <= head_seq)
                             .order_by(AuditCheckpoint.tree_size)))
        key_rows = list(s.scalars(select(AuditKey)))
        rows = s.execute(select(Event).where(Event.seq <= head_seq).order_by(Event.seq).execution_options(yield_per=5000))
        mismatched: list[verify.Problem] = []

        def checked(stream):
            for (row,) in stream:
                if (why := _columns_differ(row)) is not None:
                    mismatched.append(verify.Problem("record", f"the {why} column differs from the record's hashed line "
                                                     "(the table was edited; the line is what the chain vouches for)",
                                                     seq=row.seq))
                yield row

        report = verify.verify_records(checked(rows), cps, key_rows, expected_head=(head_seq, head_hash),
                                       trusted_keys=[k.key_id for k in key_rows] or None)
    report.problems = sorted(report.problems + mismatched, key=lambda p: (p.seq is None, p.seq or 0))
    return report.as_dict()


_LINE_FIELDS = {"category": "category", "type": "type", "result": "result", "actor": "actor", "actor_id": "actor_id",
                "subject": "subject", "source": "source", "reason": "reason", "session": "session_ref",
                "device": "device_ref", "clock": "clock", "body": "body"}


def _columns_differ(row: Event) -> str | None:
    try:
        obj = json.loads(row.line)
    except ValueError:
        return None  # the verifier reports the line itself
    for key, column in _LINE_FIELDS.items():
        if obj.get(key) != getattr(row, column):
            return column
    return None


@router.get("/audit/export", summary="A self-contained bundle (tar) of the chain for offline verification",
            response_class=FileResponse)
def export(request: Request, caller: AuditReader, auth: AuthDep, source: Source, background: BackgroundTasks,
           since: Annotated[datetime | None, Query(alias="from")] = None,
           until: Annotated[datetime | None, Query(alias="to")] = None,
           device: str | None = Query(None, pattern=ASSET_ID.pattern), session: str | None = Query(None, pattern=SESSION_ID)):
    if device and session:
        raise Invalid("give --device or --session, not both")
    for name, value in (("from", since), ("to", until)):
        if value is not None and value.tzinfo is None:
            raise Invalid(f"{name}: give a time zone (e.g. 2026-11-26T10:00:00Z)")
    if since and until and until < since:
        raise Invalid("to is before from")
    state = request.app.state
    fd, path = tempfile.mkstemp(prefix="wicket-audit-", suffix=".tar.gz")
    os.close(fd)
    background.add_task(os.unlink, path)
    summary = bundle.export_bundle(auth.factory, path, signer=state.audit_signer, since=since, until=until, device=device,
                                   session=session, exported_by=caller.username,
                                   checkpoint_now=lambda: state.checkpointer.run_once(at_head=True))
    with transaction(auth.factory) as s:
        events.record(s, at=auth.now(), category="audit", type="audit.export", result="success" if summary.ok else "failure",
                      actor_id=caller.user_id, actor=caller.username, source=source, first_seq=summary.first_seq,
                      last_seq=summary.last_seq, head_hash=summary.head_hash, bundle_sha256=summary.sha256,
                      records=summary.records, redacted=summary.redacted, scope_from=since.isoformat() if since else None,
                      scope_to=until.isoformat() if until else None, scope_device=device, scope_session=session,
                      problems=[str(p) for p in summary.report.problems[:5]])
    name = f"wicket-audit-{summary.first_seq}-{summary.last_seq}.tar.gz"
    return FileResponse(path, media_type="application/gzip", filename=name,
                        headers={"X-Wicket-Bundle-SHA256": summary.sha256, "X-Wicket-Bundle-Records": str(summary.records),
                                 "X-Wicket-Bundle-Verified": "ok" if summary.ok else
                                 ("failed: " + str(summary.report.problems[0])[:300]).encode("ascii", "replace").decode()})


@router.get("/audit/access", summary="Who had access to a device between two times, from the chain's records")
def access(_reader: AuditReader, auth: AuthDep, device: str = Query(..., pattern=ASSET_ID.pattern),
           since: Annotated[datetime | None, Query(alias="from")] = None,
           until: Annotated[datetime | None, Query(alias="to")] = None) -> list[dict]:
    with auth.factory() as s:
        sids = select(Event.session_ref).where(Event.device_ref == device, Event.session_ref.is_not(None)).distinct()
        rows = list(s.scalars(select(Event).where(Event.session_ref.in_(sids)).order_by(Event.seq)))
    return bundle.who_had_access(rows, device, since, until)


@router.get("/audit/sinks", summary="SIEM sinks: cursor, lag, last delivery, last error")
def sinks(request: Request, _reader: AuditReader, auth: AuthDep) -> list[dict]:
    ship = request.app.state.shipper
    return ship.health() if ship is not None else shipper.sink_health(auth.factory, [])


@router.get("/sessions/{sid}/recording", tags=["sessions"], response_class=FileResponse,
            summary="A session's payload recording (pcap), as the node signed it")
def recording(request: Request, caller: AuditReader, auth: AuthDep, source: Source,
              sid: str = Path(..., pattern=SESSION_ID), n: int = Query(1, ge=1, le=1000, description="which one, when the lane was replaced")):
    found = request.app.state.recordings.find(sid)
    if len(found) < n:
        raise NotFound(f"session {sid} has no payload recording" + (f" number {n}" if found else ""))
    rec = found[n - 1]
    path = request.app.state.recordings.file(rec)
    if not path.is_file():
        raise NotFound(f"the recording of session {sid} is listed but its file {rec.path} is not under this controller's "
                       "recordings directory (several replicas must share it)")
    with transaction(auth.factory) as s:
        events.record(s, at=auth.now(), category="audit", type="session.recording_download", result="success",
                      actor_id=caller.user_id, actor=caller.username, subject=sid, source=source, session_id=sid,
                      sha256=rec.sha256, size=rec.size)
    return FileResponse(path, media_type="application/vnd.tcpdump.pcap", filename=f"{sid}-{n}.pcap",
                        headers={"X-Wicket-Recording-SHA256": rec.sha256})


def _checkpoint(c: AuditCheckpoint) -> dict:
    return {"tree_size": c.tree_size, "head_hash": c.head_hash, "statement": c.statement, "signature": c.signature,
            "key_id": c.key_id, "created_at": c.created_at}
