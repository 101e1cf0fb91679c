"""The world bench.policy measures in: an initialised controller (temporary directory; SQLite there or a
PostgreSQL database of its own), its sites and users, a generated policy, device CSV files and requests.
Everything is generated from fixed seeds and a fixed clock, so two runs decide the same requests alike.
"""

from __future__ import annotations

import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_POLICY = REPO / "docs" / "policy-example"
PASSWORD = "correct horse battery staple"
BASE = datetime(2026, 11, 25, 18, 0, tzinfo=UTC)  # the controller's clock (a Wednesday): outcomes repeat run to run
SITES = 24
ZONES = ("UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo", "Australia/Sydney", "America/Los_Angeles")
SITE_WINDOWS = (["weeknights"], ["weekend", "nightly"], ["nightly"], [])
TYPES = ("substation-rtu",) * 4 + ("meter-concentrator",) * 4 + ("der-gateway",) * 2


class Controller:
    """An initialised controller in a temporary directory: SQLite there, or the database at `url`."""

    def __init__(self, url: str | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="wicket-bench-policy-"))
        self.url = url or f"sqlite:///{self.dir}/controller.db"
        self.t = BASE.timestamp()

    def __enter__(self) -> Controller:
        from controller.app import create_app
        from controller.auth import Principal
        from controller.bootstrap import init
        from controller.settings import load

        try:
            settings = load({"WICKET_DATA_DIR": str(self.dir / "data"), "WICKET_DATABASE_URL": self.url})
            enrolment = init(settings, "root", "First Admin", PASSWORD).enrolment
            self.admin_secret = re.search(r"secret=([A-Z2-7]+)", enrolment.otpauth_uri).group(1)
            self.app = create_app(settings, clock=lambda: self.t)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        state = self.app.state
        self.factory = state.auth.factory
        self.policies, self.inventory, self.decisions, self.users = state.policies, state.inventory, state.decisions, state.users
        self.admin = Principal(user_id=self.user_ids()["root"], username="root", kind="internal", roles=(("admin", None),),
                               token_hash="", token_kind="bench", expires_at=BASE + timedelta(days=1))
        return self

    def __exit__(self, *exc) -> None:
        self.app.state.engine.dispose()
        shutil.rmtree(self.dir, ignore_errors=True)

    def populate(self, files: dict[str, str]) -> None:
        """The policy, the sites and the users the requests come from."""
        from controller.inventory_schemas import SiteCreate

        self.apply(files, "bench policy")
        for i in range(SITES):
            self.inventory.create_site(self.admin, SiteCreate(
                name=f"site-{i:02d}", display_name=f"Site {i}", time_zone=ZONES[i % len(ZONES)], tunnel_pool=f"100.64.{i}.0/24",
                port_min=51000, port_max=51999, public_endpoint="203.0.113.1", lan_networks=[f"10.{i}.0.0/16"],
                change_windows=SITE_WINDOWS[i % len(SITE_WINDOWS)]), "bench")
        for username, kind, roles, valid in USERS:
            extra = {"sponsor": "eng-all", "valid_until": BASE + valid} if kind == "contractor" else {}
            self.users.create(self.admin, username=username, display_name=username, password=PASSWORD, kind=kind,
                              roles=roles, source="bench", **extra)

    def apply(self, files: dict[str, str], comment: str) -> None:
        self.policies.apply(self.admin, files, comment, "bench")

    def import_csv(self, text: str, update: bool = False):
        from controller.devicecsv import import_devices

        return import_devices(self.inventory, self.admin, text, update_existing=update, source="bench")

    def http_import(self, text: str) -> tuple[float, dict]:
        """One import through POST /api/v1/devices/import (JSON body, step-up code); the login before it
        is not timed."""
        import pyotp
        from fastapi.testclient import TestClient

        client, totp = TestClient(self.app), pyotp.TOTP(self.admin_secret)
        self.t += 30
        res = client.post("/api/v1/auth/login", json={"username": "root", "password": PASSWORD, "totp_code": totp.at(self.t)})
        token = res.json()["token"]
        self.t += 30
        t0 = time.perf_counter()
        res = client.post("/api/v1/devices/import", json={"csv": text},
                          headers={"Authorization": f"Bearer {token}", "X-Wicket-TOTP": totp.at(self.t)})
        return time.perf_counter() - t0, res.json()

    def clear_devices(self) -> None:
        from sqlalchemy import delete

        from controller.db import transaction
        from controller.models import Device

        with transaction(self.factory) as s:
            s.execute(delete(Device))

    def device_count(self) -> int:
        from sqlalchemy import func, select

        from controller.models import Device

        with self.factory() as s:
            return s.scalar(select(func.count()).select_from(Device))

    def import_events(self) -> int:
        from sqlalchemy import func, select

        from controller.models import Event

        with self.factory() as s:
            return s.scalar(select(func.count()).select_from(Event).where(Event.type == "device.import"))

    def user_ids(self) -> dict[str, int]:
        from sqlalchemy import select

        from controller.models import User

        with self.factory() as s:
            return dict(s.execute(select(User.username, User.id)).all())

    def facts(self, reqs: list[Request]) -> list:
        """The engine's input for each request, read once from the database with the controller's own
        fact builders (controller.decisions)."""
        from sqlalchemy import select

        from controller.decisions import device_facts, site_facts, user_facts
        from controller.models import Device, User
        from controller.policy import AccessRequest

        with self.factory() as s:
            users = {u.id: user_facts(u, [(g.role, g.site) for g in u.grants], 0) for u in s.scalars(select(User))}
            wanted = sorted({r.asset_id for r in reqs})
            devices = {}
            for i in range(0, len(wanted), 500):
                for d in s.scalars(select(Device).where(Device.asset_id.in_(wanted[i:i + 500]))):
                    devices[d.asset_id] = (device_facts(d, d.site.name), site_facts(d.site))
        return [AccessRequest(user=users[r.user_id], device=devices[r.asset_id][0], site=devices[r.asset_id][1],
                              task=r.task, duration=r.duration, at=r.at, source=r.source) for r in reqs]

    def server_version(self) -> str:
        from sqlalchemy import text

        with self.factory() as s:
            return s.execute(text("SHOW server_version")).scalar()


USERS = (  # username, kind, roles (site None: every site), a contractor's validity from the controller's clock
    ("eng-all", "internal", [("engineer", None)], None),
    ("eng-north", "internal", [("engineer", f"site-{i:02d}") for i in range(0, 12)], None),
    ("eng-south", "internal", [("engineer", f"site-{i:02d}") for i in range(12, 24)] + [("approver", None)], None),
    ("sa-east", "internal", [("site_admin", f"site-{i:02d}") for i in range(0, 24, 3)], None),
    ("ctr-long", "contractor", [("contractor", f"site-{i:02d}") for i in range(0, 24, 2)], timedelta(days=30)),
    ("ctr-short", "contractor", [("contractor", f"site-{i:02d}") for i in range(1, 24, 2)], timedelta(hours=3)),
    ("soc-1", "internal", [("soc", None)], None),
)


def pg_database(base: str):
    """A scratch database for one run (dropped after; a crashed run's are swept by the next)."""
    from tests.pgscratch import scratch_database

    return scratch_database(base, "wicket_b")


# ---- generated policy, inventory and requests ----

TASK_SHAPES = (  # (device types, protocols): every listed type allows the protocols
    (["substation-rtu"], ["iec104"]), (["substation-rtu"], ["dnp3"]), (["meter-concentrator"], ["dlms"]),
    (["der-gateway"], ["modbus"]), (["substation-rtu", "meter-concentrator"], ["ssh"]), (["der-gateway"], ["https", "mqtt-tls"]),
)
ROLE_SETS = (["engineer", "contractor"], ["engineer"], ["engineer", "approver"], ["engineer", "site_admin", "contractor"])
DURATIONS = ({"default": "30m", "max": "1h"}, {"default": "15m", "max": "30m"}, {"default": "1h", "max": "2h"})


def policy_files(tasks: int) -> dict[str, str]:
    """The example policy (three device types, four tasks) and generated.yaml: tasks up to `tasks` (some
    with approval, change windows, payload recording, extensions), a nightly change window, and one
    location rule per ten generated tasks."""
    files = {p.name: p.read_text() for p in sorted(EXAMPLE_POLICY.glob("*.yaml"))}
    generated = {}
    for k in range(tasks - 4):
        types, protocols = TASK_SHAPES[k % len(TASK_SHAPES)]
        task = {"title": f"Generated task {k}", "protocols": protocols, "device_types": types,
                "roles": ROLE_SETS[k % len(ROLE_SETS)], "duration": DURATIONS[k % len(DURATIONS)],
                "recording": "payload" if k % 5 == 0 else "metadata"}
        if k % 3 == 0:
            task["approval"] = {"required": True, "approvers": 1 + k % 2}
        if k % 4 == 1:
            task["change_window"] = True
        if k % 6 == 2:
            task["extensions"] = {"reason_codes": ["work-overrun"], "max_count": 1, "max_total": "30m"}
        generated[f"gen-{k:03d}"] = task
    names = list(generated)
    locations = {f"gen-control-room-{j}": {"tasks": names[j * 10: j * 10 + 3], "networks": ["192.0.2.0/24", "198.51.100.0/25"]}
                 for j in range((len(names) + 9) // 10)}
    nightly = {"weekly": [{"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "start": "18:00", "end": "08:00"}]}
    doc = {"wicket_policy": 1, "tasks": generated, "change_windows": {"nightly": nightly}, "locations": locations}
    files["generated.yaml"] = yaml.safe_dump(doc, sort_keys=False)
    return files


def device_rows(n: int) -> list[list[str]]:
    """CSV rows in devicecsv.COLUMNS order: 40 % RTUs, 40 % meter concentrators (ICCID, IMSI), 20 % DER
    gateways (ICCID, EID, IMSI), spread over the sites; a few quarantined, provisioned, silent or unseen."""
    from controller.identifiers import eid_check, luhn_digit

    out = []
    for i in range(n):
        dtype, site, host = TYPES[i % len(TYPES)], i % SITES, i // SITES
        iccid = eid = imsi = ""
        if dtype != "substation-rtu":
            body = f"8949{i:014d}"
            iccid, imsi = body + luhn_digit(body), f"26201{i:010d}"
        if dtype == "der-gateway":
            prefix = f"89049032{i:022d}"
            eid = prefix + eid_check(prefix)
        seen = "" if i % 50 == 49 else _iso(BASE - (timedelta(days=2) if i % 25 == 24 else timedelta(seconds=i * 37 % 7200)))
        lifecycle = "quarantined" if i % 33 == 5 else "provisioned" if i % 33 == 6 else "active"
        out.append([
            f"{dtype.split('-')[0].upper()}-{i:05d}", dtype, f"site-{site:02d}", f"10.{site}.{host // 250}.{host % 250 + 1}",
            f"02:00:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}", iccid, eid, imsi, "2.4.1", lifecycle, seen,
            "iec104=2405" if dtype == "substation-rtu" and i % 7 == 0 else "", "bench device",
        ])
    return out


def bad_rows(rows: list[list[str]], count: int = 20) -> list[list[str]]:
    """The same file with `count` rows broken in different ways, spread through it."""
    future = _iso(BASE + timedelta(days=1))
    breaks = (
        lambda r: _set(r, 5, r[5][:-1] + str((int(r[5][-1]) + 1) % 10)) if r[5] else _set(r, 5, "8949000000000000001"),
        lambda r: _set(r, 1, "gas-meter"),
        lambda r: _set(r, 3, "10.250.0.1"),  # outside the site's network
        lambda r: _set(r, 2, "site-99"),
        lambda r: _set(r, 4, "01:00:5e:00:00:01"),  # multicast
        lambda r: _set(r, 0, rows[0][0]),  # a duplicate asset ID
        lambda r: _set(r, 5, rows[4][5]),  # an ICCID bound to another device
        lambda r: _set(r, 6, "1" * 32),
        lambda r: _set(r, 10, future),
        lambda r: _set(r, 11, "telnet=23"),
        lambda r: r[:-1],  # a cell short
        lambda r: _set(r, 9, "broken"),
        lambda r: _set(r, 3, "not-an-address"),
        lambda r: _set(r, 7, "123"),
    )
    out = [list(r) for r in rows]
    step = len(rows) // (count + 1)
    for j in range(count):
        i = step * (j + 1)
        out[i] = breaks[j % len(breaks)](out[i])
    return out


@dataclass(frozen=True)
class Request:
    user_id: int
    asset_id: str
    task: str
    duration: timedelta | None
    source: str | None
    at: datetime

    def call(self) -> dict:
        return {"user_id": self.user_id, "asset_id": self.asset_id, "task": self.task, "duration": self.duration,
                "source": self.source, "at": self.at}


def make_requests(rng: random.Random, users: dict[str, int], devices: list[tuple[str, str, str]], tasks: dict,
                  count: int) -> list[Request]:
    """Mostly someone who may request at the device's site (85 %; else any user but root) and a task made
    for the device's type (80 %); sources inside and outside the location rules; default and explicit
    durations; times over four hours of a Wednesday evening."""
    by_type: dict[str, list[str]] = {}
    for name, task in tasks.items():
        for dt in task.device_types:
            by_type.setdefault(dt, []).append(name)
    people = sorted(v for k, v in users.items() if k != "root")
    holders = {f"site-{i:02d}": sorted(users[name] for name, _kind, roles, _valid in USERS
                                       if any(r in ("engineer", "contractor") and s in (None, f"site-{i:02d}") for r, s in roles))
               for i in range(SITES)}
    names = sorted(tasks)
    sources = ("192.0.2.17", "192.0.2.80", "203.0.113.9", "203.0.113.20", "198.51.100.40", "198.51.100.200", None)
    durations = (None, None, None, timedelta(minutes=15), timedelta(minutes=30), timedelta(hours=1), timedelta(hours=2))
    out = []
    for _ in range(count):
        asset, dtype, site = rng.choice(devices)
        user = rng.choice(holders[site]) if rng.random() < 0.85 else rng.choice(people)
        task = rng.choice(by_type[dtype]) if rng.random() < 0.8 else rng.choice(names)
        out.append(Request(user, asset, task, rng.choice(durations), rng.choice(sources),
                           BASE + timedelta(seconds=rng.randrange(4 * 3600))))
    return out


def to_csv(rows: list[list[str]]) -> str:
    from controller.devicecsv import COLUMNS

    return "\n".join(",".join(r) for r in [list(COLUMNS), *rows]) + "\n"


# ---- helpers ----


def _set(row: list[str], i: int, value: str) -> list[str]:
    row = list(row)
    row[i] = value
    return row


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")
