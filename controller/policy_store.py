"""The applied policy: apply a new version (admins, step-up), read the active one, history, diff.

Applying refuses a policy that would strand the inventory (a device type still used by devices, a
change window still named by a site, a protocol still named in a device's ports): the error names
them, and nothing changes. The active policy is cached per controller: an apply here takes effect at
once, one on another replica within `refresh_seconds` (the newest version id is checked at most that
often, so a decision costs no policy query).
"""

from __future__ import annotations

import threading
import time

from pydantic import ValidationError
from sqlalchemy import func, select

from . import baselines, events
from .auth import Auth, Principal
from .db import transaction
from .errors import Conflict, Invalid, NotFound
from .models import Device, PolicyVersion, Site
from .policy import Policy, PolicyError, canonical, load_files
from .policy.diff import diff
from .policy.model import PolicyDocument


class PolicyStore:
    def __init__(self, auth: Auth, refresh_seconds: float = 1.0):
        self.auth, self.factory = auth, auth.factory
        self.refresh_seconds = refresh_seconds
        self._lock = threading.Lock()
        self._cached: tuple[int, Policy] | None = None
        self._checked_at = float("-inf")  # time.monotonic() of the last look at the newest version id
        self.on_nodes_changed = lambda nodes: None  # every node's baselines follow the policy (app: the pusher)

    def active(self) -> Policy | None:
        with self._lock:
            if self._cached and time.monotonic() - self._checked_at < self.refresh_seconds:
                return self._cached[1]
        checked_at = time.monotonic()
        with self.factory() as s:
            latest = s.scalar(select(func.max(PolicyVersion.id)))
            if latest is None:
                return None
            with self._lock:
                if self._cached and self._cached[0] == latest:
                    self._checked_at = checked_at
                    return self._cached[1]
            policy = _load(s.get(PolicyVersion, latest))
        with self._lock:
            self._cached, self._checked_at = (latest, policy), checked_at
        return policy

    def require_active(self) -> Policy:
        policy = self.active()
        if policy is None:
            raise Conflict("no policy has been applied yet: `wicket policy apply DIR` first")
        return policy

    def check(self, files: dict[str, str]) -> Policy:
        try:
            return load_files(files)
        except PolicyError as exc:
            raise PolicyInvalid(exc.problems) from None

    def diff(self, files: dict[str, str]) -> tuple[Policy, str | None, list[str]]:
        """The candidate, the newest applied version it is compared with (stored content, so this works
        also when that version no longer loads after an upgrade), and the changes."""
        candidate = self.check(files)
        with self.factory() as s:
            latest = s.scalar(select(PolicyVersion).order_by(PolicyVersion.id.desc()).limit(1))
        return candidate, latest.version if latest else None, diff(latest.document if latest else None, candidate.canonical)

    def apply(self, actor: Principal, files: dict[str, str], comment: str, source: str | None) -> tuple[PolicyVersion, list[str]]:
        """Apply files as the new version. A refusal after the step-up (the version is already active,
        or the inventory would be stranded) is recorded as a failed policy.apply, then raised."""
        candidate = self.check(files)
        now = self.auth.now()
        refusal = "conflict"
        try:
            with transaction(self.factory) as s:
                latest = s.scalar(select(PolicyVersion).order_by(PolicyVersion.id.desc()).limit(1).with_for_update())
                if latest is not None and latest.version == candidate.version:
                    refusal = "already_active"
                    raise Conflict(f"this policy is already the active version ({candidate.version[:19]}…): nothing to apply")
                refusal = "would_strand_inventory"
                _check_inventory(s, candidate)
                changes = diff(latest.document if latest else None, candidate.canonical)
                row = PolicyVersion(version=candidate.version, files=dict(files), document=candidate.canonical,
                                    comment=comment, applied_at=now, applied_by=actor.username)
                s.add(row)
                s.flush()
                bumped = baselines.bump_all(s)  # the nodes' baselines (profiles, destinations) come from the policy
                events.record(s, at=now, category="policy", type="policy.apply", result="success", actor_id=actor.user_id,
                              actor=actor.username, subject=f"policy-{row.id}", source=source, version=candidate.version,
                              previous=latest.version if latest else None, changes=changes[:200], change_count=len(changes),
                              files=sorted(files))
        except Conflict as exc:
            with transaction(self.factory) as s:
                events.record(s, at=now, category="policy", type="policy.apply", result="failure", actor_id=actor.user_id,
                              actor=actor.username, subject=None, source=source, reason=refusal,
                              version=candidate.version, detail=exc.detail, files=sorted(files))
            raise
        with self._lock:
            self._cached = None  # this replica uses the new version from its next decision
        self.on_nodes_changed(bumped)
        return row, changes

    def history(self) -> list[PolicyVersion]:
        with self.factory() as s:
            return list(s.scalars(select(PolicyVersion).order_by(PolicyVersion.id.desc())))

    def get(self, policy_id: int) -> PolicyVersion:
        with self.factory() as s:
            row = s.get(PolicyVersion, policy_id)
            if row is None:
                raise NotFound(f"no policy version {policy_id}")
            return row


class PolicyInvalid(Invalid):
    """A policy that does not load: every problem, each with file and line."""

    code = "policy_invalid"

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems[:20]) + (f"; … {len(problems) - 20} more" if len(problems) > 20 else ""))
        self.problems = problems

    def extra(self) -> dict:
        return {"problems": self.problems}


def _load(row: PolicyVersion) -> Policy:
    """The policy exactly as applied: its stored canonical content, not its files read again, so a
    newer controller's defaults or catalogue never change what an applied version means."""
    try:
        document = PolicyDocument.model_validate(row.document)
    except ValidationError:
        raise Conflict(f"the active policy ({row.version[:19]}…) does not fit this controller version: "
                       "check and re-apply the policy files") from None
    if canonical(document) != row.document:
        raise Conflict(f"the active policy ({row.version[:19]}…) means something else to this controller version: "
                       "check and re-apply the policy files")
    return Policy(document, row.version, dict(row.files))


def _check_inventory(s, candidate: Policy) -> None:
    doc = candidate.document
    problems = []
    for dtype, count in s.execute(select(Device.device_type, func.count()).group_by(Device.device_type)):
        if dtype not in doc.device_types:
            sample = s.scalars(select(Device.asset_id).where(Device.device_type == dtype).order_by(Device.asset_id).limit(3)).all()
            problems.append(f"device type {dtype!r} is still used by {count} device(s) ({', '.join(sample)}{', …' if count > 3 else ''})")
    for asset_id, ports in s.execute(select(Device.asset_id, Device.ports)):
        gone = sorted(p for p in (ports or {}) if p not in doc.protocols)
        if gone:
            problems.append(f"device {asset_id} has a port override for protocol(s) {', '.join(gone)}")
    for site in s.scalars(select(Site)):
        gone = [w for w in site.change_windows if w not in doc.change_windows]
        if gone:
            problems.append(f"site {site.name} names change window(s) {', '.join(gone)}")
    if problems:
        raise Conflict("the policy would strand the inventory: " + "; ".join(problems) + ". Change the inventory first, or keep them.")
