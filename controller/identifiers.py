"""Checks for the identifiers on a passport, with check digits where the standard has them, so a
typo at scan time is refused rather than bound to the wrong SIM."""

from __future__ import annotations

import ipaddress
import re

ASSET_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_MAC = re.compile(r"^[0-9a-f]{2}([:-]?)[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")


def mac(value: str) -> str:
    v = value.strip().lower()
    if not _MAC.match(v):
        raise ValueError(f"{value!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    digits = re.sub(r"[:-]", "", v)
    if int(digits[1], 16) & 1:
        raise ValueError(f"{value!r} is a multicast address, not a device's MAC")
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


def iccid(value: str) -> str:
    """ITU-T E.118: 19 or 20 digits starting 89, the last a Luhn check digit."""
    v = value.strip().upper().removesuffix("F")
    if not re.fullmatch(r"89\d{17,18}", v):
        raise ValueError(f"{value!r} is not an ICCID (19 or 20 digits starting with 89)")
    if not _luhn_ok(v):
        raise ValueError(f"{value!r}: the ICCID check digit is wrong (mistyped?)")
    return v


def eid(value: str) -> str:
    """GSMA SGP.29: 32 digits whose value mod 97 is 1 (the last two are check digits)."""
    v = value.strip()
    if not re.fullmatch(r"\d{32}", v):
        raise ValueError(f"{value!r} is not an EID (32 digits)")
    if int(v) % 97 != 1:
        raise ValueError(f"{value!r}: the EID check digits are wrong (mistyped?)")
    return v


def imsi(value: str) -> str:
    v = value.strip()
    if not re.fullmatch(r"\d{14,15}", v):
        raise ValueError(f"{value!r} is not an IMSI (14 or 15 digits)")
    return v


def device_address(value: str) -> str:
    """An IPv4 unicast address a lane can reach (lanes are IPv4 for now)."""
    try:
        ip = ipaddress.ip_address(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None
    if ip.version != 4:
        raise ValueError(f"{value!r}: device addresses are IPv4 (IPv6 lanes are not supported yet)")
    if ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip.is_link_local or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"{value!r} cannot be a device's address (loopback, link-local, multicast or unspecified)")
    return str(ip)


def luhn_digit(digits: str) -> str:
    """The Luhn check digit to append to `digits` (for tests and tools)."""
    for d in "0123456789":
        if _luhn_ok(digits + d):
            return d
    raise AssertionError("unreachable")


def eid_check(first30: str) -> str:
    """The two check digits that complete a 30-digit EID prefix."""
    return f"{98 - (int(first30 + '00') % 97):02d}"


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = int(ch)
        if i % 2 == 1:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0
