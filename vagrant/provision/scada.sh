#!/usr/bin/env bash
# The SCADA master VM (optional: `vagrant up scada`): polls RTU-17 as a control centre does, routed through
# the edge router and not through any lane, with the namespace lab's IEC-104 master (c104): one connection,
# a general interrogation every few seconds, one JSON line per poll in the journal.
#   provision/scada.sh MACHINE     (root, after common.sh)
set -euo pipefail

machine=${1:?usage: scada.sh MACHINE}
repo=/wicket
py=/opt/wicket/venv/bin/python
lab() { (cd "$repo" && "$py" -m vagrant.labplan "$@"); }
rtu=$(lab get site.device_address)
port=$(lab get site.iec104_port)
interval_s=10
run_s=3600 # otpeers runs for a bounded time; systemd starts it again

cat >/etc/systemd/system/wicket-lab-scada.service <<UNIT
[Unit]
Description=wicket lab: SCADA master polling $rtu:$port (tests.lab.otpeers iec104-master)
After=network-online.target wicket-lab-routes.service
Wants=network-online.target

[Service]
WorkingDirectory=$repo
ExecStart=$py -m tests.lab.otpeers iec104-master --host $rtu --port $port --interval $interval_s --seconds $run_s
Restart=always
RestartSec=5
DynamicUser=yes

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable wicket-lab-scada.service
systemctl restart wicket-lab-scada.service
echo "[wicket-lab] $machine: polling $rtu:$port every ${interval_s} s; journalctl -u wicket-lab-scada -f shows each poll"
