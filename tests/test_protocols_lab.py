"""Engineers' tasks with real protocol clients through real lanes, against real protocol peers on the devices:
an IEC-104 general interrogation (c104) while a SCADA master keeps polling the same outstation, a Modbus/TCP
register read (pymodbus), a DLMS/COSEM GET (gurux_dlms) and an MQTT subscription (paho-mqtt, Debian's
mosquitto). Each client first fails without a lane, and an IEC-104 interrogation fails through a lane whose rule
is wrong, so these tests can fail. One lab serves the whole module; each test closes its lanes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from tests.lab import otpeers
from tests.lab.otpeers import DLMS_VALUES, IEC104_POINTS, MODBUS_REGISTERS, Master
from tests.lab.peers import mosquitto
from tests.lab.site import AgentProcess, Engineer, lane_for

pytestmark = pytest.mark.lab

EXPECTED_POINTS = {str(ioa): value for ioa, (_, value) in IEC104_POINTS.items()}
DER_TOPIC = "der/pv-7/telemetry"
DER_MESSAGE = '{"p_kw": 41.5, "q_kvar": -2.0}'
SERVICES = {2404: "iec104", 502: "modbus", 4059: "dlms", 1883: "mqtt"}


class Lanes:
    """Opens one lane at a time for eng1 (the agent's desired state replaces the previous lane) and closes it."""

    def __init__(self, lab, agent: AgentProcess, engineer: Engineer):
        self.lab, self.agent, self.engineer = lab, agent, engineer
        self.n = 0

    def open(self, device: str, port: int) -> None:
        self.n += 1
        spec = lane_for(self.engineer, self.lab.addr(device), f"s-ot{self.n}", 300, port=port, listen_port=51820 + self.n,
                        index=2 + self.n, device_id=device.upper(), service=SERVICES.get(port, "other"))
        report = self.agent.apply([spec])
        assert not report["errors"], report
        self.engineer.up(self.engineer.config_for(spec, self.agent.lane(spec.session_id)["node_public_key"]))

    def end_on_router(self) -> None:
        """The agent drops every lane; the engineer's WireGuard client stays up as it was."""
        self.agent.apply([])

    def close(self) -> None:
        self.end_on_router()
        self.engineer.down()


@dataclass
class Site:
    lab: object
    lanes: Lanes


@pytest.fixture(scope="module")
def site():
    from tests.lab import Lab, unavailable_reason

    if reason := unavailable_reason():
        pytest.skip(reason)
    with Lab(devices=("rtu1", "rtu2", "plc1", "meter1", "der1"), masters=("scada",), engineers=("eng1",)) as lab:
        agent = AgentProcess(lab).start()
        engineer = Engineer(lab, "eng1")
        try:
            for role in ("rtu1", "rtu2"):
                otpeers.start_server(lab, role, "iec104")
            otpeers.start_server(lab, "plc1", "modbus")
            otpeers.start_server(lab, "meter1", "dlms")
            mosquitto(lab, "der1")
            # the DER gateway publishes its telemetry to the broker beside it
            otpeers.start_publisher(lab, "der1", lab.addr("der1"), DER_TOPIC, DER_MESSAGE, interval=0.2, seconds=600)
            yield Site(lab, Lanes(lab, agent, engineer))
        finally:
            engineer.forget()
            agent.stop()
            agent.remove_state()
    if lab.cleanup_errors:
        pytest.fail(f"lab {lab.run_id} cleanup incomplete: {'; '.join(lab.cleanup_errors)}", pytrace=False)


@pytest.fixture
def ot(site):
    yield site
    site.lanes.close()


def test_iec104_interrogation_through_a_lane_while_scada_keeps_polling(ot):
    lab, rtu1 = ot.lab, ot.lab.addr("rtu1")
    master = Master(lab, "scada", rtu1, interval=0.25, seconds=120).start()
    try:
        assert master.wait_polls(3, timeout=15), f"the SCADA master does not poll: {master.polls}"
        before = otpeers.iec104_gi(lab, "eng1", rtu1, timeout=1.5)
        assert before["exit"] != 0 and not before["connected"] and not before["points"], before

        ot.lanes.open("rtu1", 2404)
        opened = time.time()
        got = otpeers.iec104_gi(lab, "eng1", rtu1)
        assert got["exit"] == 0 and got["points"] == EXPECTED_POINTS, got
        assert master.wait_polls(3, timeout=5), "the master's polling stalled while the lane was open"
        ot.lanes.end_on_router()
        closed = time.time()

        after = otpeers.iec104_gi(lab, "eng1", rtu1, timeout=1.5)
        assert after["exit"] != 0 and not after["points"], f"the lane ended on the router, its client still gets through: {after}"
        assert master.wait_polls(3, timeout=5), "the master's polling stalled after the lane closed"
    finally:
        summary = master.stop()
    during = [p for p in master.polls if opened <= p["at"] <= closed]
    later = [p for p in master.polls if p["at"] > closed]
    assert summary["polls"] == len(master.polls) and summary["failed"] == 0 and summary["disconnects"] == 0, summary
    assert len(during) >= 3 and all(p["ok"] and p["points"] == len(IEC104_POINTS) for p in during), during
    assert len(later) >= 3 and all(p["ok"] for p in later), later


def test_iec104_interrogation_fails_through_a_lane_with_the_wrong_rule(ot):
    lab = ot.lab
    rtu1, rtu2 = lab.addr("rtu1"), lab.addr("rtu2")

    ot.lanes.open("rtu1", 2405)  # the right device, the wrong port
    wrong_port = otpeers.iec104_gi(lab, "eng1", rtu1, timeout=1.5)
    assert wrong_port["exit"] != 0 and not wrong_port["connected"] and not wrong_port["points"], wrong_port

    ot.lanes.open("rtu2", 2404)  # the right port, the other RTU
    wrong_device = otpeers.iec104_gi(lab, "eng1", rtu1, timeout=1.5)
    assert wrong_device["exit"] != 0 and not wrong_device["points"], wrong_device
    other = otpeers.iec104_gi(lab, "eng1", rtu2)
    assert other["exit"] == 0 and other["points"] == EXPECTED_POINTS, f"that lane itself works: {other}"

    ot.lanes.open("rtu1", 2404)
    right = otpeers.iec104_gi(lab, "eng1", rtu1)
    assert right["exit"] == 0 and right["points"] == EXPECTED_POINTS, right


def test_modbus_register_read_through_a_lane(ot):
    lab, plc = ot.lab, ot.lab.addr("plc1")
    before = otpeers.modbus_read(lab, "eng1", plc, timeout=1.5)
    assert before["exit"] != 0 and before["registers"] is None, before
    ot.lanes.open("plc1", 502)
    got = otpeers.modbus_read(lab, "eng1", plc)
    assert got["exit"] == 0 and got["registers"] == MODBUS_REGISTERS, got


def test_dlms_get_through_a_lane(ot):
    lab, meter = ot.lab, ot.lab.addr("meter1")
    before = otpeers.dlms_get(lab, "eng1", meter, timeout=1.5)
    assert before["exit"] != 0 and not before["associated"] and not before["values"], before
    ot.lanes.open("meter1", 4059)
    got = otpeers.dlms_get(lab, "eng1", meter)
    assert got["exit"] == 0 and got["associated"] and got["released"], got
    assert got["values"] == DLMS_VALUES and got["unit"] == "ACTIVE_ENERGY", got


def test_mqtt_subscription_through_a_lane_receives_the_der_telemetry(ot):
    lab, der = ot.lab, ot.lab.addr("der1")
    before = otpeers.mqtt_sub(lab, "eng1", der, DER_TOPIC, timeout=1.5)
    assert before["exit"] != 0 and not before["connected"] and not before["messages"], before
    ot.lanes.open("der1", 1883)
    got = otpeers.mqtt_sub(lab, "eng1", der, DER_TOPIC)
    assert got["exit"] == 0 and got["subscribed"], got
    [message] = got["messages"]
    assert message["topic"] == DER_TOPIC and message["payload"].startswith(DER_MESSAGE + " seq="), message
