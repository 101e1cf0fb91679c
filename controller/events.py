"""Auditable events, written in the same transaction as what they record and sealed into the audit
chain when it commits (`controller.audit.chain`): if the record cannot be written, nothing is.

Field names are the ones the SIEM export uses (`docs/soc-reference.md`). Bodies never hold passwords,
codes or tokens: `record` refuses keys that look like them.
"""

from __future__ import annotations

import json
import logging

from sqlalchemy.orm import Session

from .audit import chain
from .models import Event, now

log = logging.getLogger("wicket.controller.events")
FORBIDDEN_KEYS = ("password", "token", "code", "secret", "otp")


def agent_actor(node: str) -> str:
    """How a node agent is named as an actor: "agent:<node>", or the node's name alone when that is too long
    for the column (the subject carries the name in full)."""
    return f"agent:{node}" if len(node) <= 58 else node


def record(
    session: Session,
    *,
    category: str,
    type: str,
    result: str,
    actor_id: int | None = None,
    actor: str | None = None,
    subject: str | None = None,
    source: str | None = None,
    reason: str | None = None,
    at=None,
    **body,
) -> Event:
    for key in body:
        k = key.lower()
        if any(k == word or k.endswith("_" + word) for word in FORBIDDEN_KEYS):
            raise ValueError(f"event body key {key!r} looks like a secret")
    try:
        body = json.loads(json.dumps(body))  # the stored body is exactly what is hashed
    except (TypeError, ValueError) as exc:
        raise ValueError(f"event {type}: body is not plain JSON: {exc}") from None
    session_ref = body.get("session_id") or (subject if category in ("session", "evidence") else None)
    device_ref = body.get("device") or body.get("device_id") or (
        subject if type in ("device.create", "device.update", "device.delete") else None)
    event = Event(
        at=at or now(), category=category, type=type, result=result, actor_id=actor_id, actor=actor,
        subject=subject, source=source, reason=reason, body=body, clock=chain.clock_state(),
        session_ref=str(session_ref)[:64] if session_ref else None, device_ref=str(device_ref)[:64] if device_ref else None,
    )
    chain.queue(session, event)
    log.info(
        "event category=%s type=%s result=%s actor=%s subject=%s source=%s reason=%s",
        category, type, result, actor, subject, source, reason,
    )
    return event


chain.install()
