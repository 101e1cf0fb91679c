"""docs/soc-reference.md and docs/siem-export.md against the code, so the docs fail a test when they fall
behind: every event type the controller records is described; the mapping table is exactly `MAPPINGS`;
every CEF key `formats.cef` emits is in the CEF section; every field of the session evidence body is
listed; the sinks file example loads and shows every setting of every kind."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

from controller.audit import formats, sinks
from tests.siemlab import parse_cef
from tests.test_siem_formats import SAMPLES, recorded_types

REPO = Path(__file__).resolve().parents[1]
SOC = (REPO / "docs" / "soc-reference.md").read_text()
SIEM = (REPO / "docs" / "siem-export.md").read_text()


def section(text: str, start: str, end: str) -> str:
    """The text between the heading line `start` and the next heading line `end`."""
    i = text.index("\n" + start + "\n")
    return text[i:text.index("\n" + end + "\n", i)]


def ticked(text: str) -> set[str]:
    return set(re.findall(r"`([^`\n]+)`", text))


def fenced_after(text: str, marker: str) -> str:
    """The first fenced block after an HTML comment marker."""
    m = re.search(re.escape(f"<!-- {marker} -->") + r"\n```[a-z]*\n(.*?)\n```", text, re.S)
    assert m, f"no fenced block after <!-- {marker} -->"
    return m.group(1)


def mapping_row(name: str, m: formats.Mapping) -> str:
    ok = formats.LEVELS[m.level].cef
    failed = formats.LEVELS[max(m.level, m.failure_level, key=formats._ORDER.index)].cef
    class_name = formats.OCSF_CLASSES[m.ocsf_class][0]
    activity = formats.OCSF_ACTIVITIES[m.ocsf_class][m.ocsf_activity]
    return (f"| `{name}` | {m.name} | {ok} / {failed} | {m.ecs_category} | {', '.join(m.ecs_type)} | "
            f"{m.ocsf_class} {class_name} | {m.ocsf_activity} {activity} | {m.ocsf_class * 100 + m.ocsf_activity} |")


# ---- event types -------------------------------------------------------------------------------------


def test_every_recorded_event_type_is_described():
    types = recorded_types()
    assert {"login", "session.evidence", "audit.sink_failed"} <= types  # the scan works
    described = ticked(section(SOC, "## 2. Event types", "### The mapping of each type"))
    missing = sorted(types - described)
    assert not missing, f"event types the controller records but docs/soc-reference.md does not describe: {missing}"


def test_the_mapping_table_is_exactly_the_code():
    expected = [mapping_row(t, m) for t, m in formats.MAPPINGS.items()]
    expected += [mapping_row(f"<{c}>", m) for c, m in formats._BY_CATEGORY.items()]
    expected.append(mapping_row("<other>", formats._GENERIC))
    table = fenced_or_table_after(SOC, "mapping-table")
    rows = [line for line in table if not line.startswith(("| type ", "|---"))]
    assert rows == expected, "the mapping table in docs/soc-reference.md differs from controller/audit/formats.py " \
                             "(regenerate it with mapping_row in this test)"


def fenced_or_table_after(text: str, marker: str) -> list[str]:
    """The markdown table right after an HTML comment marker, as its lines."""
    tail = text[text.index(f"<!-- {marker} -->"):].splitlines()[1:]
    out = []
    for line in tail:
        if not line.startswith("|"):
            break
        out.append(line)
    assert out, f"no table after <!-- {marker} -->"
    return out


# ---- formats -------------------------------------------------------------------------------------------


def test_every_cef_key_is_in_the_cef_section():
    emitted: set[str] = set()
    for event in SAMPLES.values():
        _, ext = parse_cef(formats.cef(event, host="ctl-1"))
        emitted |= set(ext)
    assert {"cs1", "cs2", "cn1", "spt", "shost", "dpt", "in", "out"} <= emitted  # the samples cover them
    cef_section = section(SOC, "### CEF", "### Elastic ECS")
    rows = fenced_or_table_after(cef_section, "cef-keys")[2:]
    listed = {k for row in rows for k in ticked(row.split("|")[1])}
    missing = sorted(emitted - listed)
    assert not missing, f"CEF keys emitted by formats.cef but not in the CEF section of docs/soc-reference.md: {missing}"
    unknown = sorted(listed - emitted)
    assert not unknown, f"CEF keys in docs/soc-reference.md that formats.cef never emits: {unknown}"


def test_every_field_of_the_session_evidence_body_is_listed():
    tree = ast.parse((REPO / "controller" / "session_evidence.py").read_text())
    compose = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "compose")
    body = next(n.value for n in ast.walk(compose) if isinstance(n, ast.Return) and isinstance(n.value, ast.Dict))
    keys = {k.value for k in body.keys if isinstance(k, ast.Constant)}
    assert {"session_id", "lanes", "node_evidence"} <= keys
    table = "\n".join(fenced_or_table_after(SOC, "evidence-body"))
    listed = {k.strip() for cell in ticked(table) for k in cell.split(",")}
    missing = sorted(keys - listed)
    assert not missing, f"session.evidence body fields not in docs/soc-reference.md section 4: {missing}"


# ---- the sinks file ------------------------------------------------------------------------------------


def test_the_sinks_example_loads_and_shows_every_setting(tmp_path):
    text = fenced_after(SIEM, "sinks-example")
    for prefix in ("/etc/wicket/siem/", "/var/log/wicket/"):
        text = text.replace(prefix, f"{tmp_path}/")
    for name in set(re.findall(rf"{re.escape(str(tmp_path))}/([\w.-]+)", text)) - {"audit.jsonl"}:
        (tmp_path / name).write_text("x\n")
    path = tmp_path / "sinks.toml"
    path.write_text(text)
    configs = sinks.load_sinks(path)
    assert {c.kind for c in configs} == set(sinks.KINDS)
    used: dict[str, set[str]] = {}
    for table in tomllib.loads(text)["sink"]:
        used.setdefault(table["kind"], set()).update(table)
    for kind in ("syslog-tls", "hec", "file"):
        wanted = sinks._ALLOWED[kind] - ({"timeout_s"} if kind == "file" else set())  # a file sink has no timeout
        assert used[kind] == wanted, (kind, wanted - used[kind])
    settings = ticked(section(SIEM, "## The sinks file", "## Syslog over TCP and TLS"))
    documented = {k.strip() for cell in settings for k in cell.split(",")}
    missing = sorted(set().union(*sinks._ALLOWED.values()) - documented)
    assert not missing, f"sink settings not described in docs/siem-export.md: {missing}"


@pytest.mark.parametrize("doc", ["siem-export.md", "soc-reference.md", "device-baselines.md"])
def test_links_to_other_docs_resolve(doc):
    text = (REPO / "docs" / doc).read_text()
    for target, anchor in re.findall(r"\]\(([\w.-]+\.md)?(?:#([\w-]+))?\)", text):
        page = (REPO / "docs" / target).read_text() if target else text
        if anchor:
            slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", page, re.M)}
            assert anchor in slugs, f"{doc}: link to {target or doc}#{anchor}: no such heading"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")
