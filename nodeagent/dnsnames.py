"""The agent's resolver for FQDN destinations: which IPv4 addresses each watched name stands for now.

One thread owns one `NameWatcher` (the agent's resolver thread, `device_traffic.Names`): `want()` the
names the baseline and grants use, call `refresh()` when `due()` says so, read `addresses(fqdn)` and
`status()`.

The rules, per name (times on the monotonic clock; `resolved_at` and `stale_until` are reported in UTC):

- A good answer (A records) puts the name in state ``ok`` with that address set (sorted, IPv4 only,
  CNAME chains followed, at most 64 addresses). The TTL that counts is the answer's (the smallest along
  a CNAME chain), clamped to [min_ttl_s, max_ttl_s]; the name is asked again when it runs out, not before.
- The answer expires at ``resolved_at + ttl``. A failed refresh (timeout, SERVFAIL, REFUSED, NXDOMAIN,
  no A records, nameserver unreachable) keeps the last good set, in state ``stale``, until
  ``stale_until = resolved_at + ttl + stale_s`` (the expiry of the last good answer plus stale_s), and
  retries every retry_s. NXDOMAIN counts as a failure like the others: a broken DNS can answer it.
- Past ``stale_until`` without a good answer the state is ``failed`` and the name stands for no address
  (the destination is empty: deny). A name never resolved is ``pending``, then ``failed`` after its first
  failure; a failed name is retried every retry_s and goes back to ``ok`` with its next good answer.
- States move only in `refresh()`, which returns the names whose state or address set changed. `due()`
  includes each stale name's `stale_until`, so a loop that refreshes when due drops a set on time.

Nameservers come from the agent config, or else from /etc/resolv.conf (read again at each refresh).
Queries run on a small thread pool, each bounded by timeout_s. Not thread-safe: one thread calls all.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from nodeagent.errors import PermanentError
from nodeagent.wire import NameStatus

log = logging.getLogger("wicket.agent.dns")

MAX_ADDRESSES = 64  # the wire's limit for one destination
MAX_WORKERS = 16  # concurrent queries in one refresh
RESOLV_CONF = "/etc/resolv.conf"


class NameWatcher:
    def __init__(self, nameservers: list[tuple[str, int]] | None, *, min_ttl_s: float = 5,
                 max_ttl_s: float = 3600, stale_s: float = 3600, retry_s: float = 5, timeout_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 resolv_conf: str = RESOLV_CONF):
        """nameservers: (ip, port) pairs asked in order; None: those of `resolv_conf`.
        Raises PermanentError when there is no nameserver to ask, ValueError for bad arguments."""
        if not 1 <= min_ttl_s <= max_ttl_s:
            raise ValueError(f"need 1 <= min_ttl_s <= max_ttl_s, got {min_ttl_s} and {max_ttl_s}")
        if stale_s < 0 or retry_s <= 0 or timeout_s <= 0:
            raise ValueError("stale_s must be >= 0, retry_s and timeout_s > 0")
        if nameservers is not None:
            if not nameservers:
                raise ValueError("an empty nameserver list: give at least one, or None to use /etc/resolv.conf")
            for ip, port in nameservers:
                ipaddress.ip_address(ip)  # ValueError names the bad address
                if not 1 <= port <= 65535:
                    raise ValueError(f"nameserver {ip}: port {port} is not 1-65535")
        self._configured = list(nameservers) if nameservers is not None else None
        self._resolv_conf = resolv_conf
        self._last_system = _system_nameservers(resolv_conf) if nameservers is None else []
        self.min_ttl_s, self.max_ttl_s, self.stale_s = min_ttl_s, max_ttl_s, stale_s
        self.retry_s, self.timeout_s = retry_s, timeout_s
        self._clock, self._wall = clock, wall
        self._names: dict[str, _Name] = {}

    @property
    def nameservers(self) -> list[tuple[str, int]]:
        """The nameservers the last refresh asked (or will ask)."""
        return self._configured if self._configured is not None else self._last_system

    def want(self, fqdns: set[str]) -> None:
        """Watch exactly these names: new ones start pending and are due now; dropped ones are forgotten."""
        wanted = {_normalise(f) for f in fqdns}
        for fqdn in set(self._names) - wanted:
            del self._names[fqdn]
        now = self._clock()
        for fqdn in wanted - set(self._names):
            self._names[fqdn] = _Name(fqdn, next_at=now)

    def due(self) -> float | None:
        """The monotonic time at which `refresh()` has work, or None when no name is watched."""
        return min((n.next_at for n in self._names.values()), default=None)

    def refresh(self) -> list[str]:
        """Ask for every name that is due (blocking, at most about timeout_s per batch of MAX_WORKERS
        names); returns the names whose state or enforced address set changed, sorted."""
        due = [n for n in self._names.values() if n.next_at <= self._clock()]
        if not due:
            return []
        servers = self._servers()
        with ThreadPoolExecutor(max_workers=min(MAX_WORKERS, len(due)), thread_name_prefix="wicket-dns") as pool:
            results = list(pool.map(lambda n: self._query(n.fqdn, servers), due))
        now, wall = self._clock(), self._wall()
        changed = []
        for name, result in zip(due, results, strict=True):
            before = (name.state, name.enforced())
            if result.addresses:
                self._good(name, result, now, wall)
            else:
                self._bad(name, result.error or "no answer", now)
            if (name.state, name.enforced()) != before:
                changed.append(name.fqdn)
                self._log_change(name)
        return sorted(changed)

    def addresses(self, fqdn: str) -> list[str]:
        """The set to enforce now: the last good set while ok or stale; [] when pending, failed or not watched."""
        name = self._names.get(_normalise(fqdn))
        return name.enforced() if name else []

    def status(self) -> list[NameStatus]:
        """One entry per watched name, sorted by name, for the device report."""
        out = []
        for fqdn in sorted(self._names):
            n = self._names[fqdn]
            good = n.good_wall is not None and n.ttl_s is not None
            out.append(NameStatus(
                fqdn=fqdn, addresses=n.enforced(), state=n.state, ttl_s=round(n.ttl_s) if good else None,
                resolved_at=_utc(n.good_wall) if good else None,
                stale_until=_utc(n.good_wall + n.ttl_s + self.stale_s) if good else None,
                error=n.error))
        return out

    # ---- helpers ----------------------------------------------------------------------------------

    def _good(self, name: _Name, result: _Result, now: float, wall: float) -> None:
        ttl = min(max(result.ttl, self.min_ttl_s), self.max_ttl_s)
        name.state, name.addresses, name.ttl_s, name.error = "ok", result.addresses, ttl, result.error
        name.good_mono, name.good_wall = now, wall
        name.next_at = now + ttl

    def _bad(self, name: _Name, error: str, now: float) -> None:
        name.error = error
        if name.good_mono is not None and now < (stale_until := name.good_mono + name.ttl_s + self.stale_s):
            name.state = "stale"
            name.next_at = min(now + self.retry_s, stale_until)
        else:
            name.state = "failed"
            name.next_at = now + self.retry_s

    def _servers(self) -> list[tuple[str, int]]:
        if self._configured is not None:
            return self._configured
        try:
            self._last_system = _system_nameservers(self._resolv_conf)
        except PermanentError as exc:
            log.warning("dns: %s; asking the nameservers read before: %s", exc, _labels(self._last_system))
        return self._last_system

    def _query(self, fqdn: str, servers: list[tuple[str, int]]) -> _Result:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in servers]
        # Leave time for a second try (one lost UDP packet must not fail the name) or a second server.
        resolver.timeout = self.timeout_s / max(2, len(servers))
        resolver.lifetime = self.timeout_s
        try:
            answer = resolver.resolve(dns.name.from_text(fqdn), "A", search=False, lifetime=self.timeout_s)
        except dns.resolver.LifetimeTimeout:
            return _Result(error=f"timeout after {float(self.timeout_s)} s asking {_labels(servers)}")
        except dns.resolver.NXDOMAIN:
            return _Result(error="NXDOMAIN")
        except dns.resolver.NoAnswer:
            return _Result(error="no A records")
        except dns.resolver.NoNameservers as exc:
            return _Result(error=_server_errors(exc, servers))
        except dns.exception.DNSException as exc:
            return _Result(error=(str(exc) or type(exc).__name__)[:200])
        found = sorted({ipaddress.IPv4Address(r.address) for r in answer})
        usable = [a for a in found if _enforceable(a)]
        if not usable:
            return _Result(error=f"no usable A records ({', '.join(map(str, found))})"[:200])
        note = None
        if len(usable) > MAX_ADDRESSES:
            note = f"{len(usable)} A records: enforcing the lowest {MAX_ADDRESSES}"
        elif len(usable) < len(found):
            note = f"ignored {', '.join(str(a) for a in found if a not in usable)}"[:200]
        return _Result([str(a) for a in usable[:MAX_ADDRESSES]], answer.chaining_result.minimum_ttl, note)

    def _log_change(self, name: _Name) -> None:
        if name.state == "ok":
            log.info("dns %s: ok %s (ttl %s s)", name.fqdn, ", ".join(name.addresses), name.ttl_s)
        elif name.state == "stale":
            log.info("dns %s: stale (%s): keeping %s until the stale limit", name.fqdn, name.error,
                     ", ".join(name.addresses))
        else:
            log.warning("dns %s: failed (%s): the destination is empty", name.fqdn, name.error)


@dataclass
class _Name:
    fqdn: str
    state: str = "pending"
    addresses: list[str] = field(default_factory=list)  # the last good set, kept while stale
    ttl_s: float | None = None  # clamped TTL of the last good answer
    good_mono: float | None = None  # when the last good answer arrived
    good_wall: float | None = None
    next_at: float = 0.0
    error: str | None = None

    def enforced(self) -> list[str]:
        return list(self.addresses) if self.state in ("ok", "stale") else []


@dataclass
class _Result:
    addresses: list[str] = field(default_factory=list)
    ttl: int = 0
    error: str | None = None


def _normalise(fqdn: str) -> str:
    return fqdn.rstrip(".").lower()


def _enforceable(addr: ipaddress.IPv4Address) -> bool:
    # The same rule as the wire's HostV4: a sinkhole answer (0.0.0.0, 127.0.0.1) is no destination.
    return not (addr.is_multicast or addr.is_unspecified or addr.is_loopback
                or addr == ipaddress.IPv4Address("255.255.255.255"))


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _label(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _labels(servers: list[tuple[str, int]]) -> str:
    return ", ".join(_label(ip, port) for ip, port in servers)


def _server_errors(exc: dns.resolver.NoNameservers, servers: list[tuple[str, int]]) -> str:
    """"SERVFAIL from 127.0.0.1:53; connection refused by 10.0.0.2:53" from dnspython's error trace."""
    labels = {str(dns.nameserver.Do53Nameserver(ip, port)): _label(ip, port) for ip, port in servers}
    texts: list[str] = []
    for server, _tcp, _port, err, _response in exc.kwargs.get("errors") or []:
        who = labels.get(server, server)
        if isinstance(err, ConnectionRefusedError):
            text = f"connection refused by {who}"
        elif isinstance(err, OSError):
            text = f"{err.strerror or type(err).__name__} asking {who}"
        else:
            text = f"{err} from {who}"
        if text not in texts:
            texts.append(text)
    return ("; ".join(texts) or "no nameserver answered")[:200]


def _system_nameservers(path: str) -> list[tuple[str, int]]:
    try:
        resolver = dns.resolver.Resolver(filename=path)
    except dns.resolver.NoResolverConfiguration as exc:
        raise PermanentError(f"{path}: {exc}; give the agent its DNS nameservers in the config") from None
    out = []
    for ns in resolver.nameservers:
        if isinstance(ns, dns.nameserver.AddressAndPortNameserver):
            out.append((ns.address, ns.port))
        else:
            out.append((str(ns), resolver.nameserver_ports.get(str(ns), resolver.port)))
    return out
