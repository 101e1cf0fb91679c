"""The applied policy: apply a new version (admins, step-up), read the active one, history, diff.

Applying refuses a policy that would strand the inventory (a device type still used by devices, a
change window still named by a site): the error names them, and nothing changes. The active policy is
cached per controller and re-read when another replica applies a newer one.
"""

from __future__ import annotations

import threading

from sqlalchemy import func, select

from . import events
from .auth import Auth, Principal
from .db import transaction
from .errors import Conflict, Invalid, NotFound
from .models import Device, PolicyVersion, Site
from .policy import Policy, PolicyError, canonical, load_files
from .policy.diff import diff


class PolicyStore:
    def __init__(self, auth: Auth):
        self.auth, self.factory = auth, auth.factory
        self._lock = threading.Lock()
        self._cached: tuple[int, Policy] | None = None

    def active(self) -> Policy | None:
        with self.factory() as s:
            latest = s.scalar(select(func.max(PolicyVersion.id)))
            if latest is None:
                return None
            with self._lock:
                if self._cached and self._cached[0] == latest:
                    return self._cached[1]
            row = s.get(PolicyVersion, latest)
            policy = _load(row)
        with self._lock:
            self._cached = (latest, policy)
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

    def diff(self, files: dict[str, str]) -> tuple[Policy, list[str]]:
        candidate = self.check(files)
        current = self.active()
        return candidate, diff(current.canonical if current else None, candidate.canonical)

    def apply(self, actor: Principal, files: dict[str, str], comment: str, source: str | None) -> tuple[PolicyVersion, list[str]]:
        candidate = self.check(files)
        now = self.auth.now()
        with transaction(self.factory) as s:
            latest = s.scalar(select(PolicyVersion).order_by(PolicyVersion.id.desc()).limit(1).with_for_update())
            if latest is not None and latest.version == candidate.version:
                raise Conflict(f"this policy is already the active version ({candidate.version[:19]}…): nothing to apply")
            _check_inventory(s, candidate)
            changes = diff(latest.document if latest else None, candidate.canonical)
            row = PolicyVersion(version=candidate.version, files=dict(files), document=candidate.canonical,
                                comment=comment, applied_at=now, applied_by=actor.username)
            s.add(row)
            s.flush()
            events.record(s, at=now, category="policy", type="policy.apply", result="success", actor_id=actor.user_id,
                          actor=actor.username, subject=f"policy-{row.id}", source=source, version=candidate.version,
                          previous=latest.version if latest else None, changes=changes[:200], change_count=len(changes),
                          files=sorted(files))
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
    policy = load_files(row.files)
    if policy.version != row.version or canonical(policy.document) != row.document:
        # The loader changed meaning under a stored policy (an upgrade): refuse rather than guess.
        raise Conflict(f"stored policy {row.id} no longer loads to version {row.version}: re-apply it")
    return policy


def _check_inventory(s, candidate: Policy) -> None:
    doc = candidate.document
    problems = []
    for dtype, count in s.execute(select(Device.device_type, func.count()).group_by(Device.device_type)):
        if dtype not in doc.device_types:
            sample = s.scalars(select(Device.asset_id).where(Device.device_type == dtype).order_by(Device.asset_id).limit(3)).all()
            problems.append(f"device type {dtype!r} is still used by {count} device(s) ({', '.join(sample)}{', …' if count > 3 else ''})")
    for site in s.scalars(select(Site)):
        gone = [w for w in site.change_windows if w not in doc.change_windows]
        if gone:
            problems.append(f"site {site.name} names change window(s) {', '.join(gone)}")
    if problems:
        raise Conflict("the policy would strand the inventory: " + "; ".join(problems) + ". Change the inventory first, or keep them.")
