"""Load policy files: parse, merge, validate strictly, and give the result a version.

  policy = load_files({"tasks.yaml": text, ...})      # raises PolicyError listing every problem
  policy.version                                       # "sha256:…" of the canonical content

The version is a hash of the merged, canonical content (sections keyed by name, lists sorted), so
comments, formatting, file layout and the order of entries do not change it; any change of meaning does.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from importlib import resources

from pydantic import BaseModel, ValidationError

from .model import (
    FORMAT,
    SECTIONS,
    ChangeWindow,
    Destination,
    DeviceType,
    Limits,
    Location,
    PolicyDocument,
    ProtocolDef,
    Task,
)
from .source import Located, PolicyError, parse, path_text

CATALOGUE = "(built-in catalogue)"
_TOP = {"wicket_policy", "limits", *SECTIONS}
_ENTRY_MODELS: dict[str, type[BaseModel]] = {
    "protocols": ProtocolDef, "destinations": Destination, "device_types": DeviceType, "tasks": Task,
    "change_windows": ChangeWindow, "locations": Location,
}
_NAME = {"protocols": re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")}
_DEFAULT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
MAX_TOTAL_SESSION = timedelta(hours=24)
MAX_FILES, MAX_BYTES = 64, 4 * 1024 * 1024


@dataclass(frozen=True)
class Policy:
    document: PolicyDocument
    version: str
    files: dict[str, str] = field(default_factory=dict, compare=False)

    @cached_property
    def canonical(self) -> dict:
        return canonical(self.document)

    @cached_property
    def compiled(self):
        from .engine import compile_policy

        return compile_policy(self.document)


def builtin_catalogue() -> str:
    return resources.files("controller.policy").joinpath("catalogue.yaml").read_text()


def load_files(files: dict[str, str]) -> Policy:
    """Policy from named file texts (the built-in catalogue is added first)."""
    if not files:
        raise PolicyError(["no policy files given"])
    if len(files) > MAX_FILES or sum(len(t) for t in files.values()) > MAX_BYTES:
        raise PolicyError([f"at most {MAX_FILES} files and {MAX_BYTES // 1024 // 1024} MiB of policy"])
    problems: list[str] = []
    parsed: list[Located] = [parse(CATALOGUE, builtin_catalogue())]
    for name in sorted(files):
        try:
            parsed.append(parse(name, files[name]))
        except PolicyError as exc:
            problems.extend(exc.problems)
    unreadable = bool(problems)
    merged, origin = _merge(parsed, problems)
    document = _validate(merged, origin, problems)
    if not unreadable:  # references into an unreadable file would be reported as dangling
        _cross_check(document, {section: set(merged[section]) for section in SECTIONS}, origin, problems)
    if problems:
        raise PolicyError(problems)
    canon = canonical(document)
    digest = hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return Policy(PolicyDocument.model_validate(canon), f"sha256:{digest}", dict(files))


def canonical(document: PolicyDocument) -> dict:
    """The document as plain JSON data in one order: keys sorted, every list sorted and de-duplicated."""
    return _sorted(document.model_dump(mode="json"))


# ---- helpers ----

_Origin = dict[tuple[str, str], Located]  # (section, entry name) → the file it came from


def _merge(parsed: list[Located], problems: list[str]) -> tuple[dict, _Origin]:
    merged: dict = {s: {} for s in SECTIONS}
    origin: _Origin = {}
    for f in parsed:
        data = f.data
        if not isinstance(data, dict):
            problems.append(f"{f.where(())}: a policy file is a mapping of sections ({', '.join(sorted(_TOP))})")
            continue
        if data.get("wicket_policy") != FORMAT or type(data.get("wicket_policy")) is not int:  # True == 1 in Python
            problems.append(f"{f.where(('wicket_policy',))}: every policy file starts with `wicket_policy: {FORMAT}` (the format version)")
        for key, value in data.items():
            if key not in _TOP:
                problems.append(f"{f.where((key,))}: unknown section {key!r}; known: {', '.join(sorted(_TOP))}")
            elif key == "limits":
                if ("limits", "") in origin:
                    problems.append(f"{f.where((key,))}: limits are already set in {origin[('limits', '')].where(('limits',))}")
                else:
                    merged["limits"], origin[("limits", "")] = value, f
            elif key in SECTIONS:
                if value is None:
                    continue
                if not isinstance(value, dict):
                    problems.append(f"{f.where((key,))}: {key} is a mapping of name → entry")
                    continue
                for name, entry in value.items():
                    if name in merged[key]:
                        first = origin[(key, name)]
                        also = "the built-in catalogue" if first.name == CATALOGUE else first.where((key, name))
                        problems.append(f"{f.where((key, name))}: {key}.{name} is already defined in {also}")
                        continue
                    merged[key][name], origin[(key, name)] = entry, f
    return merged, origin


def _validate(merged: dict, origin: _Origin, problems: list[str]) -> PolicyDocument:
    """The document of every entry that validates (problems name the others), so that references can
    still be checked."""
    entries: dict = {}
    for section in SECTIONS:
        entries[section] = {}
        for name, value in merged[section].items():
            if not isinstance(name, str) or not _NAME.get(section, _DEFAULT_NAME).match(name):
                problems.append(f"{origin[(section, name)].where((section, name))}: {name!r} is not a valid name: "
                                "use lower-case letters, digits, - and _ (protocols: at most 32 characters; others 48)")
                continue
            try:
                entries[section][name] = _ENTRY_MODELS[section].model_validate(value)
            except ValidationError as exc:
                _report(exc, (section, name), origin[(section, name)], problems)
    if "limits" in merged:
        try:
            entries["limits"] = Limits.model_validate(merged["limits"])
        except ValidationError as exc:
            _report(exc, ("limits",), origin[("limits", "")], problems)
    return PolicyDocument(**entries)  # the entries are validated models: nothing left to fail


def _report(exc: ValidationError, prefix: tuple, located: Located, problems: list[str]) -> None:
    for err in exc.errors():
        loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and ("[" in x or x.startswith("function-"))))
        path = prefix + loc
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; docs/policy.md lists every key)"
        problems.append(f"{located.where(path)}: {path_text(path)}: {message}")


def _cross_check(doc: PolicyDocument, known: dict[str, set], origin: _Origin, problems: list[str]) -> None:
    """References between entries. `known`: every entry's name, also of entries that failed their
    schema (those are reported already, and a reference to them is not dangling)."""
    def bad(section: str, name: str, path: tuple, message: str) -> None:
        full = (section, name, *path)
        problems.append(f"{origin[(section, name)].where(full)}: {path_text(full)}: {message}")

    for name, dt in doc.device_types.items():
        for i, proto in enumerate(dt.access):
            if proto not in known["protocols"]:
                bad("device_types", name, ("access", i), f"unknown protocol {proto!r}")
        for i, flow in enumerate(dt.baseline):
            if flow.protocol not in known["protocols"]:
                bad("device_types", name, ("baseline", i, "protocol"), f"unknown protocol {flow.protocol!r}")
            for j, dest in enumerate(flow.to):
                if dest not in known["destinations"]:
                    bad("device_types", name, ("baseline", i, "to", j), f"unknown destination {dest!r}")
        if dt.commissioning is not None:
            task = doc.tasks.get(dt.commissioning)
            if dt.commissioning not in known["tasks"]:
                bad("device_types", name, ("commissioning",), f"unknown task {dt.commissioning!r}")
            elif task is not None and not task.is_grant:
                bad("device_types", name, ("commissioning",), f"task {dt.commissioning!r} is not a grant task: "
                    "commissioning opens a grant (a task with `grant`)")
            elif task is not None and name not in task.device_types:
                bad("device_types", name, ("commissioning",), f"task {dt.commissioning!r} is not for {name} "
                    f"(its device_types: {', '.join(sorted(task.device_types))})")
    for name, task in doc.tasks.items():
        for i, flow in enumerate(task.grant.flows if task.grant else ()):
            if flow.protocol not in known["protocols"]:
                bad("tasks", name, ("grant", "flows", i, "protocol"), f"unknown protocol {flow.protocol!r}")
            for j, dest in enumerate(flow.to):
                if dest not in known["destinations"]:
                    bad("tasks", name, ("grant", "flows", i, "to", j), f"unknown destination {dest!r}")
                elif dest in doc.destinations and not _reachable_v4(doc.destinations[dest]):
                    bad("tasks", name, ("grant", "flows", i, "to", j), f"destination {dest!r} has only IPv6 addresses; "
                        "agents enforce flows to IPv4 addresses and FQDNs only")
        for i, proto in enumerate(task.protocols):
            if proto not in known["protocols"]:
                bad("tasks", name, ("protocols", i), f"unknown protocol {proto!r}")
        for i, dt_name in enumerate(task.device_types):
            if dt_name not in known["device_types"]:
                bad("tasks", name, ("device_types", i), f"unknown device type {dt_name!r}")
            dt = doc.device_types.get(dt_name)
            if dt is None:
                continue
            for proto in task.protocols:
                if proto in doc.protocols and proto not in dt.access:
                    bad("tasks", name, ("device_types", i),
                        f"device type {dt_name!r} does not allow {proto!r} (its access: {', '.join(sorted(dt.access))})")
        ext = task.extensions
        if ext.max_total is not None and task.duration.max + ext.max_total > MAX_TOTAL_SESSION:
            bad("tasks", name, ("extensions", "max_total"), "the maximum duration plus max_total exceeds 24h")
    for name, loc in doc.locations.items():
        for i, t in enumerate(loc.tasks):
            if t not in known["tasks"]:
                bad("locations", name, ("tasks", i), f"unknown task {t!r}")


def _reachable_v4(dest) -> bool:
    return bool(dest.fqdn) or any(":" not in a for a in dest.addresses)


def _sorted(value):
    if isinstance(value, dict):
        return {k: _sorted(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        items = [_sorted(v) for v in value]
        unique = {json.dumps(v, sort_keys=True): v for v in items}
        return [unique[k] for k in sorted(unique)]
    return value
