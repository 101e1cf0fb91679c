#!/usr/bin/env bash
# The RTU VM (RTU-17): the namespace lab's IEC-104 outstation (c104), `python -m tests.lab.otpeers
# iec104-server`, as a service on the lab address, port 2404.
#   provision/rtu.sh MACHINE     (root, after common.sh)
set -euo pipefail

machine=${1:?usage: rtu.sh MACHINE}
repo=/wicket
py=/opt/wicket/venv/bin/python
lab() { (cd "$repo" && "$py" -m vagrant.labplan "$@"); }
addr=$(lab get "machines.$machine.address")
port=$(lab get site.iec104_port)
# otpeers serves for a bounded time; a day, and systemd starts it again.
serve_s=86400

cat >/etc/systemd/system/wicket-lab-iec104.service <<UNIT
[Unit]
Description=wicket lab: IEC-104 outstation on $addr:$port (tests.lab.otpeers)
After=network-online.target wicket-lab-routes.service
Wants=network-online.target

[Service]
WorkingDirectory=$repo
ExecStart=$py -m tests.lab.otpeers iec104-server --host $addr --port $port --seconds $serve_s
Restart=always
RestartSec=2
DynamicUser=yes

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable wicket-lab-iec104.service
systemctl restart wicket-lab-iec104.service

echo "[wicket-lab] $machine: waiting for the outstation on $addr:$port"
for _ in $(seq 30); do
	if ss -Hltn "sport = :$port" | grep -q .; then
		echo "[wicket-lab] $machine: IEC-104 outstation listening on $addr:$port"
		exit 0
	fi
	sleep 1
done
journalctl -u wicket-lab-iec104 --no-pager -n 30
exit 1
