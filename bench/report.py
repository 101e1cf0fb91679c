"""docs/benchmarks.md, shared by the benchmarks: each writes only its own section, between marker
comments, and keeps the others as they are.

  write_section(path, "policy", text)     # called by bench.lanes ("lanes") and bench.policy ("policy")

A section that is not in the file yet is appended. A file without any markers is the report
bench.lanes wrote whole before sections existed: its text (under the title) is kept as the lanes section.
"""

from __future__ import annotations

import re
from pathlib import Path

TITLE = "# Benchmarks"
INTRO = ("Each section below is written by one benchmark, from one run of it, and says when and on which\n"
         "machine; `make bench` runs them all.")
LEGACY_SECTION = "lanes"
_SECTION = re.compile(r"<!-- bench:([a-z0-9-]+) -->\n(.*?)\n<!-- /bench:\1 -->", re.S)


def write_section(path: Path, name: str, text: str) -> None:
    """Replace (or append) section `name` of the report at `path` with `text`."""
    sections = read_sections(path)
    sections[name] = text.strip("\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(sections))


def read_sections(path: Path) -> dict[str, str]:
    """The sections of the report in file order; {} when there is no report yet."""
    if not path.exists():
        return {}
    text = path.read_text()
    found = {m.group(1): m.group(2) for m in _SECTION.finditer(text)}
    if found or not text.strip():
        return found
    body = text.removeprefix(TITLE + "\n").strip("\n")
    return {LEGACY_SECTION: body}


def render(sections: dict[str, str]) -> str:
    parts = [f"{TITLE}\n\n{INTRO}\n"]
    parts += [f"<!-- bench:{name} -->\n{text}\n<!-- /bench:{name} -->\n" for name, text in sections.items()]
    return "\n".join(parts)
