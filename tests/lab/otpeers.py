"""Real protocol peers for lab hosts, built on libraries we did not write: `python -m tests.lab.otpeers CMD …`.

  iec104-server --host A [--port 2404] --seconds N     c104 outstation, common address 1, the points in IEC104_POINTS
  iec104-gi --host A [--port 2404] --timeout T         c104 client: connect, STARTDT, one general interrogation
  iec104-master --host A [--port 2404] --interval S --seconds N [--stop-on-failure]
                                                       a SCADA master: a general interrogation every S seconds on one
                                                       connection; a JSON line per poll, then a summary
  modbus-server --host A [--port 502] --seconds N      pymodbus TCP server, holding registers MODBUS_REGISTERS at 0
  modbus-read --host A [--port 502] [--address 0] [--count 4] --timeout T
  dlms-server --host A [--port 4059] --seconds N       gurux DLMS/COSEM server: TCP wrapper, logical names, no security
  dlms-get --host A [--port 4059] --timeout T          association (AARQ), GET of DLMS_VALUES' objects, release
  mqtt-sub --host A [--port 1883] --topic T --timeout T    paho-mqtt: the first message on the topic
  mqtt-pub --host A [--port 1883] --topic T --message M [--count N] [--interval S]

Servers print "ready" once listening and stop after --seconds. Clients print one JSON line ({"connected": …}) and exit
1 when they did not get what they asked for. The functions below start these in lab namespaces for tests and the
demo: servers through `Lab.spawn` (killed at teardown), clients through `Lab.exec`.

No `from __future__ import annotations` here: c104 checks its callbacks' annotations as real objects.
"""

import argparse
import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time

COMMON_ADDRESS = 1
# IOA -> (c104 type, value). Floats are exact in IEEE single precision, so the client sees the same numbers.
IEC104_POINTS = {1001: ("M_ME_NC_1", 230.5), 1002: ("M_ME_NC_1", 50.25), 2001: ("M_SP_NA_1", True)}
MODBUS_REGISTERS = [2305, 5025, 4711, 17]
DLMS_ENERGY = "1.0.1.8.0.255"  # active energy import (+A), total: a Register, in Wh
DLMS_SERIAL = "0.0.96.1.0.255"  # the meter's serial number: a Data object
DLMS_VALUES = {DLMS_ENERGY: 123456, DLMS_SERIAL: "WKT-METER-1"}
DLMS_CLIENT_ADDRESS, DLMS_SERVER_ADDRESS = 16, 1  # the public client; the management logical device


# ---- the Python API (tests, demo) ----


def start_server(lab, role: str, kind: str, port: int | None = None, seconds: float = 900, timeout: float = 15):
    """Start `kind` ("iec104", "modbus" or "dlms") on the role's own address; returns its Popen once listening."""
    argv = _argv(f"{kind}-server", "--host", lab.addr(role), "--seconds", str(seconds))
    argv += ["--port", str(port)] if port else []
    proc = lab.spawn(role, argv, stdout=subprocess.PIPE, text=True)
    _await_ready(proc, f"{kind} server in {role}", timeout)
    return proc


def iec104_gi(lab, role: str, host: str, port: int = 2404, timeout: float = 3) -> dict:
    return _client(lab, role, "iec104-gi", "--host", host, "--port", str(port), timeout=timeout)


def modbus_read(lab, role: str, host: str, port: int = 502, address: int = 0, count: int = 4, timeout: float = 3) -> dict:
    return _client(lab, role, "modbus-read", "--host", host, "--port", str(port), "--address", str(address),
                   "--count", str(count), timeout=timeout)


def dlms_get(lab, role: str, host: str, port: int = 4059, timeout: float = 3) -> dict:
    return _client(lab, role, "dlms-get", "--host", host, "--port", str(port), timeout=timeout)


def mqtt_sub(lab, role: str, host: str, topic: str, port: int = 1883, timeout: float = 3) -> dict:
    return _client(lab, role, "mqtt-sub", "--host", host, "--port", str(port), "--topic", topic, timeout=timeout)


def start_publisher(lab, role: str, host: str, topic: str, message: str, port: int = 1883, interval: float = 0.2,
                    seconds: float = 120) -> subprocess.Popen:
    """A gateway publishing `message` every `interval` seconds (until `seconds` have passed)."""
    count = max(1, int(seconds / interval))
    argv = _argv("mqtt-pub", "--host", host, "--port", str(port), "--topic", topic, "--message", message,
                 "--count", str(count), "--interval", str(interval))
    return lab.spawn(role, argv, stdout=subprocess.DEVNULL)


class Master:
    """An IEC-104 master polling an outstation from `role` in the background (`iec104-master`); `polls` fills in
    as it goes. `stop()` ends it and returns its summary."""

    def __init__(self, lab, role: str, host: str, port: int = 2404, interval: float = 0.25, seconds: float = 300,
                 timeout: float = 1.0, stop_on_failure: bool = False):
        self.lab, self.role = lab, role
        self.argv = _argv("iec104-master", "--host", host, "--port", str(port), "--interval", str(interval),
                          "--seconds", str(seconds), "--timeout", str(timeout))
        self.argv += ["--stop-on-failure"] if stop_on_failure else []
        self.polls: list[dict] = []
        self.summary: dict | None = None
        self.proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> "Master":
        self.proc = self.lab.spawn(self.role, self.argv, stdout=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def wait_polls(self, ok: int, timeout: float) -> bool:
        """Wait until `ok` more polls have succeeded than now."""
        target = self.ok_count() + ok
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.ok_count() >= target:
                return True
            time.sleep(0.05)
        return self.ok_count() >= target

    def ok_count(self) -> int:
        return sum(1 for p in list(self.polls) if p["ok"])

    def wait(self, timeout: float) -> dict:
        """Wait for the master to end on its own (its --seconds, or --stop-on-failure)."""
        self.proc.wait(timeout)
        self._reader.join(5)
        return self.summary or {}

    def stop(self, timeout: float = 10) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if "poll" in item:
                self.polls.append(item)
            else:
                self.summary = item


def _argv(*args: str) -> list[str]:
    from .site import py  # not at import time: the command line should not pay for the agent's modules

    return py("tests.lab.otpeers", *args)


def _client(lab, role: str, command: str, *args: str, timeout: float) -> dict:
    res = lab.exec(role, _argv(command, *args, "--timeout", str(timeout)), check=False, timeout=timeout + 30)
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    try:
        out = json.loads(lines[-1])
    except (IndexError, ValueError):
        out = {"connected": False, "error": (res.stderr or res.stdout).strip()[-500:]}
    out["exit"] = res.returncode
    return out


def _await_ready(proc: subprocess.Popen, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.1)[0]:
            line = proc.stdout.readline().strip()
            if line == "ready":
                return
            if not line and proc.poll() is not None:
                break
        elif proc.poll() is not None:
            break
    raise RuntimeError(f"{what} did not start (exit {proc.poll()})")


# ---- IEC 60870-5-104 (c104) ----


def cmd_iec104_server(args) -> int:
    import c104

    server = c104.Server(ip=args.host, port=args.port, tick_rate_ms=100, max_connections=8)
    station = server.add_station(common_address=COMMON_ADDRESS)
    for ioa, (kind, value) in IEC104_POINTS.items():
        station.add_point(io_address=ioa, type=getattr(c104.Type, kind)).value = value
    server.start()
    if not server.is_running:
        print(f"iec104-server: could not listen on {args.host}:{args.port}", file=sys.stderr)
        return 1
    _serve_until(args.seconds)
    server.stop()
    return 0


class Iec104Client:
    """One c104 connection that sends STARTDT itself and runs general interrogations on demand."""

    def __init__(self, host: str, port: int, timeout: float):
        import c104

        self.c104 = c104
        self.timeout = timeout
        self.client = c104.Client(tick_rate_ms=50, command_timeout_ms=max(100, int(timeout * 1000)))
        # Init.NONE: connect only; STARTDT (unmute) and the interrogation are ours to send.
        self.conn = self.client.add_connection(ip=host, port=port, init=c104.Init.NONE)
        self.terminated = threading.Event()
        self.received, self.confirmed = 0, False
        self.disconnects = 0
        self._was_open = False

        def on_station(client: c104.Client, connection: c104.Connection, common_address: int) -> None:
            connection.add_station(common_address=common_address)

        def on_point(client: c104.Client, station: c104.Station, io_address: int, point_type: c104.Type) -> None:
            station.add_point(io_address=io_address, type=point_type)

        def on_raw(connection: c104.Connection, data: bytes) -> None:
            frame = c104.explain_bytes_dict(apdu=data)
            cot = frame.get("cot")
            if cot == c104.Cot.INTERROGATED_BY_STATION:
                self.received += frame.get("numberOfObjects", 0)
            elif frame.get("type") == c104.Type.C_IC_NA_1 and not frame.get("negative"):
                if cot == c104.Cot.ACTIVATION_CON:
                    self.confirmed = True
                elif cot == c104.Cot.ACTIVATION_TERMINATION:
                    self.terminated.set()

        def on_state(connection: c104.Connection, state: c104.ConnectionState) -> None:
            is_open = state in (c104.ConnectionState.OPEN, c104.ConnectionState.OPEN_MUTED)
            if self._was_open and not is_open:
                self.disconnects += 1
            self._was_open = is_open

        self.client.on_new_station(callable=on_station)
        self.client.on_new_point(callable=on_point)
        self.conn.on_receive_raw(callable=on_raw)
        self.conn.on_state_change(callable=on_state)

    def start(self) -> None:
        self.client.start()

    def stop(self) -> None:
        self.client.stop()

    def connect(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.conn.is_connected and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.conn.is_connected

    def interrogate(self) -> tuple[bool, str | None]:
        """STARTDT if needed, then one station interrogation; ok once the outstation ends it (ACT_TERM) with
        at least one point."""
        c104 = self.c104
        if not self.connect(self.timeout):
            return False, f"not connected ({self.conn.state.name})"
        if self.conn.state == c104.ConnectionState.OPEN_MUTED and not self.conn.unmute():
            return False, "STARTDT failed"
        self.terminated.clear()
        self.received, self.confirmed = 0, False
        # Not wait_for_response=True: under load c104 2.2.1 sometimes misses an ACT_CON that arrives within a
        # millisecond and reports a timeout. The frames themselves (on_raw) are the answer.
        if not self.conn.interrogation(common_address=COMMON_ADDRESS, cause=c104.Cot.ACTIVATION,
                                       qualifier=c104.Qoi.STATION, wait_for_response=False):
            return False, "interrogation not sent"
        if not self.terminated.wait(self.timeout):
            return False, "confirmed but not terminated" if self.confirmed else "no answer"
        return (True, None) if self.received else (False, "no points in the answer")

    def points(self) -> dict[str, object]:
        found = {}
        for station in self.conn.stations:
            for point in station.points:
                value = point.value
                found[str(point.io_address)] = value if isinstance(value, (bool, int, float)) else str(value)
        return found


def cmd_iec104_gi(args) -> int:
    t0 = time.monotonic()
    client = Iec104Client(args.host, args.port, args.timeout)
    client.start()
    try:
        connected = client.connect(args.timeout)
        ok, error = client.interrogate() if connected else (False, f"not connected ({client.conn.state.name})")
        points = client.points() if ok else {}
    finally:
        client.stop()
    _emit({"connected": connected, "ok": ok, "points": points, "error": error, "seconds": round(time.monotonic() - t0, 3)})
    return 0 if ok else 1


def cmd_iec104_master(args) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    client = Iec104Client(args.host, args.port, args.timeout)
    client.start()
    polls = ok = 0
    last_ok = broken = error = None
    end = time.monotonic() + args.seconds
    try:
        client.connect(args.timeout)
        while time.monotonic() < end and not stop.is_set():
            started = time.monotonic()
            good, why = client.interrogate()
            polls += 1
            ok += good
            now = time.time()
            if good:
                last_ok = now
            elif broken is None and last_ok is not None:
                broken, error = now, why
            _emit({"poll": polls, "at": now, "ok": good, "points": client.received, "error": why})
            if not good and args.stop_on_failure and last_ok is not None:
                break
            stop.wait(max(0.0, args.interval - (time.monotonic() - started)))
    finally:
        client.stop()
    _emit({"polls": polls, "ok": ok, "failed": polls - ok, "disconnects": client.disconnects, "last_ok": last_ok,
           "broken": broken, "error": error})
    return 0 if polls and ok == polls else 1


# ---- Modbus/TCP (pymodbus) ----


def cmd_modbus_server(args) -> int:
    import asyncio

    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    async def run() -> None:
        device = SimDevice(id=0, simdata=[SimData(address=0, values=list(MODBUS_REGISTERS), datatype=DataType.REGISTERS)])
        server = ModbusTcpServer(device, address=(args.host, args.port))
        await server.serve_forever(background=True)
        print("ready", flush=True)
        await asyncio.sleep(args.seconds)
        await server.shutdown()

    asyncio.run(run())
    return 0


def cmd_modbus_read(args) -> int:
    from pymodbus.client import ModbusTcpClient
    from pymodbus.exceptions import ModbusException

    client = ModbusTcpClient(args.host, port=args.port, timeout=args.timeout, retries=0)
    result = {"connected": False, "registers": None, "error": None}
    try:
        result["connected"] = client.connect()
        if not result["connected"]:
            result["error"] = "no connection"
        else:
            answer = client.read_holding_registers(args.address, count=args.count, device_id=1)
            if answer.isError():
                result["error"] = str(answer)
            else:
                result["registers"] = list(answer.registers)
    except ModbusException as exc:
        result["error"] = str(exc)
    finally:
        client.close()
    _emit(result)
    return 0 if result["registers"] is not None else 1


# ---- DLMS/COSEM (gurux_dlms) ----


def _meter_class():
    from gurux_dlms import GXDLMSServer
    from gurux_dlms.enums import AccessMode, DataType, InterfaceType, MethodAccessMode, SourceDiagnostic, Unit
    from gurux_dlms.objects import GXDLMSAssociationLogicalName, GXDLMSData, GXDLMSRegister

    class Meter(GXDLMSServer):
        """A read-only meter: lowest-level security (no authentication), logical name referencing, TCP wrapper."""

        def __init__(self):
            super().__init__(True, InterfaceType.WRAPPER)
            energy = GXDLMSRegister(DLMS_ENERGY)
            energy.value, energy.scaler, energy.unit = DLMS_VALUES[DLMS_ENERGY], 1, Unit.ACTIVE_ENERGY
            serial = GXDLMSData(DLMS_SERIAL)
            serial.value = DLMS_VALUES[DLMS_SERIAL]
            serial.setDataType(2, DataType.STRING)
            # The association must exist before initialize(): gurux 1.0.203 fails to build a default one.
            association = GXDLMSAssociationLogicalName()
            for obj in (energy, serial, association):
                self.items.append(obj)
                association.objectList.append(obj)
            self.initialize()

        # The abstract callbacks. gurux 1.0.203's GET path calls notifyRead() and onPostRead() without arguments.
        def isTarget(self, serverAddress, clientAddress):
            return serverAddress == DLMS_SERVER_ADDRESS

        def onValidateAuthentication(self, authentication, password):
            return SourceDiagnostic.NONE

        def onGetAttributeAccess(self, arg):
            return AccessMode.READ

        def onGetMethodAccess(self, arg):
            return MethodAccessMode.NO_ACCESS

        def onFindObject(self, objectType, sn, ln):
            return None

        def notifyRead(self, *args):
            pass

        onPreGet = onPostGet = onPreRead = onPostRead = onPreWrite = onPostWrite = notifyRead
        onConnected = onInvalidConnection = onDisconnected = onPreAction = onPostAction = notifyRead

    return Meter


class _Request:
    """What GXDLMSServer.handleRequest expects; gurux's own GXServerReply lacks setReply and friends."""

    def __init__(self, data: bytes):
        self.data, self.reply, self.count, self.connectionInfo = bytearray(data), None, 0, None

    def isStreaming(self) -> bool:
        return self.count != 0

    def setReply(self, reply) -> None:
        self.reply = reply

    def getConnectionInfo(self):
        return self.connectionInfo

    def setCount(self, count: int) -> None:
        self.count = count


def cmd_dlms_server(args) -> int:
    meter_class = _meter_class()
    listener = socket.create_server((args.host, args.port), reuse_port=False)

    def session(conn: socket.socket) -> None:
        meter = meter_class()  # the association state is per connection
        with conn:
            conn.settimeout(60)
            try:
                while data := conn.recv(4096):
                    request = _Request(data)
                    meter.handleRequest(request)
                    if request.reply:
                        conn.sendall(bytes(request.reply))
            except OSError:
                pass

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=session, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    _serve_until(args.seconds)
    return 0


def cmd_dlms_get(args) -> int:
    from gurux_dlms import GXByteBuffer, GXDLMSClient, GXReplyData
    from gurux_dlms.enums import Authentication, InterfaceType, Unit
    from gurux_dlms.objects import GXDLMSData, GXDLMSRegister

    client = GXDLMSClient(True, DLMS_CLIENT_ADDRESS, DLMS_SERVER_ADDRESS, Authentication.NONE, None, InterfaceType.WRAPPER)
    result = {"connected": False, "associated": False, "values": {}, "unit": None, "released": False, "error": None}
    try:
        with socket.create_connection((args.host, args.port), timeout=args.timeout) as s:
            result["connected"] = True

            def exchange(frames) -> GXReplyData:
                reply = GXReplyData()
                for frame in frames if isinstance(frames, list) else [frames]:
                    reply.clear()
                    s.sendall(bytes(frame))
                    buf, notify = GXByteBuffer(), GXReplyData()
                    while not client.getData(buf, reply, notify):
                        chunk = s.recv(4096)
                        if not chunk:
                            raise ConnectionError("closed by the meter")
                        buf.set(chunk)
                return reply

            client.parseAareResponse(exchange(client.aarqRequest()).data)
            result["associated"] = True
            energy, serial = GXDLMSRegister(DLMS_ENERGY), GXDLMSData(DLMS_SERIAL)
            for obj, index in ((energy, 3), (energy, 2), (serial, 2)):
                client.updateValue(obj, index, exchange(client.read(obj, index)).value)
            result["values"] = {DLMS_ENERGY: energy.value, DLMS_SERIAL: serial.value}
            result["unit"] = Unit(energy.unit).name if energy.unit is not None else None
            exchange(client.releaseRequest())
            result["released"] = True
    except Exception as exc:  # noqa: BLE001 - socket errors and gurux's own exceptions alike end the attempt
        result["error"] = f"{type(exc).__name__}: {exc}"
    _emit(result)
    return 0 if result["values"] else 1


# ---- MQTT (paho-mqtt 2.x) ----


def _mqtt_client():
    import paho.mqtt.client as mqtt

    return mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)


def cmd_mqtt_sub(args) -> int:
    client = _mqtt_client()
    client.connect_timeout = args.timeout
    result = {"connected": False, "subscribed": False, "messages": [], "error": None}
    done = threading.Event()

    def on_connect(c, userdata, flags, reason_code, properties):
        result["connected"] = not reason_code.is_failure
        if result["connected"]:
            c.subscribe(args.topic, qos=0)
        else:
            result["error"] = str(reason_code)
            done.set()

    def on_subscribe(c, userdata, mid, reason_codes, properties):
        result["subscribed"] = not any(rc.is_failure for rc in reason_codes)

    def on_message(c, userdata, msg):
        result["messages"].append({"topic": msg.topic, "payload": msg.payload.decode(errors="replace")})
        if len(result["messages"]) >= args.count:
            done.set()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    try:
        client.connect(args.host, args.port, keepalive=10)
        client.loop_start()
        if not done.wait(args.timeout):
            result["error"] = result["error"] or "no message in time"
        client.disconnect()
        client.loop_stop()
    except OSError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    _emit(result)
    return 0 if len(result["messages"]) >= args.count else 1


def cmd_mqtt_pub(args) -> int:
    client = _mqtt_client()
    client.connect_timeout = args.timeout
    sent = 0
    try:
        client.connect(args.host, args.port, keepalive=10)
        client.loop_start()
        for n in range(args.count):
            client.publish(args.topic, f"{args.message} seq={n}", qos=0).wait_for_publish(args.timeout)
            sent += 1
            if n + 1 < args.count:
                time.sleep(args.interval)
        client.disconnect()
        client.loop_stop()
    except (OSError, RuntimeError, ValueError) as exc:
        _emit({"published": sent, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    _emit({"published": sent, "error": None})
    return 0


# ---- command line ----


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _serve_until(seconds: float) -> None:
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait(seconds)


COMMANDS = {
    "iec104-server": (cmd_iec104_server, 2404), "iec104-gi": (cmd_iec104_gi, 2404), "iec104-master": (cmd_iec104_master, 2404),
    "modbus-server": (cmd_modbus_server, 502), "modbus-read": (cmd_modbus_read, 502),
    "dlms-server": (cmd_dlms_server, 4059), "dlms-get": (cmd_dlms_get, 4059),
    "mqtt-sub": (cmd_mqtt_sub, 1883), "mqtt-pub": (cmd_mqtt_pub, 1883),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="otpeers", description="real OT protocol peers for the lab")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, (_, port) in COMMANDS.items():
        s = sub.add_parser(name)
        s.add_argument("--host", required=True)
        s.add_argument("--port", type=int, default=port)
        if name.endswith("-server"):
            s.add_argument("--seconds", type=float, default=600, help="stop after this long")
        else:
            s.add_argument("--timeout", type=float, default=3.0, help="for connecting and for each answer")
        if name == "iec104-master":
            s.add_argument("--interval", type=float, default=0.5)
            s.add_argument("--seconds", type=float, default=60)
            s.add_argument("--stop-on-failure", action="store_true", help="end at the first failed poll after a good one")
        if name == "modbus-read":
            s.add_argument("--address", type=int, default=0)
            s.add_argument("--count", type=int, default=len(MODBUS_REGISTERS))
        if name.startswith("mqtt-"):
            s.add_argument("--topic", required=True)
            s.add_argument("--count", type=int, default=1)
        if name == "mqtt-pub":
            s.add_argument("--message", required=True)
            s.add_argument("--interval", type=float, default=0.2)
    args = p.parse_args(argv)
    return COMMANDS[args.cmd][0](args)


if __name__ == "__main__":
    sys.exit(main())
