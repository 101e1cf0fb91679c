"""Export bundles of the audit chain, and "who had access to device X between t1 and t2".

Who calls it: `wicket audit export` (`export_bundle`) and `wicket audit access` (`who_had_access`, on
the database's rows or on a verified bundle's records: `access_from_bundle`). The bundle's format, and
what its verifier checks, are described in `controller.audit.verify`; every bundle also carries a
README.txt that explains how to check it by hand.

Which records an export holds in full: those of its time window (`since`..`until`, inclusive) that match
its filter — a device (`device_ref`) or a session (`session_ref`) — together with every record of a
session that the filter matched in the range (an agent's evidence names the session, not the device)
and the earlier records of sessions that were open when the window began, so the bundle can say who had
access from its first minute ("carried" sessions). The range runs from just after the last checkpoint
before the first such record (or from record 1) to the first checkpoint at or after the last one
(`checkpoint_now` is asked for one at the head when there is none yet): both ends are signed. Every
other record inside the range is written redacted, with its leaf only, so the chain still verifies.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from ..models import AccessSession, AuditCheckpoint, AuditKey, Event
from . import verify
from .verify import CHECKPOINTS, GENESIS, KEYS, MANIFEST, README, RECORDS, SIGNATURE, Report

END_TYPES = ("session.close", "session.expire", "session.revoke")
_BATCH = 2000


@dataclass
class ExportSummary:
    """What `export_bundle` wrote, and the verifier's report on it (the bundle is written even when the
    database's own chain does not verify: that is evidence too)."""

    path: str
    first_seq: int
    last_seq: int
    base_hash: str
    head_hash: str
    records: int
    full: int
    redacted: int
    checkpoints: int
    carried_sessions: list[str]
    sha256: str  # of the bundle file
    bytes: int
    report: Report = field(repr=False)

    @property
    def ok(self) -> bool:
        return self.report.ok

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "report"}
        return {**out, "ok": self.ok, "problems": [str(p) for p in self.report.problems],
                "warnings": self.report.warnings}


# ---- export --------------------------------------------------------------------------------------------


def export_bundle(session_factory: sessionmaker[Session], out_path: str | Path, *, signer, since: datetime | None = None,
                  until: datetime | None = None, device: str | None = None, session: str | None = None,
                  exported_by: str, checkpoint_now: Callable[[], object] | None = None,
                  now: datetime | None = None) -> ExportSummary:
    """Write a bundle of the chain to `out_path` (atomically) and verify it; see the module docstring
    for what it holds. `signer` signs the manifest: an object with .sign(bytes) -> bytes, .key_id and
    .public_key_b64 (`controller.audit.chain.AuditSigner`)."""
    now = now or datetime.now(UTC)
    with session_factory() as s:
        carried = _carried(s, since, device, session)
        lo, hi = _extent(s, since, until, device, session, carried)
        start, end = _anchors(s, lo, hi)
    if end is None and checkpoint_now is not None:
        checkpoint_now()
        with session_factory() as s:
            start, end = _anchors(s, lo, hi)
    if end is None:  # no checkpoint covers the last record: the manifest's signature alone anchors the end
        end = hi
    match = _matcher(since, until, device, session, carried)
    with session_factory() as s:
        base_hash = GENESIS if start == 1 else s.scalar(select(Event.hash).where(Event.seq == start - 1))
        if base_hash is None:
            raise ValueError(f"record {start - 1} is not in the database: cannot start the export after it")
        checkpoints = s.execute(select(AuditCheckpoint).where(AuditCheckpoint.tree_size.between(start - 1, end))
                                .order_by(AuditCheckpoint.tree_size)).scalars().all()
        keys = s.execute(select(AuditKey).order_by(AuditKey.created_at)).scalars().all()
        rows = s.execute(select(Event.seq, Event.hash, Event.line, Event.at, Event.device_ref, Event.session_ref)
                         .where(Event.seq.between(start, end)).order_by(Event.seq)
                         .execution_options(yield_per=_BATCH))
        scope = {"from": _iso(since), "to": _iso(until), "device": device, "session": session,
                 "carried_sessions": sorted(carried)}
        summary = write_bundle(out_path, records=_select(rows, match), first_seq=start, base_hash=base_hash,
                               checkpoints=[_checkpoint_entry(c) for c in checkpoints], keys=[_key_entry(k) for k in keys],
                               signer=signer, scope=scope, exported_by=exported_by, exported_at=now, check=False)
    summary.report = verify.verify_bundle(summary.path, [signer.key_id])  # with the database let go
    return summary


def write_bundle(out_path: str | Path, *, records: Iterable[tuple[int, str, str | None, str | None]], first_seq: int,
                 base_hash: str, checkpoints: list[dict], keys: list[dict], signer, scope: dict, exported_by: str,
                 exported_at: datetime, check: bool = True) -> ExportSummary:
    """Write a bundle from its parts (atomically) and, with `check`, verify it. records: (seq, chain hash,
    line, leaf) in order, with line None for a redacted record (then leaf is its SHA-256, hex). The
    signer's key is added to `keys`."""
    out_path = Path(out_path)
    if not any(k["key_id"] == signer.key_id for k in keys):
        keys = [*keys, {"key_id": signer.key_id, "public_key": signer.public_key_b64, "created_at": None,
                        "retired_at": None}]
    keys_bytes = (json.dumps({"keys": keys}, indent=1, sort_keys=True) + "\n").encode()
    cps_bytes = b"".join((json.dumps(c, sort_keys=True, separators=(",", ":")) + "\n").encode() for c in checkpoints)
    with tempfile.TemporaryFile() as log_file:
        counts, last_seq, head_hash = _write_records(log_file, records, first_seq, base_hash)
        log_sha = counts.pop("sha256")
        readme = _readme(first_seq, last_seq, signer.key_id, scope).encode()
        manifest = {
            "format": verify.BUNDLE_FORMAT, "version": verify.BUNDLE_VERSION, "scope": scope,
            "first_seq": first_seq, "base_hash": base_hash, "last_seq": last_seq, "head_hash": head_hash,
            "records": counts, "checkpoints": len(checkpoints),
            "files": {README: _sha(readme), KEYS: _sha(keys_bytes), CHECKPOINTS: _sha(cps_bytes), RECORDS: log_sha},
            "exported_at": _iso(exported_at), "exported_by": exported_by, "key_id": signer.key_id,
        }
        manifest_bytes = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
        sig_bytes = base64.b64encode(signer.sign(manifest_bytes)) + b"\n"
        folder = f"wicket-audit-{first_seq}-{last_seq}"
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".wicket-audit-", suffix=".tmp", dir=out_path.parent)
        try:
            with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz", compresslevel=6) as tar:
                mtime = exported_at.timestamp()
                for name, data in ((README, readme), (MANIFEST, manifest_bytes), (SIGNATURE, sig_bytes),
                                   (KEYS, keys_bytes), (CHECKPOINTS, cps_bytes)):
                    tar.addfile(_member(f"{folder}/{name}", len(data), mtime), io.BytesIO(data))
                log_file.seek(0, os.SEEK_END)
                size = log_file.tell()
                log_file.seek(0)
                tar.addfile(_member(f"{folder}/{RECORDS}", size, mtime), log_file)
            os.replace(tmp, out_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    data_sha = hashlib.sha256()
    with open(out_path, "rb") as f:
        while chunk := f.read(1 << 20):
            data_sha.update(chunk)
    return ExportSummary(path=str(out_path), first_seq=first_seq, last_seq=last_seq, base_hash=base_hash,
                         head_hash=head_hash, records=counts["total"], full=counts["full"], redacted=counts["redacted"],
                         checkpoints=len(checkpoints), carried_sessions=list(scope.get("carried_sessions") or []),
                         sha256=data_sha.hexdigest(), bytes=out_path.stat().st_size,
                         report=verify.verify_bundle(out_path, [signer.key_id]) if check else Report())


def _carried(s: Session, since: datetime | None, device: str | None, session: str | None) -> set[str]:
    """Sessions that had a lane (activated) before `since` and had not ended by then."""
    if since is None:
        return set()
    q = select(AccessSession.id).where(AccessSession.activated_at < since,
                                       or_(AccessSession.ended_at.is_(None), AccessSession.ended_at >= since))
    if device is not None:
        q = q.where(AccessSession.asset_id == device)
    if session is not None:
        q = q.where(AccessSession.id == session)
    return set(s.scalars(q))


def _filter(since, until, device, session):
    cond = []
    if since is not None:
        cond.append(Event.at >= since)
    if until is not None:
        cond.append(Event.at <= until)
    if device is not None:
        cond.append(Event.device_ref == device)
    if session is not None:
        cond.append(Event.session_ref == session)
    return cond


def _extent(s: Session, since, until, device, session, carried: set[str]) -> tuple[int | None, int | None]:
    """The first and last record the export must hold in full (None, None: none)."""
    cond = _filter(since, until, device, session)
    lo, hi = s.execute(select(func.min(Event.seq), func.max(Event.seq)).where(*cond)).one()
    if device is not None and lo is not None:  # records that name only the session (an agent's evidence)
        sessions = select(Event.session_ref).where(*cond, Event.session_ref.is_not(None)).distinct().scalar_subquery()
        later = s.scalar(select(func.max(Event.seq)).where(Event.session_ref.in_(sessions), *_filter(since, until, None, None)))
        hi = max(hi, later or hi)
    if carried:  # from their first record; to their last one in the window, when nothing else is there
        first, last = s.execute(select(func.min(Event.seq), func.max(Event.seq))
                                .where(Event.session_ref.in_(carried), *_filter(None, until, None, None))).one()
        if first is not None:
            lo = first if lo is None else min(lo, first)
            hi = last if hi is None else max(hi, last)
    return lo, hi


def _anchors(s: Session, lo: int | None, hi: int | None) -> tuple[int, int | None]:
    """The range's first record (right after a checkpoint, or 1) and its last (a checkpoint's tree size;
    None when no checkpoint covers `hi` yet). With nothing to hold, an empty range at the last checkpoint."""
    if lo is None:
        size = s.scalar(select(func.max(AuditCheckpoint.tree_size))) or 0
        return size + 1, size
    before = s.scalar(select(func.max(AuditCheckpoint.tree_size)).where(AuditCheckpoint.tree_size < lo)) or 0
    after = s.scalar(select(func.min(AuditCheckpoint.tree_size)).where(AuditCheckpoint.tree_size >= hi))
    return before + 1, after


def _matcher(since, until, device, session, carried: set[str]) -> Callable:
    """Whether a row is written in full. A device export takes in the sessions it meets on the device."""
    sessions = set(carried)

    def match(at, device_ref, session_ref) -> bool:
        if session_ref is not None and session_ref in sessions and (until is None or at <= until):
            return True
        if (since is not None and at < since) or (until is not None and at > until):
            return False
        if (device is not None and device_ref != device) or (session is not None and session_ref != session):
            return False
        if session_ref is not None and device is not None:
            sessions.add(session_ref)
        return True

    return match


def _select(rows, match) -> Iterable[tuple[int, str, str | None, str | None]]:
    for seq, chain_hash, line, at, device_ref, session_ref in rows:
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        if match(at, device_ref, session_ref):
            yield seq, chain_hash, line, None
        else:
            # the leaf from the line as stored, never from the `leaf` column: a line changed in the
            # database must show as a broken link, not hide behind its old leaf
            yield seq, chain_hash, None, hashlib.sha256(line.encode()).hexdigest()


def _write_records(f, records, first_seq: int, base_hash: str) -> tuple[dict, int, str]:
    h = hashlib.sha256()
    full = redacted = 0
    last_seq, head = first_seq - 1, base_hash
    buf: list[bytes] = []
    for seq, chain_hash, line, leaf in records:
        if line is not None:
            if "\n" in line:
                raise ValueError(f"record {seq}'s line holds a newline: it cannot be written as one line")
            buf.append(f"{seq} {chain_hash} {line}\n".encode())
            full += 1
        else:
            buf.append(f"{seq} {chain_hash} ={leaf}\n".encode())
            redacted += 1
        last_seq, head = seq, chain_hash
        if len(buf) >= _BATCH:
            data = b"".join(buf)
            h.update(data)
            f.write(data)
            buf = []
    data = b"".join(buf)
    h.update(data)
    f.write(data)
    return {"total": full + redacted, "full": full, "redacted": redacted, "sha256": h.hexdigest()}, last_seq, head


def _checkpoint_entry(c: AuditCheckpoint) -> dict:
    return {"tree_size": c.tree_size, "head_hash": c.head_hash, "key_id": c.key_id, "statement": c.statement,
            "signature": c.signature}


def _key_entry(k: AuditKey) -> dict:
    return {"key_id": k.key_id, "public_key": k.public_key, "created_at": _iso(k.created_at),
            "retired_at": _iso(k.retired_at)}


def _member(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, int(mtime), 0o644, "wicket", "wicket"
    return info


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if value else None


# ---- who had access ------------------------------------------------------------------------------------


def who_had_access(records: Iterable, device: str, since: datetime | str | None = None,
                   until: datetime | str | None = None) -> list[dict]:
    """Who had access to `device` between `since` and `until`, from chain records alone.

    records: canonical events (dicts, as `verify.bundle_events` yields them), record lines (str), or rows
    with .line and .hash (the `events` table), in order. A session had access from its `session.open`
    (the node confirmed the lane; without that record, from its successful `session.activate`, unless a
    failed activation followed) until its close, expiry or revocation; with no end among the records it
    is still open at their end (`ended_at` None). Each answer names the records it relied on (`seqs`)."""
    lo, hi = _when(since), _when(until)
    sessions: dict[str, dict] = {}
    for ev in _events(records):
        kind = ev.get("type") or ""
        if not (kind.startswith(("session.", "break_glass.")) or kind == "lane.evidence"):
            continue
        body = ev.get("body") if isinstance(ev.get("body"), dict) else {}
        sid = ev.get("session") or body.get("session_id") or ev.get("subject")
        if not sid:
            continue
        st = sessions.setdefault(sid, {
            "session": sid, "device": None, "site": None, "task": None, "engineer": None, "break_glass": False,
            "approvers": [], "extension_approvers": [], "requested_at": None, "activated_at": None, "opened_at": None,
            "ended_at": None, "end_reason": None, "ended_by": None, "evidence": [], "seqs": []})
        st["seqs"].append(ev.get("seq"))
        st["device"] = st["device"] or ev.get("device") or body.get("device")
        st["site"] = st["site"] or body.get("site")
        st["task"] = st["task"] or body.get("task")
        st["engineer"] = st["engineer"] or body.get("user") or (ev.get("actor") if kind in (
            "session.request", "break_glass.open") else None)
        st["break_glass"] = st["break_glass"] or bool(body.get("break_glass")) or kind.startswith("break_glass.")
        _apply(st, kind, ev, body)
    out = []
    for st in sessions.values():
        start = st["opened_at"] or st["activated_at"]
        if st["device"] != device or start is None:
            continue
        if (hi is not None and _when(start) > hi) or (lo is not None and st["ended_at"] and _when(st["ended_at"]) < lo):
            continue
        out.append(st)
    return sorted(out, key=lambda st: (_when(st["opened_at"] or st["activated_at"]), st["session"]))


def access_from_bundle(path: str | Path, device: str, since=None, until=None, *,
                       trusted_keys: Iterable[str] | None = None) -> tuple[Report, list[dict]]:
    """Verify a bundle, then answer `who_had_access` from its records. Do not use the answer when the
    report is not ok."""
    report = verify.verify_bundle(path, trusted_keys)
    return report, who_had_access(verify.bundle_events(path), device, since, until)


def _apply(st: dict, kind: str, ev: dict, body: dict) -> None:
    at, ok, actor = ev.get("time"), ev.get("result") == "success", ev.get("actor")
    if kind in ("session.request", "break_glass.open"):
        st["requested_at"] = st["requested_at"] or at
    elif kind == "session.approve" and ok and actor and actor not in st["approvers"]:
        st["approvers"].append(actor)
    elif kind == "session.extend":
        for name in body.get("approved_by") or []:
            if name not in st["extension_approvers"]:
                st["extension_approvers"].append(name)
    elif kind == "session.activate":
        if ok:
            st["activated_at"] = at
        elif st["opened_at"] is None:
            st["activated_at"] = None  # the node could not open the lane: the activation was undone
    elif kind == "session.open" and ok:
        st["opened_at"] = st["opened_at"] or at
    elif kind in END_TYPES:
        st["ended_at"], st["ended_by"] = at, actor
        st["end_reason"] = ev.get("reason") or body.get("end_reason") or kind.removeprefix("session.")
    elif kind in ("session.evidence", "lane.evidence"):
        # session.evidence: controller/session_evidence.compose; lane.evidence: the agent's, by the link
        st["evidence"].append(ev.get("seq"))
        for a in body.get("approvals") or []:
            if isinstance(a, dict) and a.get("verdict") == "approve" and a.get("approver"):
                names = st["approvers"] if a.get("kind", "request") == "request" else st["extension_approvers"]
                if a["approver"] not in names:
                    names.append(a["approver"])
        actual = body.get("actual") if isinstance(body.get("actual"), dict) else {}
        st["opened_at"] = st["opened_at"] or actual.get("start")
        st["ended_at"] = st["ended_at"] or actual.get("session_ended_at") or actual.get("end")
        st["end_reason"] = st["end_reason"] or body.get("end_reason")
        st["ended_by"] = st["ended_by"] or body.get("ended_by")


def _events(records: Iterable) -> Iterable[dict]:
    for r in records:
        if isinstance(r, dict):
            yield r
        elif isinstance(r, str | bytes):
            yield json.loads(r)
        else:
            ev = json.loads(r.line)
            ev["hash"] = getattr(r, "hash", None)
            yield ev


def _when(value: datetime | str | None) -> datetime | None:
    """An aware UTC datetime from a datetime (naive ones are UTC) or an RFC 3339 text."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _readme(first_seq: int, last_seq: int, key_id: str, scope: dict) -> str:
    shown = ", ".join(f"{k} {scope[k]}" for k in ("from", "to", "device", "session") if scope.get(k)) or "all records"
    return README_TEXT.format(first=first_seq, last=last_seq, key_id=key_id, scope=shown)


README_TEXT = """\
wicket audit bundle: records {first}..{last} of a wicket controller's audit chain
Scope of the export: {scope}. Manifest signed by key {key_id}.

Every auditable event of the controller (logins, account and policy changes, access requests with
their decisions, approvals, activations, closes, expiries, revocations, break-glass, agent evidence)
is one record of an append-only chain. This bundle lets you check, without trusting wicket, that the
records it holds are exactly the ones the controller wrote, in order, with none removed or changed.

FILES
  manifest.json      what the bundle holds: range, hashes, counts, and the SHA-256 of each other file
  manifest.sig       base64 Ed25519 signature of manifest.json's bytes, by the key manifest.key_id
  keys.json          the controller's audit public keys: key_id = first 32 hex digits of SHA-256(raw key)
  checkpoints.jsonl  signed checkpoints, one a line: the statement text, its signature, tree size, head hash
  records.log        one record a line, from first_seq to last_seq:
                       <seq> <chain hash> <record JSON>   a record in the export's scope
                       <seq> <chain hash> =<leaf>         a record outside it: only its SHA-256

THE CHAIN
  leaf_k = SHA-256(the record's JSON text, exactly as written, UTF-8)
  hash_k = SHA-256(bytes of hash_(k-1) followed by bytes of leaf_k)   (32 + 32 raw bytes)
  hash_0 = 64 zeros; hash_(first_seq-1) is manifest.base_hash.
A checkpoint's statement {{"head_hash","key_id","kind","time","tree_size","v"}} says "the chain had
tree_size records and its last hash was head_hash"; the controller signed it at that time. The range
starts right after a checkpoint (or at record 1) and ends at one, so both ends are signed.

CHECK IT WITH WICKET
  wicket audit verify BUNDLE --trust KEY_ID
or with the verifier alone: controller/audit/verify.py from wicket's source, one file that needs only
Python 3 and the `cryptography` package (read it first; it is short enough to review):
  python3 verify.py BUNDLE --trust KEY_ID
KEY_ID is the controller's audit key id as its operator publishes it. Without --trust the check only
shows that the bundle is consistent with the keys it carries.

CHECK IT BY HAND
  1. Unpack, and check each file against the manifest:
       tar xzf BUNDLE && cd wicket-audit-{first}-{last}
       python3 -c 'import json; [print(h + "  " + n) for n, h in json.load(open("manifest.json"))["files"].items()]' \\
           | sha256sum -c
  2. Compare manifest.json's key_id with the controller's published key id.
  3. Run this with python3 (save it as check.py and run `python3 check.py` in the unpacked folder); it
     checks the manifest's signature, every checkpoint's signature, and every record's link and number,
     and that the checkpoints' head hashes are the chain's:

# --- check.py ---
import base64, hashlib, json
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

keys = {{}}
for k in json.load(open("keys.json"))["keys"]:
    raw = base64.b64decode(k["public_key"])
    assert hashlib.sha256(raw).hexdigest()[:32] == k["key_id"], "a key id is not its key's hash"
    keys[k["key_id"]] = Ed25519PublicKey.from_public_bytes(raw)
manifest_bytes = open("manifest.json", "rb").read()
manifest = json.loads(manifest_bytes)
keys[manifest["key_id"]].verify(base64.b64decode(open("manifest.sig").read()), manifest_bytes)
signed = {{}}
for text in open("checkpoints.jsonl"):
    cp = json.loads(text)
    statement = json.loads(cp["statement"])
    keys[statement["key_id"]].verify(base64.b64decode(cp["signature"]), cp["statement"].encode())
    signed[statement["tree_size"]] = statement["head_hash"]
seq, prev = manifest["first_seq"], bytes.fromhex(manifest["base_hash"])
assert signed.get(seq - 1, manifest["base_hash"]) == manifest["base_hash"], "the start is not the signed one"
for raw in open("records.log", "rb"):
    number, stored, record = raw.rstrip(b"\\n").split(b" ", 2)
    assert int(number) == seq, f"record {{seq}} is missing or out of order"
    leaf = bytes.fromhex(record[1:].decode()) if record.startswith(b"=") else hashlib.sha256(record).digest()
    prev = hashlib.sha256(prev + leaf).digest()
    assert prev.hex() == stored.decode(), f"record {{seq}} does not chain"
    assert signed.get(seq, prev.hex()) == prev.hex(), f"checkpoint {{seq}} does not match the chain"
    seq += 1
assert seq - 1 == manifest["last_seq"] and prev.hex() == manifest["head_hash"], "the records end early"
print(f"OK: records {{manifest['first_seq']}}..{{seq - 1}} chain from the base to the head; signatures verify")
# --- end of check.py ---

A record in full is a JSON object with sorted keys: v (1), seq, time (RFC 3339 UTC), clock (whether the
controller's clock was synchronised: synced, unsynced, unknown), category, type, result, actor,
actor_id, subject, source (client address), reason, session, device, body.
"""
