"""Offline verification of wicket's audit chain and of its export bundles.

Who calls it: `wicket audit verify BUNDLE`, the exporter (`controller.audit.bundle`) on each bundle it
has just written, and an assessor who trusts nothing of wicket's. It imports only the standard library
and `cryptography`, so it can be copied out of the source tree and run on its own:

    python3 verify.py BUNDLE [--trust KEY_ID_OR_PUBLIC_KEY ...] [--deep] [--json]

The chain (format version 1). Record k is the exact UTF-8 text `line_k` of one JSON object with sorted keys
and no spaces: {"actor","actor_id","body","category","clock","device","reason","result","seq","session",
"source","subject","time","type","v"}. Nothing is re-serialised; the stored bytes are hashed:

    leaf_k = SHA-256(line_k)        hash_k = SHA-256(hash_{k-1} ‖ leaf_k)  (32 + 32 raw bytes)        hash_0 = 0³²

A checkpoint is a statement, the exact text of {"head_hash","key_id","kind":"wicket.audit.checkpoint",
"time","tree_size","v":1}, signed with Ed25519 by the controller's audit key; key_id is the first 32 hex
digits of SHA-256 of the raw 32-byte public key. It says "the chain had tree_size records, the last one's
hash was head_hash".

The bundle (`wicket audit export`) is one gzip'd tar. Its files sit in one directory:

    README.txt          how to check all this by hand, with sha256sum and python3
    manifest.json       what the bundle holds (below); signed
    manifest.sig        base64 Ed25519 signature over the bytes of manifest.json, by the key manifest.key_id
    keys.json           {"keys": [{"key_id", "public_key" (base64 of 32 bytes), "created_at", "retired_at"}]}
    checkpoints.jsonl   one checkpoint a line, by tree size: {"head_hash","key_id","signature","statement","tree_size"}
    records.log         one record a line, in order from first_seq to last_seq:
                            <seq> <hash_seq> <line_seq>       a record in the export's scope
                            <seq> <hash_seq> =<leaf_seq>      a record outside it: only its leaf ("redacted")

manifest.json: {"format": "wicket.audit.bundle", "version": 1, "scope": {"from", "to", "device", "session",
"carried_sessions"}, "first_seq", "base_hash" (= hash_{first_seq-1}), "last_seq", "head_hash",
"records": {"total", "full", "redacted"}, "checkpoints", "files": {name: SHA-256 hex} for the four other
files, "exported_at", "exported_by", "key_id"}. The range starts right after a checkpoint (or at record 1)
and ends at one, so both ends are anchored by signed statements as well as by the manifest.

What `verify_records` checks, record by record: the sequence numbers run on without a gap or a step back
(the line's own "seq" too); each line is a version-1 record; each record chains from the one before
(hash_k = SHA-256(hash_{k-1} ‖ leaf_k)); every checkpoint's statement is well formed, signed by a known (and,
with trusted keys, a trusted) key, in increasing tree size, and its head hash is the chain's hash at its
tree size; no checkpoint covers records that are not there. `verify_bundle` adds the manifest: its
signature, the SHA-256 of every file, and its range, head and counts against the records.

Problems are ordered: record problems by sequence number, then checkpoints by tree size, then the
manifest, the keys and the files, so `problems[0]` names the first bad record whenever one is bad. For a
record the verifier names where the damage starts: a line edited (content, hash or sequence number) is
named by its own number, a line removed by the first missing number, two lines swapped by the first of
the two places, a cut file by its first damaged or missing record. Each problem says what is wrong in words.
Warnings and notes do not fail verification. Warnings: no key pinned (the bundle's own keys were used),
records written while the controller's clock was not synchronised, a checkpoint signed after its key was
retired, records no checkpoint covers yet. Notes: a time earlier than the one before it, between records
or between checkpoints (replicas write in turn, each with its own clock).

Speed: a record costs two SHA-256 calls and a few byte searches (its "seq", "clock", "time" and "v"); the
default does not parse every line as JSON, because the chain and the signed checkpoints already prove each
line is the text the controller wrote. `deep=True` (`--deep`) also parses each one and checks it is the
canonical text of a well-typed record (an order of magnitude slower: JSON costs more than hashing).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import gzip
import hashlib
import json
import queue
import re
import sys
import tarfile
import tempfile
import threading
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

GENESIS = "0" * 64
BUNDLE_FORMAT = "wicket.audit.bundle"
BUNDLE_VERSION = 1
CHECKPOINT_KIND = "wicket.audit.checkpoint"
README, MANIFEST, SIGNATURE, KEYS, CHECKPOINTS, RECORDS = (
    "README.txt", "manifest.json", "manifest.sig", "keys.json", "checkpoints.jsonl", "records.log")
MEMBERS = (README, MANIFEST, SIGNATURE, KEYS, CHECKPOINTS, RECORDS)  # the order the exporter writes them in
SIGNED_FILES = (README, KEYS, CHECKPOINTS, RECORDS)  # listed with their SHA-256 in the manifest
RECORD_FIELDS = frozenset(("v", "seq", "time", "clock", "category", "type", "result", "actor", "actor_id", "subject",
                           "source", "reason", "session", "device", "body"))
STATEMENT_FIELDS = frozenset(("v", "kind", "tree_size", "head_hash", "time", "key_id"))
CLOCKS = ("synced", "unsynced", "unknown")
UNPINNED = ("no key was pinned (--trust): the signatures show only that the records agree with the keys that came "
            "with them, not that the controller you know signed them")

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z")
_SMALL_FILE_MAX = 256 << 20  # a file other than records.log is read into memory: bounded
_CHUNK = 1 << 20
_ORDER = {"record": 0, "checkpoint": 1, "manifest": 2, "keys": 3, "bundle": 4}


# ---- results ---------------------------------------------------------------------------------------


@dataclass
class Problem:
    """One thing wrong, and where: a record (seq), a checkpoint (tree_size, or its line when it has none),
    the manifest, the keys, or the bundle's files."""

    where: str  # record | checkpoint | manifest | keys | bundle
    message: str
    seq: int | None = None
    tree_size: int | None = None
    file: str | None = None
    line: int | None = None  # line number in `file`, from 1

    def __str__(self) -> str:
        at = {"record": f"record {self.seq}", "checkpoint": f"checkpoint at tree size {self.tree_size}"}.get(self.where)
        if at is None or (self.seq is None and self.tree_size is None):
            at = self.file or self.where
            if self.line:
                at += f" line {self.line}"
        elif self.line and self.file:
            at += f" ({self.file} line {self.line})"
        return f"{at}: {self.message}"

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None} | {"text": str(self)}


@dataclass
class Report:
    """What verification found. `ok` when there is no problem; warnings and notes do not fail it."""

    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: int = 0
    full: int = 0
    redacted: int = 0
    checkpoints: int = 0  # checkpoints whose signature and head hash were verified
    first_seq: int | None = None
    last_seq: int | None = None
    head_hash: str | None = None
    first_time: str | None = None
    last_time: str | None = None
    clock: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLOCKS, 0))
    keys_pinned: bool = False
    anchored_start: bool = False  # the hash before the first record is the genesis or a verified checkpoint's
    anchored_end: bool = False  # the last record's hash is a verified checkpoint's
    manifest: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("problems", "manifest")}
        return {"ok": self.ok, **out, "problems": [p.as_dict() for p in self.problems], "manifest": self.manifest}

    def text(self, limit: int = 50) -> str:
        """The report for people: verdict, what was checked, then each problem, warning and note."""
        span = (f"records {self.first_seq}..{self.last_seq}" if self.records else "no records") + \
            f" ({self.full} in full, {self.redacted} redacted), {self.checkpoints} checkpoint(s) verified"
        head = f"head {self.head_hash}" if self.head_hash else "no head"
        verdict = "OK" if self.ok else f"FAILED: {len(self.problems)} problem(s); the first: {self.problems[0]}"
        lines = [f"audit verification {verdict}", f"  {span}; {head}"]
        if self.first_time:
            lines.append(f"  time {self.first_time} .. {self.last_time}")
        lines += [f"  problem: {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  … and {len(self.problems) - limit} more problem(s)")
        lines += [f"  warning: {w}" for w in self.warnings] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class TrustError(ValueError):
    """A --trust value that is neither a key id nor a public key."""


# ---- public API ------------------------------------------------------------------------------------


def verify_bundle(path: str | Path, trusted_keys: Iterable[str] | None = None, *, deep: bool = False) -> Report:
    """Verify an export bundle. `trusted_keys`: key ids (32 hex digits) or base64 public keys the
    checkpoints and the manifest must be signed with; without them the bundle's own keys are used, and
    the report warns that this shows only self-consistency."""
    report = Report()
    try:
        with _open(path) as raw, tarfile.open(fileobj=raw, mode="r|", bufsize=_CHUNK) as tar:
            _verify_tar(tar, report, trusted_keys, deep)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        report.problems.append(Problem("bundle", f"cannot be read as a tar archive: {exc}", file=str(path)))
    report.problems.sort(key=_problem_order)
    return report


def verify_records(records: Iterable, checkpoints: Iterable = (), keys: Iterable | dict = (),
                   base: tuple[int, str] | None = (1, GENESIS), expected_head: tuple[int, str] | None = None, *,
                   trusted_keys: Iterable[str] | None = None, deep: bool = False) -> Report:
    """Verify a run of records, in order, against checkpoints and keys; also usable on the live database.

    records: records.log lines (bytes or str), or rows: objects with .seq, .hash, .line (None when redacted)
      and optionally .leaf and .prev_hash (the `events` table), or tuples (seq, hash, line, leaf, prev_hash).
      A row's stored leaf and prev_hash are checked too.
    checkpoints: dicts or objects with .statement and .signature (and optionally .tree_size, .head_hash,
      .key_id, which must agree with the statement). A checkpoint beyond the last record means records
      are missing: pass those up to where the records are meant to end.
    keys: {key_id: base64 public key}, or dicts/objects with .key_id and .public_key.
    base: (first_seq, hash_{first_seq-1}); None when unknown (then the first record's link is not checked).
    expected_head: (last_seq, head_hash) the records must end at, e.g. the controller's head row.
    """
    report = Report()
    keymap, retired = _load_keys(_entries(keys), report, file=None)
    trusted = _pin(trusted_keys, keymap, report)
    cps = _check_checkpoints(((None, c) for c in checkpoints), keymap, trusted, report, file=None, retired=retired)
    walk = _Walk(base, set(cps), deep, file=None)
    _feed(walk, records)
    _finish(walk, cps, report, expected_head, claimed_end="expected head")
    report.problems.sort(key=_problem_order)
    return report


def bundle_events(path: str | Path) -> Iterator[dict]:
    """The records a bundle holds in full, as canonical events (the record's JSON object plus "hash"),
    in order. It does not verify: call `verify_bundle` first."""
    with _open(path) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for member in tar:
            if member.isfile() and PurePosixPath(member.name).name == RECORDS:
                for raw in tar.extractfile(member):
                    seq, stored, rest = raw.rstrip(b"\n").split(b" ", 2)
                    if not rest.startswith(b"="):
                        event = json.loads(rest)
                        event["hash"] = stored.decode()
                        yield event
                return


def key_id_of(public_raw: bytes) -> str:
    """A key's id: the first 32 hex digits of SHA-256 of its 32 raw bytes."""
    return hashlib.sha256(public_raw).hexdigest()[:32]


# ---- the walk over the records ----------------------------------------------------------------------


class _Walk:
    """Checks records in order, a chunk of records.log lines at a time, keeping the chain's state between
    chunks. The loop in `run` is the verifier's hot path: it is written for speed."""

    def __init__(self, base: tuple[int, str] | None, wanted: set[int], deep: bool, file: str | None):
        self.expect = base[0] if base else None
        self.prev = bytes.fromhex(base[1]) if base else None  # hash of the record before, as raw bytes; None: unknown
        self.base = base
        self.wanted = wanted  # tree sizes of checkpoints: their stored hash is kept in `heads`
        self.heads: dict[int, bytes] = {}
        self.deep, self.file = deep, file  # records.log, or None for records handed over in memory
        self.problems: list[Problem] = []
        self.lineno = 0
        self.full = self.redacted = 0
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self.last_stored: bytes | None = None
        self.first_time: bytes | None = None
        self.last_time: bytes | None = None
        self.backwards: list[tuple[int, bytes, bytes]] = []  # (seq, time, the time before it)
        self.clock: dict[bytes, int] = {c.encode(): 0 for c in CLOCKS}
        self.pending: tuple[Problem, bytes, bool] | None = None  # a broken link, to tell apart at the next record
        self.runs: list[tuple[int, int]] = []  # runs of numbers passed in order, before the current one
        self.run_start = self.expect  # where the current run began
        self.unterminated: int | bool = False  # the number of the last line's record when it had no newline

    def problem(self, seq: int | None, message: str, line: int | None = None) -> Problem:
        p = Problem("record", message, seq=seq, file=self.file, line=line or self.lineno)
        self.problems.append(p)
        return p

    def run(self, buf: bytes, stop: int) -> None:
        """Check the lines of buf[:stop], each ending in a newline. Lines are read in place, by offset
        (splitting the buffer into lines first costs about a tenth of the whole check)."""
        sha, hexlify = hashlib.sha256, binascii.hexlify
        find, rfind, startswith, endswith = buf.find, buf.rfind, buf.startswith, buf.endswith
        expect, prev, wanted, heads, deep = self.expect, self.prev, self.wanted, self.heads, self.deep
        lineno, full, redacted, last_time = self.lineno, self.full, self.redacted, self.last_time
        synced = 0
        clean = self.pending is None  # no broken link waiting for the next record to explain it
        stored = seq = None
        s = 0  # where the line starts; `e` is its newline, `a` the space after its number, `r` its record
        while s < stop:
            e = find(b"\n", s)
            lineno += 1
            a = find(b" ", s, e)
            if a <= s or a + 66 > e or buf[a + 65] != 32:
                self.lineno = lineno
                self._malformed(buf[s:e], expect)
                if expect is not None:
                    expect += 1
                prev = self.pending = None
                clean, s = True, e + 1
                continue
            stored, r = buf[a + 1:a + 65], a + 66
            is_full = buf[r] != 61  # "="; buf[e] is the newline, so buf[r] exists
            if is_full:
                leaf = sha(buf[r:e]).digest()
                full += 1
            else:
                leaf = _hex_digest(buf[r + 1:e])
                redacted += 1
                if leaf is None:
                    self.lineno = lineno
                    self.problem(expect, f"the leaf of this redacted record is not 64 lowercase hex digits: "
                                         f"{_show(buf[r:e])}")
                    leaf = b""
            sfield = buf[s:a]
            cur = sha(prev + leaf).digest() if prev is not None else None
            if clean and cur is not None and hexlify(cur) == stored and sfield == b"%d" % expect:
                seq, prev = expect, cur  # the fast path: in its place, and chained
                number = sfield
            else:
                self.lineno = lineno
                seq = int(sfield) if sfield.isdigit() and (a == s + 1 or sfield[0] != 48) else None
                seq, prev = self._slow(seq, sfield, expect, stored, leaf, cur, not is_full)
                clean = self.pending is None
                number = b"%d" % seq
            if is_full:
                value = None  # the record's time
                if deep:
                    self.lineno = lineno
                    value = self._deep(buf[r:e], seq)
                elif not startswith(b'{"actor":', r, e) or not endswith(b',"v":1}', r, e):
                    self.lineno = lineno
                    self.problem(seq, 'its line is not a version-1 record (a JSON object from "actor" to "v":1)')
                else:
                    # Keys are sorted and only "body" holds objects, so the last ',"seq":' is the record's own
                    # (a '"' inside a string is escaped); "clock" comes before it, "time" after it.
                    i = rfind(b',"seq":' + number + b',"session":', r, e)
                    if i < 0 or find(b',"seq":', i + 7, e) >= 0:
                        self.lineno = lineno
                        i = r + self._seq_field(buf[r:e], seq)
                    c = rfind(b',"clock":"', r, i)
                    if c > r and startswith(b'synced"', c + 10, e):
                        synced += 1
                    else:
                        self.lineno = lineno
                        self._clock(buf[r:e], c - r if c > r else -1, seq)
                    t = find(b',"time":"', i, e)
                    value = buf[t + 9:t + 36]  # the controller writes times with microseconds: 27 characters
                if value is not None:
                    if last_time is None:
                        self.first_time = value
                    elif value < last_time:
                        self.backwards.append((seq, value, last_time))
                    last_time = value
            if seq in wanted:
                heads[seq] = stored
            if self.first_seq is None:
                self.first_seq = seq
            expect, s = seq + 1, e + 1
        self.expect, self.prev, self.lineno, self.full, self.redacted, self.last_time = \
            expect, prev, lineno, full, redacted, last_time
        self.clock[b"synced"] += synced
        if seq is not None:
            self.last_seq, self.last_stored = seq, stored

    def run_lines(self, lines: list[bytes]) -> None:
        """Check lines given one by one (without their newlines)."""
        buf = b"\n".join(lines) + b"\n"
        self.run(buf, len(buf))

    def _seq_field(self, rest: bytes, seq: int) -> int:
        """The line's "seq" is not the record's number: say so; returns where the field is (or the end)."""
        i = rest.rfind(b',"seq":')
        j = rest.find(b",", i + 1)
        shown = rest[i + 7:j][:24].decode("utf-8", "replace") if i >= 0 and j >= 0 else "(none)"
        self.problem(seq, f'its line says "seq":{shown}, not {seq}')
        return i if i >= 0 else len(rest)

    def _clock(self, rest: bytes, c: int, seq: int) -> None:
        value = rest[c + 10:rest.find(b'"', c + 10)] if c > 0 else None
        if value in self.clock:
            self.clock[value] += 1
        else:
            self.problem(seq, f"its clock is {_show(value) if value is not None else '(none)'}, not one of "
                              f"{', '.join(CLOCKS)}")

    def _slow(self, seq, sfield, expect, stored, leaf, cur, redacted) -> tuple[int, bytes | None]:
        """Off the fast path: say what is wrong with this record and find where the chain goes on.
        Returns the record's number and the hash the next record chains from (None: unknown)."""
        sha, hexlify = hashlib.sha256, binascii.hexlify
        stored_raw = _hex_digest(stored)
        linked = cur is not None and hexlify(cur) == stored
        if self.pending is not None:  # the record before did not chain: this one tells which of its parts changed
            bad, computed, was_redacted = self.pending
            self.pending = None
            alt = sha(computed + leaf).digest()
            if linked:
                bad.message = (f"its {'leaf' if was_redacted else 'line'} was changed: it no longer hashes to the chain "
                               "hash stored with it (the next record chains from that stored hash)")
            elif hexlify(alt) == stored:
                bad.message = ("its stored chain hash was changed: the next record chains from the hash its content "
                               "gives, not from the one stored")
                cur, linked = alt, True
        if expect is None:  # the run's start is unknown: take it from the first record
            expect = self.run_start = seq if seq is not None else 1
        if seq != expect:
            if linked:
                shown = f"number {seq}" if seq is not None else f"{_show(sfield)} for a number"
                self.problem(expect, f"its sequence number was changed: the line has {shown}, but the record chains "
                                     f"as record {expect}")
            elif seq is None:
                self.problem(expect, f"the sequence number {_show(sfield)} is not a number")
            else:  # a jump: the link across it cannot be judged
                self._jump(expect, seq)
                return seq, stored_raw
            seq = expect
        if not linked and cur is not None:
            self.pending = (self.problem(seq, "does not chain: SHA-256(the chain hash of the record before ‖ this "
                                              "record's leaf) is not the chain hash stored with it"), cur, redacted)
        if stored_raw is None:
            self.problem(seq, f"its chain hash is not 64 lowercase hex digits: {_show(stored)}")
        return seq, stored_raw

    def _jump(self, expect: int, seq: int) -> None:
        """The line where record `expect` belongs holds record `seq`: say what that means, given the runs
        of numbers seen so far; the records go on from `seq`."""
        def seen(lo: int, hi: int) -> bool:
            return self._seen(lo, hi, expect)

        if seq > expect:
            what = f"record {expect}" if seq == expect + 1 else f"records {expect}..{seq - 1}"
            if seen(expect, seq - 1):
                self.problem(expect, f"{what} came earlier, out of place; the line where record {expect} belongs "
                                     f"holds record {seq}")
            else:
                self.problem(expect, f"{what} {'is' if seq == expect + 1 else 'are'} missing: the line where record "
                                     f"{expect} belongs holds record {seq} (removed, or moved)")
        elif seen(seq, seq):
            self.problem(expect, f"the line where record {expect} belongs repeats record {seq}")
        else:
            self.problem(expect, f"out of order: the line where record {expect} belongs holds record {seq}, which "
                                 "belongs earlier (moved)")
        if self.run_start is not None and expect - 1 >= self.run_start:
            self.runs.append((self.run_start, expect - 1))
        self.run_start = seq

    def _seen(self, lo: int, hi: int, expect: int) -> bool:
        """Whether every number lo..hi has been passed already (rare path: a sweep of the runs)."""
        runs = self.runs + ([(self.run_start, expect - 1)] if self.run_start is not None else [])
        for start, end in sorted(runs):
            if start <= lo <= end:
                lo = end + 1
                if lo > hi:
                    return True
        return False

    def _malformed(self, raw: bytes, expect: int | None) -> None:
        if expect is None:
            self.problem(None, f"is not '<seq> <hash> <record>': {_show(raw)}")
        else:
            self.problem(expect, f"the line where record {expect} should be is not '<seq> <chain hash> <record>': {_show(raw)}")

    def _deep(self, rest: bytes, seq: int) -> bytes | None:
        """Parse the line and check it is the canonical text of a well-typed version-1 record; count its
        clock. Returns its time (None when it has none to trust)."""
        try:
            obj = json.loads(rest)
        except (ValueError, UnicodeDecodeError) as exc:
            self.problem(seq, f"its line is not JSON ({exc})")
            return None
        if not isinstance(obj, dict) or set(obj) != RECORD_FIELDS:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            self.problem(seq, f"its line is not a version-1 record: fields {keys}")
            return None
        wrong = [name for name, ok in (
            ("v", obj["v"] == 1 and type(obj["v"]) is int), ("seq", type(obj["seq"]) is int),
            ("time", isinstance(obj["time"], str) and _TIME.fullmatch(obj["time"])), ("clock", obj["clock"] in CLOCKS),
            ("category", isinstance(obj["category"], str)), ("type", isinstance(obj["type"], str)),
            ("result", obj["result"] in ("success", "failure")), ("body", isinstance(obj["body"], dict)),
            ("actor_id", obj["actor_id"] is None or type(obj["actor_id"]) is int),
            *((k, obj[k] is None or isinstance(obj[k], str)) for k in ("actor", "subject", "source", "reason",
                                                                       "session", "device"))) if not ok]
        if wrong:
            self.problem(seq, "its line has ill-typed field(s): " + ", ".join(f"{k}={obj[k]!r}" for k in wrong))
            return None
        self.clock[obj["clock"].encode()] += 1
        if obj["seq"] != seq:
            self.problem(seq, f"its line says \"seq\":{obj['seq']}, not {seq}")
        elif json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() != rest:
            self.problem(seq, "its line is not in canonical form (sorted keys, no spaces, UTF-8)")
        return obj["time"].encode()


def _feed(walk: _Walk, records: Iterable) -> None:
    """Hand records of any accepted shape to the walk, a batch at a time."""
    batch: list[bytes] = []
    prev_hash: str | None = walk.base[1] if walk.base else None
    for item in records:
        if isinstance(item, bytes | str):
            raw = item.encode() if isinstance(item, str) else item
            batch.append(raw.rstrip(b"\n"))
        else:
            seq, stored, line, leaf, row_prev = (tuple(item) + (None,) * 5)[:5] if isinstance(item, tuple) else (
                item.seq, item.hash, item.line, getattr(item, "leaf", None), getattr(item, "prev_hash", None))
            text = line.encode() if isinstance(line, str) else line
            computed = hashlib.sha256(text).hexdigest() if text is not None else leaf
            if leaf is not None and text is not None and leaf != computed:
                walk.problems.append(Problem("record", f"its stored leaf {_show(leaf)} is not SHA-256 of its line",
                                             seq=seq, file="events"))
            if row_prev is not None and prev_hash is not None and row_prev != prev_hash:
                walk.problems.append(Problem("record", "its stored prev_hash is not the chain hash of the record before",
                                             seq=seq, file="events"))
            prev_hash = stored
            batch.append(b"%d %s %s" % (seq, str(stored).encode(), text if text is not None else b"=" + str(leaf).encode()))
        if len(batch) >= 4096:
            walk.run_lines(batch)
            batch = []
    if batch:
        walk.run_lines(batch)


def _finish(walk: _Walk, cps: dict[int, dict], report: Report, claimed: tuple[int, str] | None, *,
            claimed_end: str) -> None:
    """After the walk: checkpoints against the chain, truncation, anchors, and the report's numbers."""
    report.problems += walk.problems
    report.full, report.redacted = walk.full, walk.redacted
    first = walk.base[0] if walk.base else walk.first_seq
    report.first_seq, report.last_seq = first, walk.last_seq
    report.records = walk.full + walk.redacted
    report.head_hash = walk.last_stored.decode("ascii", "replace") if walk.last_stored is not None else (
        walk.base[1] if walk.base else None)
    report.first_time = walk.first_time.decode("ascii", "replace") if walk.first_time else None
    report.last_time = walk.last_time.decode("ascii", "replace") if walk.last_time else None
    report.clock = {k.decode(): v for k, v in walk.clock.items()}
    last = walk.last_seq if walk.last_seq is not None else (first - 1 if first is not None else 0)
    if walk.unterminated is not False:
        at = walk.unterminated if walk.unterminated is not True else walk.last_seq
        report.problems.append(Problem("record", "the last line has no newline at its end: the file was cut",
                                       seq=at, file=walk.file, line=walk.lineno))

    covered = [size for size in cps if size > last]
    if claimed is not None and claimed[0] > last:
        covered.append(claimed[0])
    if covered:
        upto = max(covered)
        what = f"the {claimed_end} ends at record {claimed[0]}" if claimed and claimed[0] == upto else \
            f"a signed checkpoint covers {upto} records"
        missing = f"record {last + 1} is" if upto == last + 1 else f"records {last + 1}..{upto} are"
        report.problems.append(Problem("record", f"{missing} missing at the end: {what}, the records stop at {last} "
                                                 "(cut)", seq=last + 1, file=walk.file))
    if claimed is not None:
        if claimed[0] < last:
            report.problems.append(Problem("record", f"is beyond the {claimed_end}, which ends at record {claimed[0]}",
                                           seq=claimed[0] + 1, file=walk.file))
        elif claimed[0] == last and report.head_hash != claimed[1]:
            report.problems.append(Problem("manifest" if claimed_end == "manifest" else "record",
                                           f"the {claimed_end}'s head hash {claimed[1]} is not the hash of record "
                                           f"{last}, {report.head_hash}", seq=None if claimed_end == "manifest" else last))

    base_size = first - 1 if first is not None else None
    for size, cp in sorted(cps.items()):
        if base_size is not None and size == base_size:
            got = walk.base[1] if walk.base else None
        elif base_size is not None and base_size < size <= last:
            got = walk.heads.get(size, b"").decode("ascii", "replace") or None
        else:
            if base_size is not None and size < base_size:
                report.notes.append(f"checkpoint at tree size {size} lies before the records (from {first}): not "
                                    "compared with them")
            continue
        if got is None:
            cp["unchecked"] = True
            report.notes.append(f"checkpoint at tree size {size}: record {size} is not there to compare with")
        elif got != cp["head_hash"]:
            prior = max((s for s in cps if s < size), default=base_size if base_size is not None else 0)
            report.problems.append(Problem(
                "checkpoint", f"signs head hash {cp['head_hash']}, but the records give {got} at {size}: a record in "
                f"{max(prior, 0) + 1}..{size} was altered and the chain hashes after it rewritten, or the checkpoint "
                "was replaced", tree_size=size, file=CHECKPOINTS if walk.file == RECORDS else None))
        else:
            report.checkpoints += 1
            cp["matched"] = True

    genesis = first == 1 and walk.base is not None and walk.base[1] == GENESIS
    report.anchored_start = genesis or (base_size in cps and cps[base_size].get("matched", False))
    if walk.last_seq is None:
        report.anchored_end = report.anchored_start
    else:
        report.anchored_end = cps.get(walk.last_seq, {}).get("matched", False)
    if first is not None and not report.anchored_start:
        report.warnings.append(f"the start is not anchored by a verified checkpoint at tree size {first - 1}")
    if walk.last_seq is not None and not report.anchored_end:
        signed = max((s for s, c in cps.items() if c.get("matched")), default=None)
        since = f"after checkpoint {signed}" if signed is not None else "in the whole run"
        report.warnings.append(f"records {since} up to {walk.last_seq} are chained but no verified checkpoint covers "
                               f"the last one")
    unsynced = report.clock.get("unsynced", 0) + report.clock.get("unknown", 0)
    if unsynced:
        report.warnings.append(f"{report.clock.get('unsynced', 0)} record(s) were written with the controller's clock "
                               f"unsynchronised and {report.clock.get('unknown', 0)} with its state unknown: their "
                               "times may be off")
    if walk.backwards:
        seq, value, before = walk.backwards[0]
        report.notes.append(f"time goes backwards {len(walk.backwards)} time(s) (first at record {seq}: "
                            f"{value.decode('ascii', 'replace')} after {before.decode('ascii', 'replace')}); replicas "
                            "write in turn, so times interleave within their clocks' skew")


# ---- checkpoints and keys ------------------------------------------------------------------------------


def _entries(keys) -> list:
    if isinstance(keys, dict):
        return [{"key_id": k, "public_key": v} for k, v in keys.items()]
    return list(keys)


def _get(entry, name: str):
    return entry.get(name) if isinstance(entry, dict) else getattr(entry, name, None)


def _load_keys(entries: list, report: Report, file: str | None) -> tuple[dict[str, Ed25519PublicKey], dict[str, datetime]]:
    """key_id → public key, and key_id → when it was retired; a key whose id is not its hash, or that is
    not 32 bytes, is a problem."""
    keymap: dict[str, Ed25519PublicKey] = {}
    retired: dict[str, datetime] = {}
    for entry in entries:
        kid, pub = _get(entry, "key_id"), _get(entry, "public_key")
        raw = _b64(pub)
        if raw is None or len(raw) != 32:
            report.problems.append(Problem("keys", f"key {kid!r}: the public key is not base64 of 32 bytes", file=file))
        elif kid != key_id_of(raw):
            report.problems.append(Problem("keys", f"key {kid!r} is not the id of its public key "
                                                   f"(that would be {key_id_of(raw)})", file=file))
        else:
            keymap[kid] = Ed25519PublicKey.from_public_bytes(raw)
            when = _get(entry, "retired_at")
            if isinstance(when, str):
                when = _parse_time(when)
            if isinstance(when, datetime):
                retired[kid] = when
    return keymap, retired


def _pin(trusted_keys: Iterable[str] | None, keymap: dict, report: Report) -> set[str] | None:
    """The trusted key ids; base64 keys are added to `keymap`. None: nothing pinned (a warning)."""
    if trusted_keys is None:
        report.warnings.append(UNPINNED)
        return None
    trusted: set[str] = set()
    for text in trusted_keys:
        text = text.strip()
        raw = _b64(text)
        if _HEX32.fullmatch(text):
            trusted.add(text)
        elif raw is not None and len(raw) == 32:
            trusted.add(key_id_of(raw))
            keymap.setdefault(key_id_of(raw), Ed25519PublicKey.from_public_bytes(raw))
        else:
            raise TrustError(f"--trust {text!r}: neither a key id (32 hex digits) nor a base64 Ed25519 public key")
    report.keys_pinned = True
    return trusted


def _check_checkpoints(entries: Iterable[tuple[int | None, object]], keymap: dict, trusted: set[str] | None,
                       report: Report, file: str | None, retired: dict[str, datetime]) -> dict[int, dict]:
    """Verify each checkpoint on its own, then their order. Returns the good ones by tree size."""
    good: dict[int, dict] = {}
    last: dict | None = None
    for line, entry in entries:
        cp, why = _checkpoint(entry, keymap, trusted)
        if why is not None:
            size = cp.get("tree_size") if cp else None
            report.problems.append(Problem("checkpoint", why, tree_size=size, file=file, line=line))
            continue
        size = cp["tree_size"]
        if size in good:
            if good[size]["head_hash"] != cp["head_hash"]:
                report.problems.append(Problem("checkpoint", f"disagrees with another signed checkpoint of the same "
                                               f"size: head {cp['head_hash']} against {good[size]['head_hash']}",
                                               tree_size=size, file=file, line=line))
            continue
        if last is not None and size < last["tree_size"]:
            report.problems.append(Problem("checkpoint", f"comes after the checkpoint at {last['tree_size']}: "
                                           "checkpoints are listed by increasing tree size", tree_size=size, file=file,
                                           line=line))
        elif last is not None and cp["at"] < last["at"]:
            report.notes.append(f"checkpoint at tree size {size} ({cp['time']}) is dated before the one at "
                                f"{last['tree_size']} ({last['time']}): the replicas' clocks differ")
        if cp["key_id"] in retired and cp["at"] > retired[cp["key_id"]]:
            report.warnings.append(f"checkpoint at tree size {size} ({cp['time']}) is signed with key {cp['key_id']}, "
                                   f"which keys.json says was retired at {retired[cp['key_id']].isoformat()}")
        good[size] = last = cp
    return good


def _checkpoint(entry, keymap: dict, trusted: set[str] | None) -> tuple[dict | None, str | None]:
    statement, signature = _get(entry, "statement"), _get(entry, "signature")
    if not isinstance(statement, str) or not isinstance(signature, str):
        return None, "has no statement or no signature"
    try:
        st = json.loads(statement)
    except ValueError:
        return None, f"its statement is not JSON: {_show(statement.encode())}"
    if not isinstance(st, dict) or set(st) != STATEMENT_FIELDS:
        return None, f"its statement is not a checkpoint: {_show(statement.encode())}"
    size = st["tree_size"]
    cp = {"tree_size": size} if type(size) is int else None
    if st["v"] != 1 or type(st["v"]) is not int or st["kind"] != CHECKPOINT_KIND:
        return cp, f"its statement is not a version-1 {CHECKPOINT_KIND}"
    if type(size) is not int or size < 0:
        return None, f"its tree size {size!r} is not a count"
    if not isinstance(st["head_hash"], str) or not _HEX64.fullmatch(st["head_hash"]):
        return cp, f"its head hash {st['head_hash']!r} is not 64 lowercase hex digits"
    if not isinstance(st["time"], str) or not _TIME.fullmatch(st["time"]):
        return cp, f"its time {st['time']!r} is not an RFC 3339 UTC time"
    if json.dumps(st, sort_keys=True, separators=(",", ":")) != statement:
        return cp, "its statement is not in canonical form (sorted keys, no spaces)"
    for name in ("tree_size", "head_hash", "key_id"):
        outer = _get(entry, name)
        if outer is not None and outer != st[name]:
            return cp, f"its {name} {outer!r} is not the one its statement signs ({st[name]!r})"
    kid = st["key_id"]
    key = keymap.get(kid) if isinstance(kid, str) else None
    if key is None:
        return cp, f"is signed with key {kid!r}, which is not among the keys"
    if trusted is not None and kid not in trusted:
        return cp, f"is signed with key {kid}, which was not trusted (--trust)"
    sig = _b64(signature)
    try:
        if sig is None or len(sig) != 64:
            raise InvalidSignature
        key.verify(sig, statement.encode())
    except InvalidSignature:
        return cp, f"its signature does not verify with key {kid}"
    return {**st, "at": _parse_time(st["time"])}, None


# ---- the bundle ----------------------------------------------------------------------------------------


def _verify_tar(tar: tarfile.TarFile, report: Report, trusted_keys, deep: bool) -> None:
    """Read the members in one pass. records.log is checked as it streams when the small files came first
    (as the exporter writes them); otherwise it is spooled to a temporary file and checked after."""
    small: dict[str, bytes] = {}
    digests: dict[str, str] = {}
    folder: str | None = None
    walk: _Walk | None = None
    state: dict = {}
    spool = None
    try:
        for member in tar:
            name = PurePosixPath(member.name)
            if member.isdir():
                continue
            if not member.isfile() or name.name not in MEMBERS:
                report.problems.append(Problem("bundle", f"holds {member.name!r}, which is not part of a bundle",
                                               file=member.name))
                continue
            if folder is None:
                folder = str(name.parent)
            if str(name.parent) != folder or name.name in digests:
                report.problems.append(Problem("bundle", f"holds {member.name!r} twice or in a second folder",
                                               file=member.name))
                continue
            stream = tar.extractfile(member)
            if name.name != RECORDS:
                if member.size > _SMALL_FILE_MAX:
                    report.problems.append(Problem("bundle", f"{name.name} is {member.size} bytes: too large",
                                                   file=name.name))
                    digests[name.name] = ""
                    continue
                small[name.name] = data = stream.read()
                digests[name.name] = hashlib.sha256(data).hexdigest()
                continue
            if all(n in small for n in (MANIFEST, KEYS, CHECKPOINTS)):
                walk = _prepare(small, report, trusted_keys, deep, state)
                digests[RECORDS] = _stream(stream, walk)
            else:
                spool = tempfile.TemporaryFile()
                h = hashlib.sha256()
                while chunk := stream.read(_CHUNK):
                    h.update(chunk)
                    spool.write(chunk)
                digests[RECORDS] = h.hexdigest()
        if walk is None:
            walk = _prepare(small, report, trusted_keys, deep, state)
            if spool is not None:
                spool.seek(0)
                _stream(spool, walk)
    finally:
        if spool is not None:
            spool.close()
    for name in MEMBERS:
        if name not in digests:
            report.problems.append(Problem("bundle", f"has no {name}", file=name))
    manifest = report.manifest
    claimed = state.get("claimed")
    _finish(walk, state["cps"], report, claimed, claimed_end="manifest")
    if manifest is None:
        return
    listed = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    for name in SIGNED_FILES:
        if name not in listed:
            report.problems.append(Problem("manifest", f"does not list {name} with its SHA-256", file=MANIFEST))
        elif name in digests and digests[name] != listed[name]:
            report.problems.append(Problem("bundle", f"its SHA-256 is {digests[name]}, the manifest says {listed[name]}: "
                                                     "the file was changed", file=name))
    for name in set(listed) - set(SIGNED_FILES):
        report.problems.append(Problem("manifest", f"lists {name!r}, which is not part of a bundle", file=MANIFEST))
    counts = manifest.get("records") if isinstance(manifest.get("records"), dict) else {}
    for key, got in (("total", report.records), ("full", report.full), ("redacted", report.redacted)):
        if counts.get(key) != got:
            report.problems.append(Problem("manifest", f"says {counts.get(key)!r} records {key}, the bundle has {got}",
                                           file=MANIFEST))
    if manifest.get("checkpoints") != state["cp_lines"]:
        report.problems.append(Problem("manifest", f"says {manifest.get('checkpoints')!r} checkpoints, "
                                                   f"checkpoints.jsonl has {state['cp_lines']}", file=MANIFEST))


def _prepare(small: dict[str, bytes], report: Report, trusted_keys, deep: bool, state: dict) -> _Walk:
    """Keys, pinning, the manifest and its signature, the checkpoints: all that the walk needs first."""
    keys_doc = _json_file(small, KEYS, report)
    entries = keys_doc.get("keys") if isinstance(keys_doc, dict) else None
    if keys_doc is not None and not isinstance(entries, list):
        report.problems.append(Problem("keys", "has no list \"keys\"", file=KEYS))
    keymap, retired = _load_keys(entries or [], report, file=KEYS)
    trusted = _pin(trusted_keys, keymap, report)
    manifest = _json_file(small, MANIFEST, report)
    base = claimed = None
    if isinstance(manifest, dict):
        report.manifest = manifest
        _check_manifest_signature(manifest, small, keymap, trusted, report)
        base, claimed = _manifest_range(manifest, report)
    elif manifest is not None:
        report.problems.append(Problem("manifest", "is not a JSON object", file=MANIFEST))
    lines = small.get(CHECKPOINTS, b"").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif CHECKPOINTS in small:
        report.problems.append(Problem("bundle", "its last line has no newline at its end: the file was cut",
                                       file=CHECKPOINTS))
    parsed = []
    for i, raw in enumerate(lines, 1):
        try:
            entry = json.loads(raw)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            report.problems.append(Problem("checkpoint", f"is not a JSON object: {_show(raw)}", file=CHECKPOINTS, line=i))
            continue
        parsed.append((i, entry))
    state["cps"] = _check_checkpoints(parsed, keymap, trusted, report, file=CHECKPOINTS, retired=retired)
    state["cp_lines"] = len(lines)
    state["claimed"] = claimed
    return _Walk(base, set(state["cps"]), deep, file=RECORDS)


def _check_manifest_signature(manifest: dict, small: dict[str, bytes], keymap: dict, trusted, report: Report) -> None:
    kid = manifest.get("key_id")
    text = small.get(SIGNATURE, b"")
    sig = _b64(text[:-1]) if text.endswith(b"\n") else None  # exactly one line of base64
    key = keymap.get(kid) if isinstance(kid, str) else None
    if SIGNATURE not in small:
        return  # reported as a missing file
    if key is None:
        report.problems.append(Problem("manifest", f"is signed with key {kid!r}, which is not among the keys",
                                       file=MANIFEST))
        return
    if trusted is not None and kid not in trusted:
        report.problems.append(Problem("manifest", f"is signed with key {kid}, which was not trusted (--trust)",
                                       file=MANIFEST))
    try:
        if sig is None or len(sig) != 64:
            raise InvalidSignature
        key.verify(sig, small[MANIFEST])
    except InvalidSignature:
        report.problems.append(Problem("manifest", f"manifest.sig does not verify over manifest.json with key {kid}",
                                       file=SIGNATURE))


def _manifest_range(manifest: dict, report: Report) -> tuple[tuple[int, str] | None, tuple[int, str] | None]:
    """(first_seq, base_hash) and (last_seq, head_hash) from the manifest, when they are well formed."""
    def bad(message):
        report.problems.append(Problem("manifest", message, file=MANIFEST))

    if manifest.get("format") != BUNDLE_FORMAT or manifest.get("version") != BUNDLE_VERSION:
        bad(f"is not a {BUNDLE_FORMAT} version {BUNDLE_VERSION} manifest "
            f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})")
    first, base_hash = manifest.get("first_seq"), manifest.get("base_hash")
    last, head_hash = manifest.get("last_seq"), manifest.get("head_hash")
    base = claimed = None
    if type(first) is int and first >= 1 and isinstance(base_hash, str) and _HEX64.fullmatch(base_hash):
        base = (first, base_hash)
        if first == 1 and base_hash != GENESIS:
            bad(f"starts at record 1 but its base hash is {base_hash}, not the genesis hash")
    else:
        bad(f"has no valid first_seq/base_hash ({first!r}, {base_hash!r})")
    if type(last) is int and isinstance(head_hash, str) and _HEX64.fullmatch(head_hash) and \
            (base is None or last >= base[0] - 1):
        claimed = (last, head_hash)
    else:
        bad(f"has no valid last_seq/head_hash ({last!r}, {head_hash!r})")
    return base, claimed


def _json_file(small: dict[str, bytes], name: str, report: Report):
    if name not in small:
        return None
    try:
        return json.loads(small[name])
    except (ValueError, UnicodeDecodeError) as exc:
        report.problems.append(Problem("manifest" if name == MANIFEST else "keys" if name == KEYS else "bundle",
                                       f"is not JSON ({exc})", file=name))
        return None


@contextlib.contextmanager
def _open(path: str | Path):
    """The bundle's tar stream: through gzip's own reader when it is gzip'd (faster than tarfile's)."""
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            f.seek(0)
            yield f
            return
        f.seek(0)
        with gzip.GzipFile(fileobj=f, mode="rb") as gz:
            yield gz


def _stream(stream, walk: _Walk) -> str:
    """Feed a records.log stream to the walk in chunks of lines; returns the file's SHA-256. A second
    thread reads, inflates and hashes the next chunks meanwhile (zlib and hashlib let go of the GIL)."""
    h = hashlib.sha256()
    chunks: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set() and (chunk := stream.read(_CHUNK)):
                h.update(chunk)
                _put(chunks, chunk, stop)
        except BaseException as exc:  # handed over: the walk's thread raises it
            _put(chunks, exc, stop)
            return
        _put(chunks, None, stop)

    reader = threading.Thread(target=read, name="audit-verify-reader", daemon=True)
    reader.start()
    tail = b""
    try:
        while (chunk := chunks.get()) is not None:
            if isinstance(chunk, BaseException):
                raise chunk
            buf = tail + chunk if tail else chunk
            cut = buf.rfind(b"\n") + 1
            walk.run(buf, cut)
            tail = buf[cut:]
    finally:
        stop.set()
        reader.join()
    if tail:
        walk.unterminated = walk.expect if walk.expect is not None else True
        walk.run(tail + b"\n", len(tail) + 1)
    return h.hexdigest()


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


# ---- small helpers -------------------------------------------------------------------------------------


def _hex_digest(text: bytes) -> bytes | None:
    """32 raw bytes from exactly 64 lowercase hex digits, else None."""
    if len(text) != 64:
        return None
    try:
        raw = bytes.fromhex(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return None
    return raw if binascii.hexlify(raw) == text else None


def _b64(text) -> bytes | None:
    """Bytes from canonical base64 only: padded, no stray characters, unused bits zero (base64 has
    several spellings of the same bytes; a changed spelling is a changed file)."""
    if not isinstance(text, str | bytes):
        return None
    text = text.encode("ascii", "replace") if isinstance(text, str) else text
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if base64.b64encode(raw) == text else None


def _parse_time(text: str) -> datetime | None:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def _show(raw: bytes | str, limit: int = 60) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _problem_order(p: Problem) -> tuple:
    return (_ORDER.get(p.where, 9), p.seq if p.seq is not None else (p.tree_size if p.tree_size is not None else -1))


# ---- run on its own ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python3 verify.py BUNDLE`: exit 0 when the bundle verifies, 1 when it does not, 2 on bad usage."""
    p = argparse.ArgumentParser(prog="verify.py", description="Verify a wicket audit bundle offline.")
    p.add_argument("bundle")
    p.add_argument("--trust", action="append", metavar="KEY", help="a key id or base64 public key to trust (repeat)")
    p.add_argument("--deep", action="store_true", help="also parse every record's JSON")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    args = p.parse_args(argv)
    try:
        report = verify_bundle(args.bundle, args.trust, deep=args.deep)
    except TrustError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(json.dumps(report.as_dict(), indent=1) if args.json else report.text())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
