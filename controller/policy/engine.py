"""The policy engine: one pure function from a request and its facts to a decision with its trace.

  decision = evaluate(policy, AccessRequest(user=…, device=…, site=…, task="iec104-diagnostics",
                                            duration=timedelta(minutes=30), at=now, source="192.0.2.7"))

Every check runs, in a fixed order, and leaves one entry in the trace (name, result, reason, inputs),
so a denial lists everything that is wrong, not only the first thing. Any failed check denies (default
deny); the decision's `reason` is the first failure, in words an engineer understands. Nothing here
reads a clock, a database or the network: the caller passes the facts, and the same facts and policy
always give the same decision.

A request for a grant task (a task with `grant`) runs the same checks too; `protocol` then checks the
grant's flows and the device's address instead of engineers' access, and `concurrency` does not apply
(a grant is nobody's tunnel). The decision's `grant` holds the flows and the device address.

A break-glass request (`AccessRequest(…, break_glass=True)`) runs the same checks, with three changes:
`task_role` wants the break_glass grant at the site and a task marked `break_glass`, change windows do not
apply, and the duration is capped by `limits.break_glass_max_duration`. It never needs approval and is
always recorded with payload.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from .durations import format_duration
from .model import PolicyDocument, Task
from .windows import containing, next_opening

CHECKS = (
    "account", "site_scope", "task", "task_role", "task_device_type", "device_lifecycle", "device_seen",
    "protocol", "change_window", "location", "duration", "concurrency",
)
PASS, FAIL, NOT_APPLICABLE, NOT_EVALUATED = "pass", "fail", "not_applicable", "not_evaluated"
ALLOW, ALLOW_WITH_APPROVAL, DENY = "allow", "allow_with_approval", "deny"


# ---- facts in ----


@dataclass(frozen=True)
class UserFacts:
    username: str
    kind: str = "internal"  # internal | contractor
    disabled: bool = False
    deleted: bool = False
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    roles: tuple[tuple[str, str | None], ...] = ()  # (role, site or None for every site)
    active_sessions: int = 0

    def roles_at(self, site: str) -> tuple[str, ...]:
        return tuple(sorted({r for r, s in self.roles if s is None or s == site}))


@dataclass(frozen=True)
class SiteFacts:
    name: str
    timezone: str = "UTC"
    change_windows: tuple[str, ...] = ()
    lan_networks: tuple[str, ...] = ()  # device addresses must lie inside; empty: not checked


@dataclass(frozen=True)
class DeviceFacts:
    """The device's passport facts, its posture included (lifecycle, last seen)."""

    asset_id: str
    device_type: str
    site: str
    addresses: tuple[str, ...] = ()
    lifecycle: str = "active"  # provisioned | active | quarantined | decommissioned
    last_seen: datetime | None = None
    ports: tuple[tuple[str, int], ...] = ()  # (protocol, port) overrides


@dataclass(frozen=True)
class AccessRequest:
    user: UserFacts
    device: DeviceFacts
    site: SiteFacts
    task: str
    duration: timedelta | None  # None: the task's default
    at: datetime
    source: str | None = None  # where the request came from
    break_glass: bool = False


# ---- decision out ----


@dataclass(frozen=True)
class Check:
    name: str
    result: str  # pass | fail | not_applicable | not_evaluated
    reason: str
    inputs: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"check": self.name, "result": self.result, "reason": self.reason, "inputs": self.inputs}


@dataclass(frozen=True)
class Access:
    """What a lane for this decision would allow: the device address, protocol and port."""

    protocol: str
    transport: str
    port: int
    address: str


@dataclass(frozen=True)
class GrantFlow:
    """A flow a grant lets the device open: the protocol's transport and ports, to these destinations."""

    protocol: str
    transport: str
    ports: tuple[int, ...]
    to: tuple[str, ...]

    def as_dict(self) -> dict:
        return {"protocol": self.protocol, "transport": self.transport, "ports": list(self.ports), "to": list(self.to)}


@dataclass(frozen=True)
class Decision:
    outcome: str  # allow | allow_with_approval | deny
    reason: str
    policy_version: str
    at: datetime
    checks: tuple[Check, ...]
    approvals_required: int = 0
    approval_reasons: tuple[str, ...] = ()
    duration: timedelta | None = None
    ends_at: datetime | None = None
    access: tuple[Access, ...] = ()
    recording: str | None = None
    break_glass: bool = False
    grant: tuple[GrantFlow, ...] = ()  # a grant task's flows, once allowed
    grant_address: str | None = None  # the device address they leave from

    @property
    def failed(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.checks if c.result == FAIL)

    def as_dict(self) -> dict:
        out = {
            "outcome": self.outcome,
            "reason": self.reason,
            "failed_checks": list(self.failed),
            "policy_version": self.policy_version,
            "evaluated_at": _iso(self.at),
            "approvals_required": self.approvals_required,
            "approval_reasons": list(self.approval_reasons),
            "duration": format_duration(self.duration) if self.duration else None,
            "ends_at": _iso(self.ends_at) if self.ends_at else None,
            "access": [a.__dict__ for a in self.access],
            "recording": self.recording,
            "trace": [c.as_dict() for c in self.checks],
        }
        if self.break_glass:  # only then, so that ordinary decisions keep their shape
            out["break_glass"] = True
        if self.grant:
            out["grant"] = {"device_address": self.grant_address, "flows": [f.as_dict() for f in self.grant]}
        return out


# ---- evaluation ----


def evaluate(policy, request: AccessRequest) -> Decision:
    """`policy` is a loaded `Policy` (its compiled form is cached on it)."""
    compiled: Compiled = policy.compiled
    ctx = _Context(compiled, request)
    checks = tuple(fn(ctx) for fn in _CHECKS)
    failed = [c for c in checks if c.result == FAIL]
    task, bg = ctx.task, request.break_glass
    recording = None if task is None else "payload" if bg else task.recording
    if failed:
        return Decision(DENY, failed[0].reason, policy.version, request.at, checks,
                        duration=ctx.duration, recording=recording, break_glass=bg)
    if bg:
        review = format_duration(ctx.doc.limits.break_glass_review_within)
        return Decision(ALLOW, f"allowed under break-glass: no approval; the session's traffic is recorded and a second "
                        f"person must review it within {review}", policy.version, request.at, checks,
                        duration=ctx.duration, ends_at=request.at + ctx.duration, access=ctx.access, recording=recording,
                        break_glass=True)
    approval = _approval(ctx)
    outcome = ALLOW_WITH_APPROVAL if approval else ALLOW
    reason = "allowed" if not approval else f"allowed once approved by {task.approval.approvers} approver(s): " + "; ".join(approval)
    return Decision(outcome, reason, policy.version, request.at, checks,
                    approvals_required=task.approval.approvers if approval else 0, approval_reasons=tuple(approval),
                    duration=ctx.duration, ends_at=request.at + ctx.duration, access=ctx.access, recording=recording,
                    grant=ctx.grant, grant_address=ctx.grant_address)


def break_glass_tasks(policy, device_type: str) -> list[str]:
    """Names of the tasks that may be opened under break-glass on a device of this type, sorted."""
    return sorted(name for name, task in policy.document.tasks.items() if task.break_glass and device_type in task.device_types)


@dataclass(frozen=True)
class Compiled:
    """The policy in the shape the checks want: parsed networks, per-protocol ports."""

    doc: PolicyDocument
    locations: tuple[tuple[str, frozenset, frozenset, frozenset, tuple], ...]


def compile_policy(doc: PolicyDocument) -> Compiled:
    locations = tuple(
        (name, frozenset(loc.roles), frozenset(loc.users), frozenset(loc.tasks),
         tuple(ipaddress.ip_network(n) for n in loc.networks))
        for name, loc in sorted(doc.locations.items())
    )
    return Compiled(doc, locations)


class _Context:
    def __init__(self, compiled: Compiled, request: AccessRequest):
        self.c, self.doc, self.r = compiled, compiled.doc, request
        self.task: Task | None = self.doc.tasks.get(request.task)
        self.device_type = self.doc.device_types.get(request.device.device_type)
        self.roles_here = request.user.roles_at(request.device.site)
        self.max_duration: timedelta | None = None
        self.duration: timedelta | None = request.duration
        if self.task is not None:
            self.max_duration = self.task.duration.max
            if request.break_glass:
                self.max_duration = min(self.max_duration, self.doc.limits.break_glass_max_duration)
            if self.duration is None:
                self.duration = min(self.task.duration.default, self.max_duration)
        self.access: tuple[Access, ...] = ()
        self.grant: tuple[GrantFlow, ...] = ()
        self.grant_address: str | None = None


def _check_account(ctx: _Context) -> Check:
    u, at = ctx.r.user, ctx.r.at
    inputs = {"user": u.username, "kind": u.kind, "disabled": u.disabled,
              "valid_from": _iso(u.valid_from), "valid_until": _iso(u.valid_until)}
    if u.deleted:
        return Check("account", FAIL, f"the account {u.username} has been deleted", inputs)
    if u.disabled:
        return Check("account", FAIL, f"the account {u.username} is disabled", inputs)
    if u.valid_from and at < u.valid_from:
        return Check("account", FAIL, f"the account {u.username} is valid only from {_human(u.valid_from)}", inputs)
    if u.valid_until and at >= u.valid_until:
        return Check("account", FAIL, f"the account {u.username} expired at {_human(u.valid_until)}", inputs)
    return Check("account", PASS, "the account is enabled and within its validity window", inputs)


def _check_site_scope(ctx: _Context) -> Check:
    site = ctx.r.device.site
    inputs = {"site": site, "roles_at_site": list(ctx.roles_here)}
    if ctx.r.site.name != site:
        return Check("site_scope", FAIL, f"the device's site {site} does not match the site record {ctx.r.site.name}", inputs)
    if not ctx.roles_here:
        return Check("site_scope", FAIL, f"you hold no role at site {site}", inputs)
    return Check("site_scope", PASS, f"roles at {site}: {', '.join(ctx.roles_here)}", inputs)


def _check_task(ctx: _Context) -> Check:
    inputs = {"task": ctx.r.task}
    if ctx.task is None:
        return Check("task", FAIL, f"there is no task {ctx.r.task!r} in the policy", inputs)
    return Check("task", PASS, f"task {ctx.r.task!r}: {ctx.task.title}", inputs)


def _check_task_role(ctx: _Context) -> Check:
    if ctx.task is None:
        return _unknown_task("task_role")
    if ctx.r.break_glass:
        return _check_break_glass_role(ctx)
    allowed = sorted(set(ctx.task.roles) & set(ctx.roles_here))
    inputs = {"task_roles": sorted(ctx.task.roles), "roles_at_site": list(ctx.roles_here)}
    if not allowed:
        mine = ", ".join(ctx.roles_here) or "none"
        return Check("task_role", FAIL, f"task {ctx.r.task!r} may be requested by {', '.join(sorted(ctx.task.roles))}; "
                     f"your roles at {ctx.r.device.site} are: {mine}", inputs)
    return Check("task_role", PASS, f"requested as {', '.join(allowed)}", inputs)


def _check_break_glass_role(ctx: _Context) -> Check:
    site = ctx.r.device.site
    inputs = {"break_glass": True, "task_break_glass": ctx.task.break_glass, "roles_at_site": list(ctx.roles_here)}
    missing = []
    if ctx.r.user.kind == "contractor":
        # Contractors always need a second person's approval; break-glass has none, so it is not theirs.
        missing.append("contractor accounts cannot use break-glass")
    if "break_glass" not in ctx.roles_here:
        missing.append(f"you hold no break-glass grant at site {site}")
    if not ctx.task.break_glass:
        missing.append(f"task {ctx.r.task!r} may not be used under break-glass")
    if missing:
        return Check("task_role", FAIL, "; ".join(missing), inputs)
    return Check("task_role", PASS, f"requested under break-glass, granted at site {site}", inputs)


def _check_task_device_type(ctx: _Context) -> Check:
    if ctx.task is None:
        return _unknown_task("task_device_type")
    d = ctx.r.device
    inputs = {"device_type": d.device_type, "task_device_types": sorted(ctx.task.device_types)}
    if ctx.device_type is None:
        return Check("task_device_type", FAIL, f"{d.asset_id}'s device type {d.device_type!r} is not in the policy", inputs)
    if d.device_type not in ctx.task.device_types:
        return Check("task_device_type", FAIL, f"task {ctx.r.task!r} is for {', '.join(sorted(ctx.task.device_types))}; "
                     f"{d.asset_id} is a {d.device_type}", inputs)
    return Check("task_device_type", PASS, f"{d.asset_id} is a {d.device_type}, which the task covers", inputs)


def _check_device_lifecycle(ctx: _Context) -> Check:
    d = ctx.r.device
    inputs = {"asset_id": d.asset_id, "lifecycle": d.lifecycle}
    if d.lifecycle == "active":
        return Check("device_lifecycle", PASS, f"{d.asset_id} is active", inputs)
    why = {"quarantined": "is quarantined", "provisioned": "is provisioned but not yet active",
           "decommissioned": "is decommissioned"}.get(d.lifecycle, f"is in state {d.lifecycle!r}")
    return Check("device_lifecycle", FAIL, f"{d.asset_id} {why}", inputs)


def _check_device_seen(ctx: _Context) -> Check:
    d = ctx.r.device
    limit = ctx.device_type.max_silence if ctx.device_type and ctx.device_type.max_silence else ctx.doc.limits.max_silence
    inputs = {"last_seen": _iso(d.last_seen), "max_silence": format_duration(limit) if limit else None}
    if limit is None:
        return Check("device_seen", NOT_APPLICABLE, "the policy does not require devices to have been seen recently", inputs)
    if d.last_seen is None:
        return Check("device_seen", FAIL, f"{d.asset_id} has never been seen; the policy wants it seen within {format_duration(limit)}", inputs)
    age = ctx.r.at - d.last_seen
    if age > limit:
        return Check("device_seen", FAIL, f"{d.asset_id} was last seen {format_duration(age)} ago ({_human(d.last_seen)}); "
                     f"the policy allows at most {format_duration(limit)}", inputs)
    return Check("device_seen", PASS, f"last seen {format_duration(age)} ago" if age > timedelta(0) else "last seen just now", inputs)


def _check_protocol(ctx: _Context) -> Check:
    if ctx.task is None:
        return _unknown_task("protocol")
    d = ctx.r.device
    if ctx.device_type is None:
        return Check("protocol", NOT_EVALUATED, "the device type is not in the policy", {"device_type": d.device_type})
    if ctx.task.is_grant:
        return _check_grant(ctx)
    inputs = {"protocols": sorted(ctx.task.protocols), "device_type_access": sorted(ctx.device_type.access),
              "addresses": list(d.addresses), "site_networks": list(ctx.r.site.lan_networks)}
    missing = [p for p in ctx.task.protocols if p not in ctx.device_type.access]
    if missing:
        return Check("protocol", FAIL, f"device type {d.device_type} does not allow {', '.join(sorted(missing))}", inputs)
    address, problem = _device_address(ctx)
    if problem:
        return Check("protocol", FAIL, problem, inputs)
    overrides = dict(d.ports)
    access = []
    for name in sorted(ctx.task.protocols):
        proto = ctx.doc.protocols[name]
        ports = [overrides[name]] if name in overrides else proto.ports
        access += [Access(name, t, p, address) for t in proto.transports() for p in ports]
    ctx.access = tuple(access)
    inputs["allowed"] = [f"{a.protocol} {a.transport}/{a.port} → {a.address}" for a in access]
    return Check("protocol", PASS, "; ".join(inputs["allowed"]), inputs)


def _check_grant(ctx: _Context) -> Check:
    """A grant's flows leave from the device: its first address, inside the site's device networks."""
    d, doc = ctx.r.device, ctx.doc
    flows = tuple(GrantFlow(f.protocol, doc.protocols[f.protocol].transport, tuple(f.ports or doc.protocols[f.protocol].ports),
                            tuple(f.to)) for f in ctx.task.grant.flows)
    shown = [f"{f.protocol} {f.transport}/{','.join(map(str, f.ports))} → {', '.join(f.to)}" for f in flows]
    inputs = {"grant": shown, "addresses": list(d.addresses), "site_networks": list(ctx.r.site.lan_networks)}
    address, problem = _device_address(ctx)
    if problem:
        return Check("protocol", FAIL, problem, inputs)
    ctx.grant, ctx.grant_address = flows, address
    return Check("protocol", PASS, f"grant from {address}: " + "; ".join(shown), inputs)


def _device_address(ctx: _Context) -> tuple[str | None, str | None]:
    """(the address lanes and grants use, or None with the reason it cannot be used)."""
    d = ctx.r.device
    if not d.addresses:
        return None, f"{d.asset_id} has no LAN address in its passport"
    address = d.addresses[0]
    if ctx.r.site.lan_networks:
        ip = ipaddress.ip_address(address)
        if not any(ip in ipaddress.ip_network(n) for n in ctx.r.site.lan_networks):
            return None, (f"{d.asset_id}'s address {address} is outside site {d.site}'s device networks "
                          f"({', '.join(ctx.r.site.lan_networks)})")
    return address, None


def _check_change_window(ctx: _Context) -> Check:
    if ctx.task is None:
        return _unknown_task("change_window")
    site = ctx.r.site
    inputs = {"required": ctx.task.change_window, "site_windows": list(site.change_windows), "timezone": site.timezone}
    if ctx.r.break_glass:
        return Check("change_window", NOT_APPLICABLE, "break-glass ignores change windows", inputs | {"break_glass": True})
    if not ctx.task.change_window:
        return Check("change_window", NOT_APPLICABLE, "the task does not need a change window", inputs)
    unknown = [w for w in site.change_windows if w not in ctx.doc.change_windows]
    if unknown:
        return Check("change_window", FAIL, f"site {site.name} names change windows the policy lacks: {', '.join(unknown)}", inputs)
    windows = {w: ctx.doc.change_windows[w] for w in site.change_windows}
    if not windows:
        return Check("change_window", FAIL, f"the task needs a change window and site {site.name} has none", inputs)
    at = ctx.r.at
    opening = containing(windows, site.timezone, at)
    if opening is None:
        nxt = next_opening(windows, site.timezone, at)
        when = f"; the next opens at {_local(nxt.start, site.timezone)}" if nxt else ""
        return Check("change_window", FAIL, f"the task needs a change window and none is open at site {site.name} now{when}", inputs)
    inputs |= {"window": list(opening.windows), "opens": _iso(opening.start), "closes": _iso(opening.end)}
    if ctx.duration and at + ctx.duration > opening.end:
        room = format_duration(opening.end - at)
        return Check("change_window", FAIL, f"the session would end after the change window closes at "
                     f"{_local(opening.end, site.timezone)}; ask for at most {room}", inputs)
    return Check("change_window", PASS, f"inside change window {', '.join(opening.windows)} until {_local(opening.end, site.timezone)}", inputs)


def _check_location(ctx: _Context) -> Check:
    u, source = ctx.r.user, ctx.r.source
    roles, task = set(ctx.roles_here), ctx.r.task
    applicable = [rule for rule in ctx.c.locations
                  if (not rule[1] or rule[1] & roles) and (not rule[2] or u.username in rule[2]) and (not rule[3] or task in rule[3])]
    inputs = {"source": source, "rules": [r[0] for r in applicable]}
    if not applicable:
        return Check("location", NOT_APPLICABLE, "no location constraint applies to this request", inputs)
    if source is None:
        return Check("location", FAIL, f"location rules {', '.join(r[0] for r in applicable)} apply and the request's source address is unknown", inputs)
    try:
        ip = ipaddress.ip_address(source)
    except ValueError:
        return Check("location", FAIL, f"the request's source {source!r} is not an IP address", inputs)
    for name, _r, _u, _t, networks in applicable:
        if not any(ip in n for n in networks):
            return Check("location", FAIL, f"location rule {name} allows requests only from {', '.join(str(n) for n in networks)}; "
                         f"this one came from {source}", inputs)
    return Check("location", PASS, f"{source} is allowed by {', '.join(r[0] for r in applicable)}", inputs)


def _check_duration(ctx: _Context) -> Check:
    if ctx.task is None:
        return _unknown_task("duration")
    asked, u, most, bg = ctx.r.duration, ctx.r.user, ctx.max_duration, ctx.r.break_glass
    inputs = {"requested": format_duration(asked) if asked is not None else None,
              "default": format_duration(min(ctx.task.duration.default, most)),
              "max": format_duration(most)}
    if bg:
        inputs |= {"task_max": format_duration(ctx.task.duration.max),
                   "break_glass_max": format_duration(ctx.doc.limits.break_glass_max_duration)}
    if asked is not None and asked <= timedelta(0):
        return Check("duration", FAIL, "the duration must be positive", inputs)
    if asked is not None and asked > most:
        under = " under break-glass" if bg else ""
        return Check("duration", FAIL, f"{format_duration(asked)} asked; task {ctx.r.task!r} allows at most {format_duration(most)}{under}", inputs)
    end = ctx.r.at + ctx.duration
    if u.valid_until and end > u.valid_until:
        return Check("duration", FAIL, f"the session would end at {_human(end)}, after the account's validity ends at {_human(u.valid_until)}", inputs)
    if asked is not None:
        how = ""
    elif ctx.duration < ctx.task.duration.default:
        how = f" (the task default {format_duration(ctx.task.duration.default)}, cut to the break-glass maximum)"
    else:
        how = " (the task default)"
    return Check("duration", PASS, f"{format_duration(ctx.duration)}{how}, within the {'break-glass ' if bg else ''}maximum "
                 f"{format_duration(most)}", inputs)


def _check_concurrency(ctx: _Context) -> Check:
    limit, have = ctx.doc.limits.concurrent_sessions_per_user, ctx.r.user.active_sessions
    inputs = {"active_sessions": have, "limit": limit}
    if ctx.task is not None and ctx.task.is_grant:
        return Check("concurrency", NOT_APPLICABLE, "a grant is nobody's tunnel: it does not count against the "
                     "per-person session limit", inputs)
    if have >= limit:
        return Check("concurrency", FAIL, f"you already have {have} session(s) open; the limit is {limit}", inputs)
    return Check("concurrency", PASS, f"{have} of {limit} sessions in use", inputs)


_CHECKS: tuple[Callable[[_Context], Check], ...] = (
    _check_account, _check_site_scope, _check_task, _check_task_role, _check_task_device_type,
    _check_device_lifecycle, _check_device_seen, _check_protocol, _check_change_window, _check_location,
    _check_duration, _check_concurrency,
)
assert tuple(f.__name__.removeprefix("_check_") for f in _CHECKS) == CHECKS


def _approval(ctx: _Context) -> list[str]:
    reasons = []
    if ctx.task.approval.required:
        reasons.append(f"task {ctx.r.task!r} requires approval")
    if ctx.r.user.kind == "contractor":
        reasons.append("contractors always need approval")
    elif not set(ctx.roles_here) & (set(ctx.task.roles) - {"contractor"}):
        reasons.append(f"you ask as a contractor at {ctx.r.device.site} (your only role there that may request this "
                       "task); contractors always need approval")
    return reasons


def _unknown_task(name: str) -> Check:
    return Check(name, NOT_EVALUATED, "the task is unknown", {})


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


def _human(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _local(value: datetime, tz: str) -> str:
    from zoneinfo import ZoneInfo

    return value.astimezone(ZoneInfo(tz)).strftime(f"%Y-%m-%d %H:%M {tz}")
