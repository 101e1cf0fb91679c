"""The policy loader (`controller.policy.load_files`): every problem is reported, each naming file and line;
YAML is read strictly; the version follows meaning, not layout."""

from __future__ import annotations

import re
import signal
import time
from contextlib import contextmanager

import pytest

from controller.policy import PolicyError, load_files

TYPES = """\
wicket_policy: 1
destinations:
  scada: {addresses: [198.51.100.10]}
device_types:
  rtu:
    title: RTU
    access: [iec104, ssh]
    baseline:
      - {protocol: iec104, to: [scada]}
"""

TASK = """\
wicket_policy: 1
tasks:
  diag:
    title: Diagnostics
    protocols: [iec104]
    device_types: [rtu]
    roles: [engineer, contractor]
    duration: {default: 30m, max: 1h}
"""


def problems(files: dict[str, str]) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_files(files)
    assert caught.value.problems, "a PolicyError lists its problems"
    return caught.value.problems


def task(body: str, name: str = "diag") -> str:
    """A tasks file with one task whose lines after `title` are `body` (indented 4)."""
    lines = "".join(f"    {line}\n" for line in body.strip("\n").splitlines())
    return f"wicket_policy: 1\ntasks:\n  {name}:\n    title: T\n{lines}"


def test_the_two_files_above_load() -> None:
    policy = load_files({"types.yaml": TYPES, "tasks.yaml": TASK})
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", policy.version)
    assert policy.document.tasks["diag"].duration.max.total_seconds() == 3600
    assert "ssh" in policy.document.protocols  # the built-in catalogue is always there


# ---- errors name file and line -----------------------------------------------------------------------


def test_unknown_keys_name_file_line_and_path() -> None:
    found = problems({"types.yaml": TYPES, "tasks.yaml": task("""
titel: typo
protocols: [iec104]
device_types: [rtu]
roles: [engineer]
duration: {default: 30m, maximum: 1h}
"""), "extra.yaml": "wicket_policy: 1\n\ntask:\n  x: {}\n"})
    assert "tasks.yaml:5: tasks.diag.titel: unknown key (check the spelling; docs/policy.md lists every key)" in found
    assert any(p.startswith("tasks.yaml:9: tasks.diag.duration.maximum: unknown key") for p in found), found
    assert any(p.startswith("extra.yaml:3: unknown section 'task'; known: ") for p in found), found


def test_bad_networks_and_addresses() -> None:
    found = problems({"types.yaml": TYPES, "loc.yaml": """\
wicket_policy: 1
locations:
  office:
    networks:
      - 10.0.0.1/24
      - 300.1.2.3/8
      - not-a-network
      - 10.0.0.0/8
destinations:
  bad: {addresses: [198.51.100.300]}
"""})
    assert any(p.startswith("loc.yaml:5: locations.office.networks[0]: '10.0.0.1/24' is not a network in CIDR form") and "host bits" in p
               for p in found), found
    assert any(p.startswith("loc.yaml:6: locations.office.networks[1]: '300.1.2.3/8'") for p in found), found
    assert any(p.startswith("loc.yaml:7: locations.office.networks[2]: 'not-a-network'") for p in found), found
    assert any(p.startswith("loc.yaml:10: destinations.bad.addresses[0]: '198.51.100.300' is not an IP address") for p in found), found
    assert not any("networks[3]" in p for p in found)


@pytest.mark.parametrize("duration, line, message", [
    ("{default: 2h, max: 1h}", 8, "tasks.diag.duration: default 2h is longer than max 1h"),
    ("{default: 30m, max: 25h}", 8, "tasks.diag.duration: max is 1d1h; a session lasts at most 1d"),
    ("{default: 0m, max: 1h}", 8, "tasks.diag.duration.default: '0m' is not a positive duration"),
    ("{default: 30, max: 1h}", 8, "tasks.diag.duration.default: 30 is not a duration: write e.g. 30m, 1h30m, 90s or 2d"),
    ("{default: \"30\", max: 1h}", 8, "tasks.diag.duration.default: '30' is not a duration"),
    ("{default: 30m, max: 1x}", 8, "tasks.diag.duration.max: '1x' is not a duration"),
    ("{default: -5m, max: 1h}", 8, "tasks.diag.duration.default: '-5m' is not a duration"),
])
def test_impossible_durations(duration: str, line: int, message: str) -> None:
    found = problems({"types.yaml": TYPES, "tasks.yaml": task(f"""
protocols: [iec104]
device_types: [rtu]
roles: [engineer]
duration: {duration}
""")})
    assert any(p.startswith(f"tasks.yaml:{line}: {message}") for p in found), found


def test_impossible_extensions_and_silence() -> None:
    found = problems({"types.yaml": TYPES, "tasks.yaml": task("""
protocols: [iec104]
device_types: [rtu]
roles: [engineer]
duration: {default: 1h, max: 20h}
extensions: {reason_codes: [overrun], max_count: 1, max_total: 5h}
""") + task("""
protocols: [iec104]
device_types: [rtu]
roles: [engineer]
extensions: {max_count: 1}
""", name="other").removeprefix("wicket_policy: 1\ntasks:\n"), "limits.yaml": "wicket_policy: 1\nlimits:\n  max_silence: 0s\n"})
    # The entries that validate are cross-checked too, so every problem shows at once.
    assert "tasks.yaml:9: tasks.diag.extensions.max_total: the maximum duration plus max_total exceeds 24h" in found, found
    assert any(p.startswith("tasks.yaml:15: tasks.other.extensions: extensions need reason_codes") for p in found), found
    assert any(p.startswith("limits.yaml:3: limits.max_silence: '0s' is not a positive duration") for p in found), found


def test_extension_beyond_a_day_is_named() -> None:
    found = problems({"types.yaml": TYPES, "tasks.yaml": task("""
protocols: [iec104]
device_types: [rtu]
roles: [engineer]
duration: {default: 1h, max: 20h}
extensions: {reason_codes: [overrun], max_count: 1, max_total: 5h}
""")})
    assert found == ["tasks.yaml:9: tasks.diag.extensions.max_total: the maximum duration plus max_total exceeds 24h"]


def test_a_key_given_twice_is_an_error_not_last_wins() -> None:
    found = problems({"tasks.yaml": TASK.replace("    roles:", "    title: Second title\n    roles:")})
    assert found == ["tasks.yaml:7: not valid YAML: tasks.diag.title is given twice"]


def test_an_entry_defined_in_two_files() -> None:
    found = problems({"types.yaml": TYPES, "a.yaml": TASK, "b.yaml": "# the same name again\n" + TASK})
    assert found == ["b.yaml:4: tasks.diag is already defined in a.yaml:3"]


def test_limits_set_in_two_files() -> None:
    limits = "wicket_policy: 1\nlimits: {concurrent_sessions_per_user: 3}\n"
    found = problems({"types.yaml": TYPES, "a.yaml": limits, "b.yaml": limits})
    assert found == ["b.yaml:2: limits are already set in a.yaml:2"]


def test_a_builtin_protocol_cannot_be_redefined() -> None:
    found = problems({"types.yaml": TYPES, "protocols.yaml": """\
wicket_policy: 1
protocols:
  dnp3-alt: {title: DNP3 on another port, transport: tcp, ports: [20001]}
  iec104: {title: Our IEC-104, transport: tcp, ports: [2405]}
"""})
    assert found == ["protocols.yaml:4: protocols.iec104 is already defined in the built-in catalogue"]


def test_dangling_references_are_all_named() -> None:
    found = problems({"types.yaml": """\
wicket_policy: 1
device_types:
  rtu:
    title: RTU
    access: [iec104, telnet]
    baseline:
      - protocol: smtp
        to: [scada, nowhere]
""", "tasks.yaml": """\
wicket_policy: 1
tasks:
  diag:
    title: Diagnostics
    protocols: [iec104, gopher]
    device_types: [rtu, plc]
    roles: [engineer]
locations:
  office:
    tasks: [diag, fw-push]
    networks: [192.0.2.0/24]
"""})
    assert sorted(found) == sorted([
        "types.yaml:5: device_types.rtu.access[1]: unknown protocol 'telnet'",
        "types.yaml:7: device_types.rtu.baseline[0].protocol: unknown protocol 'smtp'",
        "types.yaml:8: device_types.rtu.baseline[0].to[0]: unknown destination 'scada'",
        "types.yaml:8: device_types.rtu.baseline[0].to[1]: unknown destination 'nowhere'",
        "tasks.yaml:5: tasks.diag.protocols[1]: unknown protocol 'gopher'",
        "tasks.yaml:6: tasks.diag.device_types[1]: unknown device type 'plc'",
        "tasks.yaml:10: locations.office.tasks[1]: unknown task 'fw-push'",
    ])


def test_a_task_whose_protocol_its_device_type_does_not_allow() -> None:
    found = problems({"types.yaml": TYPES, "tasks.yaml": TASK.replace("[iec104]", "[iec104, dnp3]")})
    assert found == ["tasks.yaml:6: tasks.diag.device_types[0]: device type 'rtu' does not allow 'dnp3' (its access: iec104, ssh)"]


def test_yaml_syntax_errors_name_file_and_line() -> None:
    found = problems({"types.yaml": TYPES, "tasks.yaml": TASK.replace("roles: [engineer, contractor]", "roles: [engineer, contractor")})
    assert len(found) == 1 and found[0].startswith("tasks.yaml:8: not valid YAML: "), found
    tabs = problems({"types.yaml": TYPES, "tasks.yaml": TASK.replace("    title:", "\ttitle:")})
    assert tabs[0].startswith("tasks.yaml:4: not valid YAML: "), tabs


def test_every_file_starts_with_the_format_version() -> None:
    found = problems({"types.yaml": TYPES.replace("wicket_policy: 1\n", ""), "tasks.yaml": TASK.replace("wicket_policy: 1", "wicket_policy: 2")})
    assert "types.yaml:1: every policy file starts with `wicket_policy: 1` (the format version)" in found
    assert "tasks.yaml:1: every policy file starts with `wicket_policy: 1` (the format version)" in found


def test_the_format_version_is_the_number_one() -> None:
    found = problems({"types.yaml": TYPES.replace("wicket_policy: 1", "wicket_policy: true"), "tasks.yaml": TASK})
    assert found == ["types.yaml:1: every policy file starts with `wicket_policy: 1` (the format version)"]


def test_names_must_be_plain() -> None:
    found = problems({"types.yaml": TYPES, "tasks.yaml": TASK.replace("  diag:", "  Diag Task:")})
    assert found[0].startswith("tasks.yaml:3: 'Diag Task' is not a valid name"), found


# ---- strict YAML ------------------------------------------------------------------------------------


WINDOW = """\
wicket_policy: 1
change_windows:
  nights:
    timezone: Europe/Berlin
    weekly:
      - {{days: [mon], start: {start}, end: {end}}}
"""


def test_unquoted_times_of_day_stay_times() -> None:
    unquoted = load_files({"w.yaml": WINDOW.format(start="22:00", end="24:00")})
    quoted = load_files({"w.yaml": WINDOW.format(start='"22:00"', end='"24:00"')})
    rule = unquoted.document.change_windows["nights"].weekly[0]
    assert (rule.start, rule.end) == ("22:00", "24:00")  # YAML 1.1 would have read 1320 and 1440
    assert unquoted.version == quoted.version


def test_times_of_day_must_be_hh_mm() -> None:
    found = problems({"w.yaml": WINDOW.format(start="9:30", end="1320")})
    assert any(p.startswith("w.yaml:6: change_windows.nights.weekly[0].start: '9:30' is not a time of day") for p in found), found
    assert any(p.startswith("w.yaml:6: change_windows.nights.weekly[0].end: 1320 is not a time of day") for p in found), found


@pytest.mark.parametrize("value", [
    "!!python/object/apply:os.system [echo owned]", "!secret db-password", "!!binary aGVsbG8=", "!!set {a: null}",
])
def test_custom_tags_are_refused(value: str) -> None:
    found = problems({"types.yaml": TYPES, "tasks.yaml": TASK.replace("title: Diagnostics", f"title: {value}")})
    assert len(found) == 1 and found[0].startswith("tasks.yaml:4: not valid YAML: the tag ") and "is not allowed in policy files" in found[0], found


def test_merge_keys_are_refused() -> None:
    found = problems({"tasks.yaml": "wicket_policy: 1\ncommon: &c {roles: [engineer]}\ntasks:\n  diag:\n    <<: *c\n    title: T\n"})
    assert found == ["tasks.yaml:5: not valid YAML: merge keys (<<) are not allowed: write entries out, so a review sees them"]


def test_an_alias_bomb_is_refused_quickly() -> None:
    bomb = "wicket_policy: 1\nx0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
    bomb += "".join(f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 8))
    with deadline(1.0), pytest.raises(PolicyError):
        load_files({"bomb.yaml": bomb})


@contextmanager
def deadline(seconds: float):
    """Raise TimeoutError in the test after `seconds`; keeps pytest-timeout's own alarm."""
    def expired(_signum, _frame):
        raise TimeoutError(f"still working after {seconds}s")

    handler = signal.signal(signal.SIGALRM, expired)
    pending, interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, handler)
        if pending:
            signal.setitimer(signal.ITIMER_REAL, max(pending - (time.monotonic() - started), 0.01), interval)


# ---- every problem, not only the first ----------------------------------------------------------------


def test_every_problem_is_reported_across_entries_and_files() -> None:
    found = problems({
        "types.yaml": TYPES.replace("title: RTU", "title: RTU\n    colour: red"),
        "tasks.yaml": TASK.replace("roles: [engineer, contractor]", "roles: [janitor]").replace("max: 1h", "max: 2d"),
        "windows.yaml": WINDOW.format(start='"22:00"', end='"22:00"'),
        "broken.yaml": "wicket_policy: 1\ntasks: {\n",
    })
    assert [p.split(":")[0] for p in found].count("broken.yaml") == 1
    expected_starts = [
        "broken.yaml:3: not valid YAML",
        "types.yaml:7: device_types.rtu.colour: unknown key",
        "tasks.yaml:7: tasks.diag.roles[0]: Input should be",
        "tasks.yaml:8: tasks.diag.duration: max is 2d",
        "windows.yaml:6: change_windows.nights.weekly[0]: start and end are the same",
    ]
    for start in expected_starts:
        assert any(p.startswith(start) for p in found), (start, found)
    assert len(found) == len(expected_starts), found
    assert str(PolicyError(found)).startswith(f"{len(found)} problems: ")


def test_references_are_checked_even_when_another_entry_is_invalid() -> None:
    found = problems({"types.yaml": TYPES, "tasks.yaml": TASK.replace("[rtu]", "[plc]"),
                      "loc.yaml": "wicket_policy: 1\nlocations:\n  office: {networks: [10.0.0.1/24]}\n"})
    assert any(p.startswith("loc.yaml:3: locations.office.networks[0]") for p in found), found
    assert any(p.startswith("tasks.yaml:6: tasks.diag.device_types[0]: unknown device type 'plc'") for p in found), found


# ---- the version follows meaning -----------------------------------------------------------------------


REWRITTEN = {
    # the same two files' meaning: other file names, one file, flow style, comments, other key and list
    # order, a duplicated list item, 60m for 1h and defaults written out
    "everything.yaml": """\
# one file instead of two
tasks:
  diag: {roles: [contractor, engineer, engineer], device_types: [rtu], protocols: [iec104],
         duration: {max: 60m, default: 30m}, title: Diagnostics,
         approval: {required: false}, change_window: false}   # defaults, written out
wicket_policy: 1
device_types:
  rtu:
    baseline: [{to: [scada], protocol: iec104}]
    access: [ssh, iec104]
    title: RTU
destinations:
  scada:
    addresses:
      - 198.51.100.10
""",
}


def test_version_ignores_comments_layout_order_and_spelling() -> None:
    original = load_files({"types.yaml": TYPES, "tasks.yaml": TASK})
    assert load_files(REWRITTEN).version == original.version
    assert load_files({"z.yaml": TYPES, "a.yaml": TASK}).version == original.version
    assert load_files(REWRITTEN).canonical == original.canonical


@pytest.mark.parametrize("change", [
    ("tasks.yaml", "max: 1h", "max: 2h"),
    ("tasks.yaml", "[engineer, contractor]", "[engineer]"),
    ("tasks.yaml", "    duration:", "    approval: {required: true}\n    duration:"),
    ("tasks.yaml", "    duration:", "    recording: payload\n    duration:"),
    ("types.yaml", "198.51.100.10", "198.51.100.11"),
    ("types.yaml", "title: RTU", "title: Remote terminal unit"),
    ("types.yaml", "access: [iec104, ssh]", "access: [iec104, ssh, dnp3]"),
])
def test_version_changes_with_meaning(change: tuple[str, str, str]) -> None:
    files = {"types.yaml": TYPES, "tasks.yaml": TASK}
    name, old, new = change
    assert old in files[name]
    changed = files | {name: files[name].replace(old, new)}
    assert load_files(changed).version != load_files(files).version


def test_version_changes_with_limits_and_windows() -> None:
    files = {"types.yaml": TYPES, "tasks.yaml": TASK}
    base = load_files(files).version
    versions = {
        load_files(files | {"l.yaml": "wicket_policy: 1\nlimits: {concurrent_sessions_per_user: 3}\n"}).version,
        load_files(files | {"l.yaml": "wicket_policy: 1\nlimits: {max_silence: null}\n"}).version,
        load_files(files | {"w.yaml": WINDOW.format(start='"22:00"', end='"04:00"')}).version,
        load_files(files | {"w.yaml": WINDOW.format(start='"22:00"', end='"05:00"')}).version,
        load_files(files | {"w.yaml": WINDOW.format(start='"22:00"', end='"05:00"').replace("Europe/Berlin", "UTC")}).version,
    }
    assert len(versions) == 5 and base not in versions
    # limits written out at their defaults mean the same as no limits at all
    same = load_files(files | {"l.yaml": "wicket_policy: 1\nlimits: {concurrent_sessions_per_user: 2, max_silence: 24h}\n"})
    assert same.version == base
