"""Grant tasks and device types' commissioning in policy files: what loads, and every refusal named with
file and line like the loader's others. No database: these are the loader's and the engine's rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from controller.policy import (
    AccessRequest,
    DeviceFacts,
    PolicyError,
    SiteFacts,
    UserFacts,
    evaluate,
    load_files,
)

from .conftest import example_policy_files

TYPES = """\
wicket_policy: 1
destinations:
  scada: {addresses: [198.51.100.10]}
  v6-collector: {addresses: ["2001:db8::10"]}
  broker: {fqdn: broker.example.net}
device_types:
  rtu:
    title: RTU
    access: [iec104, ssh]
    baseline:
      - {protocol: iec104, to: [scada]}
"""


def problems(files: dict[str, str]) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_files(files)
    return caught.value.problems


def grant_task(body: str, name: str = "window") -> str:
    lines = "".join(f"    {line}\n" for line in body.strip("\n").splitlines())
    return f"wicket_policy: 1\ntasks:\n  {name}:\n    title: T\n    device_types: [rtu]\n    roles: [engineer]\n{lines}"


def test_a_grant_task_and_a_commissioning_load_and_old_policies_keep_their_version():
    files = {"types.yaml": TYPES.replace("      - {protocol: iec104, to: [scada]}\n",
                                         "      - {protocol: iec104, to: [scada]}\n    commissioning: window\n"),
             "tasks.yaml": grant_task("grant:\n  flows:\n    - {protocol: dnp3, to: [scada, broker], ports: [20001]}")}
    doc = load_files(files).document
    assert doc.device_types["rtu"].commissioning == "window"
    task = doc.tasks["window"]
    assert task.is_grant and task.protocols == [] and task.grant.flows[0].ports == [20001]
    # keys added for grants are left out of the content while unset: a policy without them keeps its version
    canon = load_files(example_policy_files()).canonical
    assert "grant" not in canon["tasks"]["iec104-diagnostics"] and "commissioning" not in canon["device_types"]["substation-rtu"]
    assert canon["device_types"]["der-gateway"]["commissioning"] == "der-commissioning-mqtt"


@pytest.mark.parametrize(("body", "line", "message"), [
    ("grant:\n  flows:\n    - {protocol: gopher, to: [scada]}", 9,
     "tasks.window.grant.flows[0].protocol: unknown protocol 'gopher'"),
    ("grant:\n  flows:\n    - {protocol: dnp3, to: [scada, mdm]}", 9,
     "tasks.window.grant.flows[0].to[1]: unknown destination 'mdm'"),
    ("grant:\n  flows:\n    - {protocol: dnp3, to: [v6-collector]}", 9,
     "tasks.window.grant.flows[0].to[0]: destination 'v6-collector' has only IPv6 addresses; agents enforce flows "
     "to IPv4 addresses and FQDNs only"),
    ("grant: {flows: []}", 7, "tasks.window.grant.flows: List should have at least 1 item after validation, not 0"),
    ("grant:\n  flows:\n    - {protocol: dnp3}", 9, "tasks.window.grant.flows[0].to: Field required"),
    ("grant:\n  flows:\n    - {protocol: dnp3, to: [scada], port: 1}", 9,
     "tasks.window.grant.flows[0].port: unknown key (check the spelling; docs/policy.md lists every key)"),
    ("protocols: [iec104]\ngrant:\n  flows:\n    - {protocol: dnp3, to: [scada]}", 3,
     "tasks.window: a grant task opens flows for the device, not a lane for an engineer: leave out protocols"),
    ("grant: {flows: [{protocol: dnp3, to: [scada]}]}\nbreak_glass: true\nrecording: payload\n"
     "extensions: {reason_codes: [overrun], max_count: 1, max_total: 30m}", 3,
     "tasks.window: a grant task opens flows for the device, not a lane for an engineer: leave out break_glass, "
     "recording: payload, extensions"),
    ("duration: {default: 1h, max: 2h}", 3,
     "tasks.window: a task needs protocols (engineers' access to the device), or `grant` (flows the device may open "
     "for a while)"),
])
def test_grant_task_problems_name_file_and_line(body, line, message):
    assert problems({"types.yaml": TYPES, "tasks.yaml": grant_task(body)}) == [f"tasks.yaml:{line}: {message}"]


@pytest.mark.parametrize(("commissioning", "tasks", "message"), [
    ("nothing", "", "unknown task 'nothing'"),
    ("diag", "diag", "task 'diag' is not a grant task: commissioning opens a grant (a task with `grant`)"),
    ("window", "window-for-others", "task 'window' is not for rtu (its device_types: meter)"),
])
def test_commissioning_names_a_grant_task_for_its_own_type(commissioning, tasks, message):
    types = TYPES + f"    commissioning: {commissioning}\n  meter:\n    title: Meter\n    access: [dlms]\n"
    files = {"types.yaml": types}
    if tasks == "diag":
        files["tasks.yaml"] = ("wicket_policy: 1\ntasks:\n  diag:\n    title: D\n    protocols: [iec104]\n"
                               "    device_types: [rtu]\n    roles: [engineer]\n")
    elif tasks:
        files["tasks.yaml"] = grant_task("grant: {flows: [{protocol: dlms, to: [scada]}]}").replace("[rtu]", "[meter]")
    assert problems(files) == [f"types.yaml:12: device_types.rtu.commissioning: {message}"]


def test_the_engine_checks_a_grant_like_a_lane_but_its_flows_and_the_session_limit():
    policy = load_files({"types.yaml": TYPES, "tasks.yaml": grant_task("grant: {flows: [{protocol: dnp3, to: [scada, broker]}]}")})
    at = datetime(2026, 3, 10, 10, tzinfo=UTC)
    request = AccessRequest(UserFacts("alice", roles=(("engineer", "north"),), active_sessions=99),
                            DeviceFacts("rtu-1", "rtu", "north", addresses=("10.20.0.5",), last_seen=at),
                            SiteFacts("north", lan_networks=("10.20.0.0/24",)), "window", timedelta(hours=1), at)
    d = evaluate(policy, request)
    assert d.outcome == "allow" and d.access == ()
    assert d.as_dict()["grant"] == {"device_address": "10.20.0.5", "flows": [
        {"protocol": "dnp3", "transport": "tcp+udp", "ports": [20000], "to": ["broker", "scada"]}]}  # sorted, as all lists
    checks = {c.name: c for c in d.checks}
    assert checks["concurrency"].result == "not_applicable"
    assert checks["protocol"].reason == "grant from 10.20.0.5: dnp3 tcp+udp/20000 → broker, scada"
    denied = evaluate(policy, AccessRequest(request.user, DeviceFacts("rtu-1", "rtu", "north", last_seen=at),
                                            request.site, "window", None, at))
    assert denied.outcome == "deny" and denied.failed == ("protocol",) and "grant" not in denied.as_dict()
    assert denied.reason == "rtu-1 has no LAN address in its passport"
