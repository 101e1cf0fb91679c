"""Baselines and grants through the whole product in the lab: the controller (its own process, SQLite) sends
each device type's baseline to the real agent over the link; a firmware grant goes request → approval →
activation → sign-off; binding a DER gateway activates its passport and opens its commissioning grant;
a device's breach reaches the audit chain and the SIEM file sink. Every check is a real connection from a
device's namespace."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.lab.controller import LabController, policy
from tests.lab.site import AgentProcess, py, serve, wait_for

pytestmark = pytest.mark.lab

PORTS = (2404, 4059, 443, 1883)


def lab_policy(lab) -> dict[str, str]:
    files = policy(default_s=120)
    files["lab.yaml"] = files["lab.yaml"].replace("""device_types:
  substation-rtu:
    title: Substation RTU
    access: [iec104]
""", f"""destinations:
  scada-master: {{addresses: [{lab.addr("scada")}]}}
  mdm: {{addresses: [{lab.addr("mdm")}]}}
  der-broker: {{addresses: [{lab.addr("broker")}]}}
  der-vendor: {{addresses: [{lab.addr("broker")}]}}
device_types:
  substation-rtu:
    title: Substation RTU
    access: [iec104]
    baseline: [{{protocol: iec104, to: [scada-master]}}]
  meter-concentrator:
    title: Meter data concentrator
    access: [dlms]
    baseline: [{{protocol: dlms, to: [mdm]}}]
  der-gateway:
    title: DER gateway
    access: [mqtt]
    baseline: [{{protocol: mqtt, to: [der-broker]}}]
    commissioning: der-commissioning
""")
    files["lab.yaml"] = files["lab.yaml"].replace("limits:", """  firmware-window:
    title: Firmware window (concentrators fetch their image from the MDM over HTTPS)
    grant: {flows: [{protocol: https, to: [mdm]}]}
    device_types: [meter-concentrator]
    roles: [engineer]
    duration: {default: 10m, max: 1h}
    approval: {required: true}
  der-commissioning:
    title: DER gateway commissioning (activation at the vendor's portal)
    grant: {flows: [{protocol: https, to: [der-vendor]}]}
    device_types: [der-gateway]
    roles: [site_admin]
    duration: {default: 30m, max: 2h}
limits:""")
    return files


@pytest.fixture(scope="module")
def product(tmp_path_factory):
    from tests.lab import Lab, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("grantlab")
    with Lab(devices=("rtu1", "meter1", "der1"), masters=("scada", "ctl", "mdm", "broker"), engineers=()) as lab:
        for role in ("scada", "mdm", "broker"):
            serve(lab, role, tcp=PORTS)
        ctl = LabController(lab, work / "ctl", policy_files=lab_policy(lab), people=(("sam", "site_admin"), ("sally", "soc")),
                            devices=({"asset_id": "MTR-1", "device_type": "meter-concentrator", "role": "meter1"},
                                     {"asset_id": "DER-1", "device_type": "der-gateway", "role": "der1",
                                      "lifecycle": "provisioned"})).setup()
        sink = work / "siem.jsonl"
        (ctl.dir / "data").mkdir(parents=True, exist_ok=True)
        (ctl.dir / "data" / "sinks.toml").write_text(
            f'[[sink]]\nname = "lab-file"\nkind = "file"\npath = "{sink}"\nformat = "cef"\n')
        agent = AgentProcess(lab)
        conf = Path(agent.state_dir) / "agent.toml"
        conf.write_text("breach_report_s = 1.0\n")
        agent.extra += ["--config", str(conf)]
        try:
            ctl.start()
            out = ctl.enrol(agent)
            assert "enrolled as" in out.stdout, out.stdout + out.stderr
            agent.start()
            assert wait_for(lambda: (agent.status().get("baseline") or {}).get("devices") == 2, timeout=20), agent.status()
            yield lab, ctl, agent, sink
        except Exception:
            print(ctl.log()[-4000:])
            print(agent.log()[-4000:])
            raise
        finally:
            agent.stop()
            ctl.close()
            agent.remove_state()
            shutil.rmtree(work, ignore_errors=True)


def probe(lab, role: str, host: str, port: int) -> str:
    return lab.exec(role, py("tests.lab.traffic", "probe", host, str(port), "--timeout", "1")).stdout.strip()


def test_the_controller_sends_each_types_baseline_and_the_agent_enforces_it(product):
    lab, _ctl, _agent, _sink = product
    mdm, scada, broker = lab.addr("mdm"), lab.addr("scada"), lab.addr("broker")
    assert probe(lab, "rtu1", scada, 2404) == "open"
    assert probe(lab, "rtu1", mdm, 2404) == "refused"
    assert probe(lab, "meter1", mdm, 4059) == "open"
    assert probe(lab, "meter1", mdm, 443) == "refused", "no firmware flow outside a grant"
    assert probe(lab, "der1", broker, 443) == "open", "not yet bound: no active passport, left to the router"


def test_a_firmware_grant_goes_request_approve_activate_and_sign_off(product):
    lab, ctl, _agent, _sink = product
    mdm = lab.addr("mdm")
    asked = ctl.call("POST", "/grants", "erin", step_up=True, expect=201,
                     json={"task": "firmware-window", "devices": ["MTR-1"], "reason": "FW 7.2 campaign, WO-88"}).json()
    (g,) = asked["grants"]
    assert g["state"] == "pending_approval"
    assert probe(lab, "meter1", mdm, 443) == "refused", "nothing before the approval"
    ctl.call("POST", f"/grants/{g['id']}/approve", "alex", step_up=True, json={"reason": "campaign approved in CAB"})
    out = ctl.call("POST", f"/grants/{g['id']}/activate", "erin", step_up=True, json={}).json()
    assert out["grants"][0]["state"] == "active", out
    assert wait_for(lambda: probe(lab, "meter1", mdm, 443) == "open", timeout=10)
    assert probe(lab, "rtu1", mdm, 443) == "refused", "the grant is the meter's only"

    ctl.call("POST", f"/grants/{g['id']}/close", "erin", json={"reason": "all concentrators on 7.2, signed off"})
    assert wait_for(lambda: probe(lab, "meter1", mdm, 443) == "refused", timeout=10)
    assert probe(lab, "meter1", mdm, 4059) == "open", "the baseline stays"

    def evidence():
        items = ctl.call("GET", f"/events?type=session.evidence&session={g['id']}", "sally").json()
        return items[0] if items else None

    ev = wait_for(evidence, timeout=15)
    assert ev, "the grant's evidence record"
    body = ev["body"]
    assert body["kind"] == "grant" and body["end_reason"] == "signed_off" and body["node_evidence"] == "delivered", body
    assert body["destinations"] == {"mdm": [mdm]}
    (lane,) = body["lanes"]
    signed = lane["evidence"]
    assert signed["scope"] == "grant" and signed["device_address"] == lab.addr("meter1")
    assert signed["flows"] and all(f["dst"] == mdm and f["dport"] == 443 for f in signed["flows"]), signed["flows"]


def test_binding_a_der_gateway_activates_its_baseline_and_opens_its_commissioning(product):
    lab, ctl, _agent, _sink = product
    broker = lab.addr("broker")
    out = ctl.call("POST", "/devices/DER-1/bind", "sam", step_up=True,
                   json={"iccid": "8931440301234567897", "imsis": ["901700000012345"], "reason": "installed, WO-1200"}).json()
    commissioning = out["commissioning"]
    assert commissioning["task"] == "der-commissioning" and commissioning["grant"]["state"] == "active", out
    gid = commissioning["grant"]["id"]
    # the baseline is on (MQTT to the broker, nothing else) and the commissioning flow is open
    assert wait_for(lambda: probe(lab, "der1", broker, 2404) == "refused", timeout=10), "baseline enforced after bind"
    assert probe(lab, "der1", broker, 1883) == "open"
    assert probe(lab, "der1", broker, 443) == "open", "the vendor portal, for commissioning"
    ctl.call("POST", f"/grants/{gid}/close", "sam", json={"reason": "commissioning signed off"})
    assert wait_for(lambda: probe(lab, "der1", broker, 443) == "refused", timeout=10)
    assert probe(lab, "der1", broker, 1883) == "open"


def test_a_breach_reaches_the_audit_chain_and_the_siem(product):
    lab, ctl, _agent, sink = product
    assert probe(lab, "meter1", lab.addr("scada"), 2404) == "refused"

    scada = {"destination": lab.addr("scada"), "proto": "tcp", "port": 2404}

    def breach():
        items = ctl.call("GET", "/events?type=device.breach&device=MTR-1", "sally").json()
        return next((e for e in items if any(scada.items() <= d.items() for d in e["body"]["destinations"])), None)

    ev = wait_for(breach, timeout=20)
    assert ev, "a device.breach record for the attempt"
    assert ev["category"] == "anomaly" and ev["result"] == "failure" and ev["actor"].startswith("agent:")

    def shipped():
        return sink.exists() and any("device.breach" in line and "MTR-1" in line for line in sink.read_text().splitlines())

    assert wait_for(shipped, timeout=20), "the breach in the SIEM file sink (CEF)"
    line = next(line for line in sink.read_text().splitlines() if "device.breach" in line)
    assert line.startswith("CEF:0|") or "CEF:0|" in line, line
