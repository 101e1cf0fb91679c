"""The offline verifier (controller.audit.verify) against chains and bundles this file builds by hand,
following the fixed format (not with the controller's code): a clean bundle passes; 1 000 random single
mutations each fail, and for a mutation of records.log the first problem names the first bad record.

The rules for "the first bad record" the mutation test holds the verifier to:
  a byte changed (in the number, a separator, the hash, the record, or the newline): that line's record
  a line removed: the first missing number (the removed line's)
  two lines swapped: the first of the two places
  a line repeated right after itself: the place after it (where the copy sits)
  the file cut at a byte: the record the cut falls in; at a line's start, the first record missing
Set WICKET_AUDIT_MUTATION_SEED to replay a run; the seed is printed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import tarfile
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from controller.audit import verify
from controller.audit.verify import GENESIS, verify_bundle, verify_records

N_RECORDS, EVERY, FIRST = 400, 50, 101  # the bundle: records 101..400, after the checkpoint at 100
MUTATIONS = 1000


# ---- a chain, by hand ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rec:
    seq: int
    line: str
    leaf: str
    hash: str
    prev_hash: str


class Key:
    def __init__(self, seed: int):
        self.private = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"key%d" % seed).digest())
        raw = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public_key_b64 = base64.b64encode(raw).decode()
        self.key_id = hashlib.sha256(raw).hexdigest()[:32]

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)

    def entry(self) -> dict:
        return {"key_id": self.key_id, "public_key": self.public_key_b64, "created_at": "2026-01-01T00:00:00.000000Z",
                "retired_at": None}


def rfc3339(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def link(prev: str, leaf: str) -> str:
    return hashlib.sha256(bytes.fromhex(prev) + bytes.fromhex(leaf)).hexdigest()


def event(rng: random.Random, seq: int, at: datetime) -> dict:
    """A record of one of a few shapes, with text that trips naive parsers: a nested "seq", a string
    holding ',"seq":1,', non-ASCII, and U+2028 (a line break to str.splitlines, not to records.log)."""
    sid = f"s{rng.randrange(40):04d}"
    device = f"rtu-{rng.randrange(6)}"
    kind = rng.choice(["login", "session.request", "session.approve", "session.open", "session.close", "lane.evidence"])
    body: dict = {"session_id": sid, "user": rng.choice(["zoë", "amir", "東京-ops"]), "device": device, "site": "north-1"}
    if kind == "login":
        body = {"method": "password+totp", "note": 'seq ,"seq":1, \u2028 end'}
    elif kind == "session.request":
        body["decision"] = {"outcome": "allow", "trace": [{"check": f"c{i}", "result": "pass", "seq": i} for i in range(4)]}
    elif kind == "lane.evidence":
        body = {"ident": f"{sid}-1", "bytes_in": rng.randrange(10**6), "flows": rng.randrange(9)}
    return {"v": 1, "seq": seq, "time": rfc3339(at), "clock": "unsynced" if seq % 97 == 0 else "synced",
            "category": "authentication" if kind == "login" else "session", "type": kind, "result": "success",
            "actor": body.get("user"), "actor_id": rng.randrange(1, 9), "subject": sid, "source": "192.0.2.7",
            "reason": None, "session": None if kind == "login" else sid, "device": device if kind != "lane.evidence" else None,
            "body": body}


def make_chain(n: int = N_RECORDS, seed: int = 1) -> list[Rec]:
    rng = random.Random(seed)
    t = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
    out, prev = [], GENESIS
    for seq in range(1, n + 1):
        t += timedelta(milliseconds=rng.randint(1, 4000))
        at = t - timedelta(seconds=10) if seq == n // 2 else t  # another replica's clock, a little behind
        line = canonical(event(rng, seq, at))
        leaf = hashlib.sha256(line.encode()).hexdigest()
        out.append(Rec(seq, line, leaf, link(prev, leaf), prev))
        prev = out[-1].hash
    return out


def checkpoint(key: Key, tree_size: int, head_hash: str, time: str = "2026-11-26T12:00:00.000000Z") -> dict:
    statement = canonical({"v": 1, "kind": "wicket.audit.checkpoint", "tree_size": tree_size, "head_hash": head_hash,
                           "time": time, "key_id": key.key_id})
    return {"tree_size": tree_size, "head_hash": head_hash, "key_id": key.key_id, "statement": statement,
            "signature": base64.b64encode(key.sign(statement.encode())).decode()}


def checkpoints_for(chain: list[Rec], key: Key, every: int = EVERY) -> list[dict]:
    sizes = sorted({*range(every, len(chain) + 1, every), len(chain)})
    return [checkpoint(key, size, chain[size - 1].hash, f"2026-11-26T12:{i // 60:02d}:{i % 60:02d}.000000Z")
            for i, size in enumerate(sizes)]


def record_lines(chain: list[Rec], first: int, last: int, redact: set[int]) -> bytes:
    return b"".join((f"{r.seq} {r.hash} ={r.leaf}\n" if r.seq in redact else f"{r.seq} {r.hash} {r.line}\n").encode()
                    for r in chain[first - 1:last])


def bundle_files(chain: list[Rec], cps: list[dict], key: Key, first: int, last: int, redact: set[int] = frozenset(),
                 keys: list[dict] | None = None) -> dict[str, bytes]:
    """The six files of a bundle of records first..last, following the format in verify's docstring."""
    log = record_lines(chain, first, last, redact)
    cps_bytes = b"".join((canonical(c) + "\n").encode() for c in cps if first - 1 <= c["tree_size"] <= last)
    keys_bytes = json.dumps({"keys": keys or [key.entry()]}, indent=1).encode()
    readme = b"a bundle made by hand for the verifier's tests\n"
    manifest = {
        "format": "wicket.audit.bundle", "version": 1,
        "scope": {"from": None, "to": None, "device": None, "session": None, "carried_sessions": []},
        "first_seq": first, "base_hash": chain[first - 2].hash if first > 1 else GENESIS, "last_seq": last,
        "head_hash": chain[last - 1].hash,
        "records": {"total": last - first + 1, "full": last - first + 1 - len(redact), "redacted": len(redact)},
        "checkpoints": cps_bytes.count(b"\n"),
        "files": {n: hashlib.sha256(d).hexdigest() for n, d in
                  (("README.txt", readme), ("keys.json", keys_bytes), ("checkpoints.jsonl", cps_bytes), ("records.log", log))},
        "exported_at": "2026-11-27T09:00:00.000000Z", "exported_by": "tests", "key_id": key.key_id,
    }
    manifest_bytes = json.dumps(manifest, indent=1).encode()
    return {"README.txt": readme, "manifest.json": manifest_bytes,
            "manifest.sig": base64.b64encode(key.sign(manifest_bytes)) + b"\n",
            "keys.json": keys_bytes, "checkpoints.jsonl": cps_bytes, "records.log": log}


def pack(files: dict[str, bytes], path, *, gz: bool = False, order=verify.MEMBERS, folder: str = "bundle") -> str:
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name in order:
            if name in files:
                info = tarfile.TarInfo(f"{folder}/{name}")
                info.size = len(files[name])
                tar.addfile(info, io.BytesIO(files[name]))
    return str(path)


@pytest.fixture(scope="module")
def world():
    key = Key(1)
    chain = make_chain()
    cps = checkpoints_for(chain, key)
    rng = random.Random(5)
    redact = {s for s in range(FIRST, N_RECORDS + 1) if rng.random() < 0.25} - {N_RECORDS // 2}
    return key, chain, cps, redact


# ---- clean bundles pass ----------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("deep", [False, True])
def test_a_clean_bundle_passes(world, tmp_path, gz, deep):
    key, chain, cps, redact = world
    path = pack(bundle_files(chain, cps, key, FIRST, N_RECORDS, redact), tmp_path / "b.tar", gz=gz)
    report = verify_bundle(path, [key.key_id], deep=deep)
    assert report.ok, report.text()
    assert (report.first_seq, report.last_seq, report.head_hash) == (FIRST, N_RECORDS, chain[-1].hash)
    assert (report.records, report.redacted, report.full) == (300, len(redact), 300 - len(redact))
    assert report.checkpoints == 7  # 100 (the base), 150, …, 400
    assert report.anchored_start and report.anchored_end and report.keys_pinned
    assert not any("pinned" in w for w in report.warnings)
    unsynced = sum(1 for r in chain[FIRST - 1:] if r.seq not in redact and '"clock":"unsynced"' in r.line)
    assert report.clock["unsynced"] == unsynced > 0
    assert any("unsynchronised" in w for w in report.warnings)
    assert any("backwards" in n and f"record {N_RECORDS // 2}" in n for n in report.notes), report.notes


def test_a_whole_chain_from_genesis_without_redaction_passes_unpinned_with_a_warning(world, tmp_path):
    key, chain, cps, _ = world
    report = verify_bundle(pack(bundle_files(chain, cps, key, 1, N_RECORDS), tmp_path / "b.tar"))
    assert report.ok, report.text()
    assert report.first_seq == 1 and report.anchored_start and report.checkpoints == 8
    assert verify.UNPINNED in report.warnings and not report.keys_pinned


def test_members_in_another_order_and_a_public_key_as_trust(world, tmp_path):
    key, chain, cps, redact = world
    files = bundle_files(chain, cps, key, FIRST, N_RECORDS, redact)
    path = pack(files, tmp_path / "b.tar", order=tuple(reversed(verify.MEMBERS)))  # records.log first: spooled
    assert verify_bundle(path, [key.public_key_b64]).ok


def test_a_key_that_is_not_trusted_fails_everything_it_signed(world, tmp_path):
    key, chain, cps, redact = world
    path = pack(bundle_files(chain, cps, key, FIRST, N_RECORDS, redact), tmp_path / "b.tar")
    report = verify_bundle(path, [Key(2).key_id])
    assert not report.ok
    assert {p.where for p in report.problems} == {"checkpoint", "manifest"}
    assert all("not trusted" in p.message for p in report.problems)
    with pytest.raises(verify.TrustError):
        verify_bundle(path, ["not-a-key"])


def test_an_empty_range_at_a_checkpoint_verifies(world, tmp_path):
    key, chain, cps, _ = world
    files = bundle_files(chain, cps, key, 201, 200)
    report = verify_bundle(pack(files, tmp_path / "b.tar"), [key.key_id])
    assert report.ok, report.text()
    assert report.records == 0 and report.head_hash == chain[199].hash and report.anchored_start


def test_bundle_events_yields_the_full_records_with_their_hash(world, tmp_path):
    key, chain, cps, redact = world
    path = pack(bundle_files(chain, cps, key, FIRST, N_RECORDS, redact), tmp_path / "b.tar", gz=True)
    events = list(verify.bundle_events(path))
    assert [e["seq"] for e in events] == [s for s in range(FIRST, N_RECORDS + 1) if s not in redact]
    assert events[0]["hash"] == chain[events[0]["seq"] - 1].hash


def test_report_renders_as_text_and_json(world, tmp_path):
    key, chain, cps, redact = world
    files = bundle_files(chain, cps, key, FIRST, N_RECORDS, redact)
    files["records.log"] = files["records.log"].replace(b"\n", b"", 1)
    report = verify_bundle(pack(files, tmp_path / "b.tar"), [key.key_id])
    assert "FAILED" in report.text() and "record 101" in report.text()
    doc = json.loads(json.dumps(report.as_dict()))
    assert doc["ok"] is False and doc["problems"][0]["seq"] == 101 and doc["problems"][0]["where"] == "record"


# ---- verify_records: the live database's rows ----------------------------------------------------------


@dataclass
class Row:
    seq: int
    hash: str
    line: str | None
    leaf: str
    prev_hash: str


def test_rows_verify_from_genesis_and_their_stored_leaf_and_prev_hash_count(world):
    key, chain, cps, _ = world
    rows = [Row(r.seq, r.hash, r.line, r.leaf, r.prev_hash) for r in chain]
    report = verify_records(rows, cps, [key.entry()], expected_head=(N_RECORDS, chain[-1].hash), trusted_keys=[key.key_id])
    assert report.ok, report.text()
    assert report.checkpoints == 8 and report.anchored_end

    rows[10] = replace(rows[10], prev_hash="1" * 64)
    rows[20] = replace(rows[20], leaf="2" * 64)
    report = verify_records(rows, cps, {key.key_id: key.public_key_b64})
    assert [(p.seq, "prev_hash" in p.message or "leaf" in p.message) for p in report.problems] == [(11, True), (21, True)]


def test_rows_after_the_last_checkpoint_are_a_warning_and_a_missing_head_is_a_problem(world):
    key, chain, cps, _ = world
    rows = [(r.seq, r.hash, r.line) for r in chain[:390]]
    report = verify_records(rows, cps[:-1], [key.entry()])
    assert report.ok and not report.anchored_end
    assert any("350 up to 390" in w for w in report.warnings), report.warnings
    report = verify_records(rows, cps, [key.entry()], expected_head=(N_RECORDS, chain[-1].hash))
    assert report.problems[0].seq == 391 and "missing at the end" in report.problems[0].message


def test_a_run_that_starts_mid_chain_takes_its_base(world):
    key, chain, cps, _ = world
    lines = record_lines(chain, 151, 300, set()).splitlines()
    inside = [c for c in cps if c["tree_size"] <= 300]
    report = verify_records(lines, inside, [key.entry()], base=(151, chain[149].hash))
    assert report.ok and report.anchored_start and report.anchored_end and report.checkpoints == 4
    assert any("lies before the records" in n for n in report.notes)
    report = verify_records(lines, inside, [key.entry()], base=(151, chain[150].hash))
    assert report.problems[0].seq == 151
    report = verify_records(lines, inside, [key.entry()], base=None)  # the start taken from the first line
    assert report.ok and report.first_seq == 151 and not report.anchored_start and report.anchored_end
    report = verify_records(lines[:5] + lines[6:], inside, [key.entry()], base=None)
    assert report.problems[0].seq == 156
    report = verify_records(lines, cps, [key.entry()], base=(151, chain[149].hash))  # one covers 301..400
    assert [(p.seq, "301..400 are missing" in p.message) for p in report.problems] == [(301, True)]


def test_a_rewritten_chain_is_caught_by_the_checkpoint_after_it(world):
    """Change a record and recompute every hash after it: each link holds, the signed head does not."""
    key, chain, cps, _ = world
    forged, prev = [], chain[FIRST - 2].hash
    for r in chain[FIRST - 1:]:
        line = r.line.replace('"result":"success"', '"result":"failure"') if r.seq == 222 else r.line
        leaf = hashlib.sha256(line.encode()).hexdigest()
        forged.append(Rec(r.seq, line, leaf, link(prev, leaf), prev))
        prev = forged[-1].hash
    lines = [f"{r.seq} {r.hash} {r.line}" for r in forged]
    report = verify_records(lines, cps, [key.entry()], base=(FIRST, chain[FIRST - 2].hash))
    assert report.problems and report.problems[0].where == "checkpoint" and report.problems[0].tree_size == 250
    assert "201..250" in report.problems[0].message
    assert not any(p.where == "record" for p in report.problems)


# ---- 1 000 single mutations ----------------------------------------------------------------------------


def line_spans(log: bytes) -> list[tuple[int, int]]:
    """(start, end) of each line, the newline included."""
    spans, start = [], 0
    while start < len(log):
        end = log.index(b"\n", start) + 1
        spans.append((start, end))
        start = end
    return spans


def mutate(rng: random.Random, files: dict[str, bytes], key: Key, chain: list[Rec], other: Key):
    """One random mutation: (what it did, the changed files, the first bad record's seq for a records.log
    mutation, the tree size of a checkpoint replaced by a wrong one)."""
    files = dict(files)
    log = files["records.log"]
    spans = line_spans(log)
    lines = [log[a:b] for a, b in spans]
    kind = rng.choices(["flip", "delete", "swap", "repeat", "truncate", "checkpoint", "file"],
                       weights=[36, 12, 12, 4, 12, 12, 12])[0]
    if kind == "flip":
        at = rng.randrange(len(log))
        new = rng.choice([b for b in range(256) if b != log[at]])
        files["records.log"] = log[:at] + bytes([new]) + log[at + 1:]
        return f"flip byte {at} to {new}", files, FIRST + next(i for i, (a, b) in enumerate(spans) if a <= at < b), None
    if kind == "delete":
        i = rng.randrange(len(lines))
        files["records.log"] = b"".join(lines[:i] + lines[i + 1:])
        return f"delete line {i}", files, FIRST + i, None
    if kind == "swap":
        i, j = sorted(rng.sample(range(len(lines)), 2))
        lines[i], lines[j] = lines[j], lines[i]
        files["records.log"] = b"".join(lines)
        return f"swap lines {i} and {j}", files, FIRST + i, None
    if kind == "repeat":
        i = rng.randrange(len(lines))
        files["records.log"] = b"".join(lines[:i + 1] + [lines[i]] + lines[i + 1:])
        return f"repeat line {i}", files, FIRST + i + 1, None
    if kind == "truncate":
        at = rng.randrange(len(log))
        files["records.log"] = log[:at]
        return f"cut at byte {at}", files, FIRST + next(i for i, (a, b) in enumerate(spans) if a <= at < b), None
    if kind == "checkpoint":
        cps = files["checkpoints.jsonl"].splitlines(keepends=True)
        i = rng.randrange(len(cps))
        old = json.loads(cps[i])
        how = rng.choice(["other key", "wrong head", "bad signature", "flip"])
        if how == "other key":
            new = checkpoint(other, old["tree_size"], old["head_hash"])
        elif how == "wrong head":
            new = checkpoint(key, old["tree_size"], chain[old["tree_size"] - 2].hash)
        elif how == "bad signature":
            sig = bytearray(base64.b64decode(old["signature"]))
            sig[rng.randrange(64)] ^= 1 << rng.randrange(8)
            new = {**old, "signature": base64.b64encode(bytes(sig)).decode()}
        else:
            text = bytearray(cps[i])
            at = rng.randrange(len(text) - 1)
            text[at] = rng.choice([b for b in b"0123456789abcdef{}\":, x" if b != text[at]])
            cps[i] = bytes(text)
            new = None
        if new is not None:
            cps[i] = (canonical(new) + "\n").encode()
        files["checkpoints.jsonl"] = b"".join(cps)
        return f"checkpoint line {i}: {how}", files, None, old["tree_size"] if new is not None else None
    name = rng.choice(["manifest.json", "manifest.sig", "keys.json", "README.txt", "checkpoints.jsonl"])
    data = bytearray(files[name])
    at = rng.randrange(len(data))
    data[at] = rng.choice([b for b in range(256) if b != data[at]])
    files[name] = bytes(data)
    return f"{name}: flip byte {at}", files, None, None


def test_one_thousand_single_mutations_are_each_caught_and_named(world, tmp_path):
    key, chain, cps, redact = world
    seed = int(os.environ.get("WICKET_AUDIT_MUTATION_SEED", random.SystemRandom().randrange(2**32)))
    print(f"mutation seed: {seed} (replay with WICKET_AUDIT_MUTATION_SEED={seed})")
    rng = random.Random(seed)
    clean = bundle_files(chain, cps, key, FIRST, N_RECORDS, redact)
    assert verify_bundle(pack(clean, tmp_path / "clean.tar"), [key.key_id]).ok
    other = Key(3)
    kinds: dict[str, int] = {}
    for n in range(MUTATIONS):
        what, files, first_bad, replaced = mutate(rng, clean, key, chain, other)
        kinds[what.split(" ")[0]] = kinds.get(what.split(" ")[0], 0) + 1
        path = pack(files, tmp_path / "m.tar")
        deep = n % 10 == 0
        report = verify_bundle(path, [key.key_id], deep=deep)
        context = f"mutation {n} (seed {seed}): {what}\n{report.text(limit=8)}"
        assert not report.ok, context
        if first_bad is not None:
            first = report.problems[0]
            assert (first.where, first.seq) == ("record", first_bad), context
        if replaced is not None:
            assert report.problems[0].where == "checkpoint", context
            assert any(p.where == "checkpoint" and p.tree_size == replaced for p in report.problems), context
    print("mutations by kind:", kinds)
    assert len(kinds) >= 7


def test_records_hidden_or_a_checkpoint_dropped_fail_on_the_manifest(world, tmp_path):
    """Changes that keep every link: a full record turned into its leaf, a valid checkpoint left out."""
    key, chain, cps, redact = world
    files = bundle_files(chain, cps, key, FIRST, N_RECORDS, redact)
    hidden = dict(files, **{"records.log": record_lines(chain, FIRST, N_RECORDS, redact | {123})})
    report = verify_bundle(pack(hidden, tmp_path / "h.tar"), [key.key_id])
    assert not report.ok and {p.file for p in report.problems} == {"records.log", "manifest.json"}
    lines = files["checkpoints.jsonl"].splitlines(keepends=True)
    dropped = dict(files, **{"checkpoints.jsonl": b"".join(lines[:2] + lines[3:])})
    report = verify_bundle(pack(dropped, tmp_path / "d.tar"), [key.key_id])
    assert not report.ok and any("checkpoints" in p.message for p in report.problems)


def test_structure_problems_are_reported_not_raised(world, tmp_path):
    key, chain, cps, redact = world
    files = bundle_files(chain, cps, key, FIRST, N_RECORDS, redact)
    missing = {k: v for k, v in files.items() if k != "keys.json"}
    report = verify_bundle(pack(missing, tmp_path / "m.tar"), [key.key_id])
    assert any(p.where == "bundle" and "keys.json" in p.message for p in report.problems)
    extra = pack(files, tmp_path / "e.tar", order=(*verify.MEMBERS, "records.log"))
    assert any("twice" in p.message for p in verify_bundle(extra, [key.key_id]).problems)
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    report = verify_bundle(tmp_path / "junk.tar", [key.key_id])
    assert not report.ok and report.problems[0].where == "bundle"
    gz = pack(files, tmp_path / "g.tar.gz", gz=True)
    data = open(gz, "rb").read()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    assert not verify_bundle(tmp_path / "cut.tar.gz", [key.key_id]).ok


def test_a_checkpoint_signed_after_its_key_was_retired_is_a_warning(world):
    key, chain, cps, _ = world
    retired = {**key.entry(), "retired_at": "2026-11-26T12:00:03.000000Z"}
    report = verify_records([(r.seq, r.hash, r.line) for r in chain], cps, [retired])
    assert report.ok, report.text()
    late = [w for w in report.warnings if "retired" in w]
    after = [c["tree_size"] for c in cps if json.loads(c["statement"])["time"] > retired["retired_at"]]
    assert after and [int(w.split("tree size ")[1].split(" ")[0]) for w in late] == after


def test_fields_nested_in_the_body_do_not_stand_in_for_the_records_own():
    """A body may hold "clock", "seq" and "session" keys of its own: the fast checks must read the record's."""
    inner = {"clock": "synced", "seq": 2, "session": "x", "time": "2030-01-01T00:00:00.000000Z"}
    lines, prev = [], GENESIS
    for seq, own_seq, clock in ((1, 1, "unsynced"), (2, 5, "synced"), (3, 3, "synced")):
        obj = {"v": 1, "seq": own_seq, "time": f"2026-11-26T08:00:0{seq}.000000Z", "clock": clock, "category": "agent",
               "type": "lane.evidence", "result": "success", "actor": "agent:n", "actor_id": None, "subject": None,
               "source": None, "reason": None, "session": None, "device": None, "body": {"inner": inner}}
        line = canonical(obj)
        leaf = hashlib.sha256(line.encode()).hexdigest()
        prev = link(prev, leaf)
        lines.append(f"{seq} {prev} {line}")
    for deep in (False, True):
        report = verify_records(lines, deep=deep)
        assert [(p.seq, '"seq":5' in p.message) for p in report.problems] == [(2, True)], report.text()
        if not deep:
            assert report.clock == {"unsynced": 1, "synced": 2, "unknown": 0}
        assert report.last_time == "2026-11-26T08:00:03.000000Z"


def test_the_verifier_runs_alone_copied_out_of_the_tree(world, tmp_path):
    """verify.py imports only the standard library and cryptography, and runs as a script."""
    import ast
    import shutil
    import subprocess
    import sys

    source = verify.__file__
    imported = set()
    for node in ast.walk(ast.parse(open(source).read())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." if node.level else node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"cryptography"}, imported
    key, chain, cps, redact = world
    files = bundle_files(chain, cps, key, FIRST, N_RECORDS, redact)
    good = pack(files, tmp_path / "good.tar.gz", gz=True)
    files["records.log"] = files["records.log"].replace(b"\n", b"\n\n", 7)
    bad = pack(files, tmp_path / "bad.tar.gz", gz=True)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(source, alone / "verify.py")
    run = [sys.executable, "verify.py"]
    done = subprocess.run([*run, good, "--trust", key.key_id], cwd=alone, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("audit verification OK"), done.stdout + done.stderr
    done = subprocess.run([*run, bad, "--trust", key.key_id, "--json"], cwd=alone, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and json.loads(done.stdout)["problems"][0]["seq"] == FIRST + 1, done.stdout[:2000]
    done = subprocess.run([*run, good, "--trust", "nonsense"], cwd=alone, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--trust" in done.stderr


def test_each_kind_of_damage_is_named_in_words(world):
    """The first problem says what happened, not only where."""
    key, chain, cps, _ = world
    base = (FIRST, chain[FIRST - 2].hash)
    inside = [c for c in cps if c["tree_size"] <= N_RECORDS]
    good = record_lines(chain, FIRST, N_RECORDS, set()).splitlines()

    def first(lines):
        report = verify_records(lines, inside, [key.entry()], base=base)
        return report.problems[0].seq, report.problems[0].message

    k = 121 - FIRST
    h = good[k].split(b" ")[1]
    cases = {
        "line": good[:k] + [good[k].replace(b'"v":1', b'"v":2')] + good[k + 1:],
        "hash": good[:k] + [good[k].replace(h, bytes(reversed(h)))] + good[k + 1:],
        "number": good[:k] + [b"171" + good[k][3:]] + good[k + 1:],
        "missing": good[:k] + good[k + 1:],
        "repeat": good[:k + 1] + [good[k]] + good[k + 1:],
        "swap": good[:k] + [good[k + 1], good[k]] + good[k + 2:],
        "cut": good[:k],
    }
    assert first(cases["line"]) == (121, "its line was changed: it no longer hashes to the chain hash stored with it "
                                          "(the next record chains from that stored hash)")
    assert first(cases["hash"])[0] == 121 and "stored chain hash was changed" in first(cases["hash"])[1]
    assert first(cases["number"])[0] == 121 and "the line has number 171" in first(cases["number"])[1]
    assert first(cases["missing"]) == (121, "record 121 is missing: the line where record 121 belongs holds record 122 "
                                            "(removed, or moved)")
    assert first(cases["repeat"]) == (122, "the line where record 122 belongs repeats record 121")
    report = verify_records(cases["swap"], inside, [key.entry()], base=base)
    assert [p.seq for p in report.problems][:2] == [121, 122] and "came earlier" in report.problems[1].message
    assert first(cases["cut"]) == (121, "records 121..400 are missing at the end: a signed checkpoint covers 400 "
                                        "records, the records stop at 120 (cut)")
