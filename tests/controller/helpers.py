"""Helpers the inventory, import and policy API tests share."""

from __future__ import annotations

from datetime import UTC, datetime

from controller.identifiers import eid_check, luhn_digit

API = "/api/v1"


def iso(value: datetime | float) -> str:
    """RFC 3339 UTC with Z, from a datetime or a Unix time."""
    if not isinstance(value, datetime):
        value = datetime.fromtimestamp(value, UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def iccid_for(n: int) -> str:
    """The n-th valid ICCID (Luhn check digit)."""
    body = f"8949{n:014d}"
    return body + luhn_digit(body)


def eid_for(n: int) -> str:
    """The n-th valid EID (ISO 7064 check digits)."""
    body = f"89049032{n:022d}"
    return body + eid_check(body)


def headers(ctl, person, step_up: bool = False) -> dict:
    """A login for `person`, kept on the person and renewed when it lapsed; with a fresh code for step-up."""
    token = getattr(person, "token", None)
    if token is None or ctl.client.get(f"{API}/auth/whoami", headers=ctl.auth(token)).status_code != 200:
        ctl.advance(30)
        token = person.token = ctl.login(person)
    if not step_up:
        return ctl.auth(token)
    ctl.advance(30)
    return ctl.auth(token, ctl.code(person))


def admin(ctl) -> dict:
    return ctl.auth(ctl.admin_token())
