"""What changes between two policies, entry by entry, for review before `wicket policy apply`."""

from __future__ import annotations

from .model import SECTIONS


def diff(old: dict | None, new: dict) -> list[str]:
    """Lines like '+ tasks.fw-push', '- locations.x', '~ tasks.diag.duration.max: 1h → 2h'.
    Both sides are canonical documents (`controller.policy.canonical`)."""
    old = old or {}
    out: list[str] = []
    for section in (*SECTIONS, "limits"):
        a, b = old.get(section) or {}, new.get(section) or {}
        if section == "limits":
            out += _changes("limits", a, b)
            continue
        for name in sorted(set(a) | set(b)):
            if name not in a:
                out.append(f"+ {section}.{name}")
            elif name not in b:
                out.append(f"- {section}.{name}")
            else:
                out += _changes(f"{section}.{name}", a[name], b[name])
    return out


def _changes(path: str, a, b) -> list[str]:
    if a == b:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key not in a:
                out.append(f"~ {path}.{key}: (unset) → {_show(b[key])}")
            elif key not in b:
                out.append(f"~ {path}.{key}: {_show(a[key])} → (unset)")
            else:
                out += _changes(f"{path}.{key}", a[key], b[key])
        return out
    return [f"~ {path}: {_show(a)} → {_show(b)}"]


def _show(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "null"
    return str(value)
