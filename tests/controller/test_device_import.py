"""CSV import and export of device passports (POST /devices/import, GET /devices/export).

The issue's acceptance check: an import of 10 000 devices with a few bad rows reports each bad row
(line, asset ID, field) and writes nothing; the clean file then imports, and the API counts 10 000.
Also: duplicates inside the file and against the database, header and cell-count errors, update mode,
dry runs, export → import round trips, site scope, events. Every test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import hashlib
import io
import time
from datetime import datetime

from .helpers import eid_for, iccid_for, iso

API = "/api/v1"
HEADER = "asset_id,device_type,site,addresses,mac,iccid,eid,imsis,firmware,lifecycle,last_seen,ports,description"
TYPES = ("substation-rtu", "meter-concentrator", "der-gateway")
PORTS = {"substation-rtu": "iec104=2405", "meter-concentrator": "dlms=4060", "der-gateway": ""}











def row(i: int, *, seen: str = "", **cells) -> dict:
    """Device number i: alternating sites, every column filled."""
    site, net = ("north-1", "10.20") if i % 2 == 0 else ("south-1", "10.30")
    dtype = TYPES[i % 3]
    out = {"asset_id": f"dev-{i:05d}", "device_type": dtype, "site": site,
           "addresses": f"{net}.{i // 250}.{i % 250 + 1}", "mac": f"02:00:00:01:{i // 256:02x}:{i % 256:02x}",
           "iccid": iccid_for(i), "eid": eid_for(i), "imsis": f"26201{i:010d}", "firmware": f"fw {i % 7}.0",
           "lifecycle": "active", "last_seen": seen, "ports": PORTS[dtype], "description": f"cabinet {i}, \"bay\" {i % 9}"}
    out.update(cells)
    return out


def to_csv(rows: list[dict], header: str = HEADER) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header.split(","))
    for r in rows:
        writer.writerow([r.get(c, "") for c in header.split(",")])
    return out.getvalue()


def setup(ctl) -> None:
    ctl.apply_policy()
    ctl.add_site("north-1", lan_networks=["10.20.0.0/16"])
    ctl.add_site("south-1", lan_networks=["10.30.0.0/16"])


def do_import(ctl, text: str, headers: dict | None = None, **flags):
    return ctl.client.post(f"{API}/devices/import", json={"csv": text, **flags}, headers=headers or ctl.step_up_admin())


def bad_rows(res) -> list[tuple[int, str | None, str]]:
    assert res.status_code == 422, res.text
    body = res.json()
    assert body["error"] == "import_rejected", body
    return [(r["line"], r["asset_id"], r["field"]) for r in body["rows"]]


def count_devices(ctl, **params) -> list[str]:
    """Every asset ID the admin sees through the API, page by page."""
    ids, after = [], None
    while True:
        res = ctl.client.get(f"{API}/devices", params={"limit": 1000, **params, **({"after": after} if after else {})},
                             headers=ctl.auth(ctl.admin_token()))
        assert res.status_code == 200, res.text
        page = res.json()
        ids += [d["asset_id"] for d in page["devices"]]
        if page["next_after"] is None:
            return ids
        after = page["next_after"]


def imports(ctl) -> list[dict]:
    return [e for e in ctl.events() if e["type"] == "device.import"]


def person_headers(ctl, person, step_up: bool = True) -> dict:
    ctl.advance(30)
    token = ctl.login(person)
    if not step_up:
        return ctl.auth(token)
    ctl.advance(30)
    return ctl.auth(token, ctl.code(person))


# ---- the acceptance check ----


def test_ten_thousand_devices_with_bad_rows_write_nothing_then_the_clean_file_imports(ctl):
    setup(ctl)
    seen = iso(ctl.t - 600)
    rows = [row(i, seen=seen) for i in range(10_000)]
    clean = to_csv(rows)
    bad = [dict(r) for r in rows]
    good_iccid = bad[1234]["iccid"]
    bad[1234]["iccid"] = good_iccid[:-1] + str((int(good_iccid[-1]) + 1) % 10)  # line 1236
    bad[2000]["device_type"] = "toaster"                                           # line 2002
    bad[4321]["addresses"] = "10.99.0.1"                                           # line 4323: outside south-1
    bad[5000]["asset_id"] = bad[10]["asset_id"]                                    # line 5002: dev-00010 again
    bad[6000]["ports"] = "telnet=23"                                               # line 6002
    bad[7000]["eid"] = bad[7001]["eid"]                                            # lines 7002/7003: one EID twice
    bad[8888]["mac"] = "01:00:5e:00:00:01"                                         # line 8890: multicast
    bad[9999]["last_seen"] = iso(ctl.t + 86400)                                    # line 10001: future
    text = to_csv(bad)

    started = time.perf_counter()
    res = do_import(ctl, text)
    rejected_s = time.perf_counter() - started
    assert bad_rows(res) == [
        (1236, "dev-01234", "iccid"),
        (2002, "dev-02000", "device_type"),
        (4323, "dev-04321", "addresses"),
        (5002, "dev-00010", "asset_id"),
        (6002, "dev-06000", "ports"),
        (7003, "dev-07001", "eid"),
        (8890, "dev-08888", "mac"),
        (10001, "dev-09999", "last_seen"),
    ]
    detail = res.json()["detail"]
    assert detail.startswith("8 problem(s), nothing was written")
    errors = {r["line"]: r["error"] for r in res.json()["rows"]}
    assert "check digit" in errors[1236] and "also on line 12" in errors[5002] and "also on line 7002" in errors[7003]
    assert count_devices(ctl) == [] and imports(ctl) == []

    started = time.perf_counter()
    res = do_import(ctl, clean)
    imported_s = time.perf_counter() - started
    assert res.status_code == 200, res.text
    assert res.json() == {"created": 10_000, "updated": 0, "unchanged": 0, "dry_run": False}
    ids = count_devices(ctl)
    assert len(ids) == 10_000 and ids == sorted(r["asset_id"] for r in rows)
    assert len(count_devices(ctl, site="north-1")) == 5000
    assert ctl.client.get(f"{API}/sites/south-1", headers=ctl.auth(ctl.admin_token())).json()["devices"] == 5000
    dev = ctl.client.get(f"{API}/devices/dev-04321", headers=ctl.auth(ctl.admin_token())).json()
    assert (dev["iccid"], dev["eid"], dev["site"], dev["revision"]) == (iccid_for(4321), eid_for(4321), "south-1", 1)
    assert dev["description"] == 'cabinet 4321, "bay" 1' and dev["imsis"] == ["262010000004321"]
    [event] = imports(ctl)
    assert event["category"] == "inventory" and event["body"]["created"] == 10_000
    assert event["body"]["sha256"] == hashlib.sha256(clean.encode()).hexdigest()
    print(f"\n10 000-row import: rejected in {rejected_s:.2f} s, imported in {imported_s:.2f} s")
    assert rejected_s < 60 and imported_s < 60


# ---- duplicates ----


def test_duplicates_inside_the_file_and_against_the_database(ctl):
    setup(ctl)
    ctl.add_device("old-1", "north-1", iccid=iccid_for(900), eid=eid_for(900), addresses=["10.20.9.1"])
    rows = [row(0), row(1), row(2, asset_id="dev-00000"), row(3, iccid=iccid_for(1)), row(4, iccid=iccid_for(900)),
            row(5, eid=eid_for(900)), row(6, asset_id="old-1"), row(7)]
    res = do_import(ctl, to_csv(rows))
    assert bad_rows(res) == [(4, "dev-00000", "asset_id"), (5, "dev-00003", "iccid"), (6, "dev-00004", "iccid"),
                             (7, "dev-00005", "eid"), (8, "old-1", "asset_id")]
    errors = [r["error"] for r in res.json()["rows"]]
    assert errors[0] == "also on line 2"
    assert "also on line 3" in errors[1]
    assert "already bound to old-1" in errors[2] and "already bound to old-1" in errors[3]
    assert "exists already" in errors[4]
    assert count_devices(ctl) == ["old-1"]
    # In update mode an existing asset ID is no error, but a SIM bound to another device still is.
    res = do_import(ctl, to_csv([row(6, asset_id="old-1", addresses="10.20.9.2", iccid=iccid_for(900), eid=eid_for(900))]),
                    update=True)
    assert res.status_code == 200 and res.json()["updated"] == 1, res.text
    res = do_import(ctl, to_csv([row(8, iccid=iccid_for(900))]), update=True)
    assert bad_rows(res) == [(2, "dev-00008", "iccid")]


# ---- the file's shape ----


def test_header_errors_name_the_columns(ctl):
    setup(ctl)
    body = to_csv([row(0)])[len(HEADER) + 1:]
    for header, words in [
        (HEADER + ",colour", "unknown column(s) colour"),
        (HEADER.replace("site,", ""), "missing column(s) site"),
        (HEADER.replace("asset_id,", ""), "missing column(s) asset_id"),
        (HEADER + ",mac", "column(s) given twice: mac"),
    ]:
        res = do_import(ctl, header + "\n" + body)
        assert res.status_code == 422 and res.json()["error"] == "invalid", res.text
        assert res.json()["detail"].startswith("line 1: ") and words in res.json()["detail"], res.text
    res = do_import(ctl, "")
    assert res.status_code == 422 and "empty" in res.json()["detail"]
    assert count_devices(ctl) == []
    # The columns may come in any order, and optional ones may be left out.
    res = do_import(ctl, "site,addresses,asset_id,device_type\nnorth-1,10.20.0.5;10.20.0.6,a-1,substation-rtu\n")
    assert res.status_code == 200 and res.json()["created"] == 1, res.text
    dev = ctl.client.get(f"{API}/devices/a-1", headers=ctl.auth(ctl.admin_token())).json()
    assert dev["addresses"] == ["10.20.0.5", "10.20.0.6"] and dev["lifecycle"] == "provisioned" and dev["mac"] is None


def test_wrong_cell_counts_and_bad_cells_are_row_errors(ctl):
    setup(ctl)
    text = to_csv([row(0), row(1), row(2)])
    lines = text.splitlines()
    lines[2] += ",extra"                                    # row 2: one cell too many
    lines[3] = ",".join(lines[3].split(",")[:5])            # row 3: too few
    lines.append("")                                         # blank lines are skipped
    lines.append("dev-00009,substation-rtu,north-1,10.20.0.9,,,,,,,,iec104,")  # ports without '='
    res = do_import(ctl, "\n".join(lines) + "\n")
    assert bad_rows(res) == [(3, "dev-00001", "(row)"), (4, "dev-00002", "(row)"), (6, "dev-00009", "ports")]
    assert "14 cells, the header has 13" in res.json()["rows"][0]["error"]
    assert count_devices(ctl) == []
    # A spreadsheet's export (byte order mark, CRLF) reads the same.
    res = do_import(ctl, "\ufeff" + to_csv([row(0), row(2)]).replace("\n", "\r\n"))
    assert res.status_code == 200 and res.json()["created"] == 2, res.text


# ---- update, dry run, round trip ----


def test_update_mode_counts_created_updated_unchanged(ctl):
    setup(ctl)
    seen = iso(ctl.t - 3600)
    rows = [row(i, seen=seen) for i in range(6)]
    assert do_import(ctl, to_csv(rows)).json()["created"] == 6
    changed = [dict(r) for r in rows]
    changed[0]["firmware"] = "fw 9.9"
    changed[1]["lifecycle"] = "quarantined"
    changed[2]["last_seen"] = iso(ctl.t)  # posture only: updated, same revision
    changed += [row(6), row(7)]
    res = do_import(ctl, to_csv(changed))
    assert bad_rows(res) == [(n, f"dev-{n - 2:05d}", "asset_id") for n in range(2, 8)]  # without update: existing rows are errors
    res = do_import(ctl, to_csv(changed), update=True)
    assert res.status_code == 200, res.text
    assert res.json() == {"created": 2, "updated": 3, "unchanged": 3, "dry_run": False}
    get = lambda a: ctl.client.get(f"{API}/devices/{a}", headers=ctl.auth(ctl.admin_token())).json()  # noqa: E731
    assert (get("dev-00000")["firmware"], get("dev-00000")["revision"]) == ("fw 9.9", 2)
    assert (get("dev-00001")["lifecycle"], get("dev-00001")["revision"]) == ("quarantined", 2)
    assert get("dev-00002")["revision"] == 1
    assert datetime.fromisoformat(get("dev-00002")["last_seen"]) == datetime.fromisoformat(changed[2]["last_seen"])
    assert get("dev-00003")["revision"] == 1 and get("dev-00007")["revision"] == 1
    assert [(e["body"]["created"], e["body"]["updated"], e["body"]["unchanged"]) for e in imports(ctl)] == [(6, 0, 0), (2, 3, 3)]
    res = do_import(ctl, to_csv(changed), update=True)
    assert res.json() == {"created": 0, "updated": 0, "unchanged": 8, "dry_run": False}


def test_dry_run_writes_nothing(ctl):
    setup(ctl)
    ctl.add_device("dev-00000", "north-1", addresses=["10.20.0.1"], firmware="old")
    text = to_csv([row(i) for i in range(5)])
    before = len(ctl.events())
    res = do_import(ctl, text, update=True, dry_run=True)
    assert res.status_code == 200, res.text
    assert res.json() == {"created": 4, "updated": 1, "unchanged": 0, "dry_run": True}
    assert count_devices(ctl) == ["dev-00000"]
    dev = ctl.client.get(f"{API}/devices/dev-00000", headers=ctl.auth(ctl.admin_token())).json()
    assert (dev["firmware"], dev["revision"]) == ("old", 1)
    assert imports(ctl) == [] and not [e for e in ctl.events()[before:] if e["category"] == "inventory"]
    # A dry run with problems reports them just the same.
    res = do_import(ctl, to_csv([row(1, device_type="toaster")]), dry_run=True)
    assert bad_rows(res) == [(2, "dev-00001", "device_type")]
    assert do_import(ctl, text, update=True).json() == {"created": 4, "updated": 1, "unchanged": 0, "dry_run": False}


def test_export_then_import_with_update_changes_nothing(ctl):
    setup(ctl)
    seen = iso(ctl.t - 60)
    rows = [row(i, seen=seen if i % 2 else "") for i in range(12)]
    rows[3]["description"] = "line, with \"quotes\"; and semicolons"
    rows[4].update(mac="", iccid="", eid="", imsis="", firmware="", ports="", description="")
    rows[5]["imsis"] = "262010000000005;262010000000099"
    assert do_import(ctl, to_csv(rows)).json()["created"] == 12
    exported = ctl.client.get(f"{API}/devices/export", headers=ctl.auth(ctl.admin_token()))
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    lines = exported.text.splitlines()
    assert lines[0] == HEADER and len(lines) == 13
    parsed = list(csv.DictReader(io.StringIO(exported.text)))
    assert parsed[3]["description"] == rows[3]["description"] and parsed[5]["imsis"] == rows[5]["imsis"]
    res = do_import(ctl, exported.text, update=True)
    assert res.status_code == 200, res.text
    assert res.json() == {"created": 0, "updated": 0, "unchanged": 12, "dry_run": False}
    south = ctl.client.get(f"{API}/devices/export", params={"site": "south-1"}, headers=ctl.auth(ctl.admin_token())).text
    assert [r["site"] for r in csv.DictReader(io.StringIO(south))] == ["south-1"] * 6


# ---- who may import ----


def test_a_site_admin_imports_only_for_their_own_sites(ctl):
    setup(ctl)
    alice = ctl.add_user("alice", roles=[("site_admin", "north-1")])
    eng = ctl.add_user("eng", roles=[("engineer", "north-1")])
    text = to_csv([row(0), row(1), row(2)])  # north, south, north
    res = do_import(ctl, text, headers=person_headers(ctl, alice))
    assert bad_rows(res) == [(3, "dev-00001", "site")]
    assert "you do not manage site south-1" in res.json()["rows"][0]["error"]
    assert count_devices(ctl) == []
    assert do_import(ctl, text, headers=person_headers(ctl, eng)).status_code == 403
    assert do_import(ctl, text, headers=person_headers(ctl, alice, step_up=False)).status_code == 401
    res = do_import(ctl, to_csv([row(0), row(2)]), headers=person_headers(ctl, alice))
    assert res.status_code == 200 and res.json()["created"] == 2, res.text
    [event] = imports(ctl)
    assert event["actor"] == "alice" and event["body"]["asset_ids"] == ["dev-00000", "dev-00002"]
    # Her export holds her site only; an engineer may not export.
    exported = ctl.client.get(f"{API}/devices/export", headers=person_headers(ctl, alice, step_up=False)).text
    assert [r["asset_id"] for r in csv.DictReader(io.StringIO(exported))] == ["dev-00000", "dev-00002"]
    assert ctl.client.get(f"{API}/devices/export", headers=person_headers(ctl, eng, step_up=False)).status_code == 403


def test_a_site_admin_cannot_move_another_sites_device_by_import(ctl):
    setup(ctl)
    ctl.add_device("dev-00001", "south-1", addresses=["10.30.0.2"])
    alice = ctl.add_user("alice", roles=[("site_admin", "north-1")])
    res = do_import(ctl, to_csv([row(1, site="north-1", addresses="10.20.0.2")]), headers=person_headers(ctl, alice), update=True)
    dev = ctl.client.get(f"{API}/devices/dev-00001", headers=ctl.auth(ctl.admin_token())).json()
    assert dev["site"] == "south-1" and dev["revision"] == 1
    assert res.status_code in (403, 422), res.text


def test_an_import_does_not_name_devices_at_sites_the_importer_cannot_see(ctl):
    setup(ctl)
    ctl.add_device("dev-00001", "south-1", addresses=["10.30.0.2"], iccid=iccid_for(1))
    alice = ctl.add_user("alice", roles=[("site_admin", "north-1")])
    res = do_import(ctl, to_csv([row(0, iccid=iccid_for(1))]), headers=person_headers(ctl, alice))
    assert bad_rows(res) == [(2, "dev-00000", "iccid")]
    assert "already bound to a device at a site you cannot see" in res.text and "dev-00001" not in res.text
    # An admin, who sees every site, is told which device holds it.
    assert "already bound to dev-00001" in do_import(ctl, to_csv([row(0, iccid=iccid_for(1))])).text


def test_an_import_keeps_one_device_per_address_and_site(ctl):
    setup(ctl)
    ctl.add_device("dev-09000", "north-1", addresses=["10.20.0.1"])
    clash_db, clash_file = row(0, addresses="10.20.0.1"), [row(2, addresses="10.20.9.9"), row(4, addresses="10.20.9.9")]
    res = do_import(ctl, to_csv([clash_db, *clash_file, row(1, addresses="10.30.0.1")]))
    assert bad_rows(res) == [(2, "dev-00000", "addresses"), (3, "dev-00002", "addresses"), (4, "dev-00004", "addresses")]
    assert "10.20.0.1 is also the address of dev-09000" in res.text
    assert "10.20.9.9 is also the address of dev-00004" in res.text and "10.20.9.9 is also the address of dev-00002" in res.text
    # The same address at another site is another LAN; and an update may hand an address on within one file.
    ctl.add_site("west-1", lan_networks=["10.20.0.0/16"])
    handed_on = [row(0, addresses="10.20.0.1"), {**row(9000), "asset_id": "dev-09000", "addresses": "10.20.0.3"},
                 row(6, site="west-1", addresses="10.20.0.3")]
    res = do_import(ctl, to_csv(handed_on), update=True)
    assert res.status_code == 200 and res.json()["created"] == 2 and res.json()["updated"] == 1, res.text
    res = do_import(ctl, to_csv([row(8, addresses="10.20.0.3"), row(0, addresses="10.20.0.1")]), update=True)
    assert bad_rows(res) == [(2, "dev-00008", "addresses")] and "also the address of dev-09000" in res.text
