#!/usr/bin/env bash
# The edge router VM: forwarding between the three lab networks, and `wicket-agent` enrolled with the join
# token the controller VM sealed for it, then run by the shipped systemd unit (docs/site-admin-runbook.md).
#   provision/router.sh MACHINE     (root, after common.sh)
set -euo pipefail

machine=${1:?usage: router.sh MACHINE}
repo=/wicket
py=/opt/wicket/venv/bin/python
lab() { (cd "$repo" && "$py" -m vagrant.labplan "$@"); }
node=$(lab get site.node_id)
link=$(lab get controller.link)
handoff=$(lab get controller.handoff)
export DEBIAN_FRONTEND=noninteractive

printf 'net.ipv4.ip_forward = 1\n' >/etc/sysctl.d/60-wicket-lab-router.conf
sysctl -q -w net.ipv4.ip_forward=1

# The runbook's clock service; lanes open either way (clock_sync below), but the evidence wants true times.
if ! dpkg-query -W -f='${Status}' systemd-timesyncd 2>/dev/null | grep -q 'install ok installed'; then
	apt-get update -q
	apt-get install -y --no-install-recommends systemd-timesyncd
fi

install -d -m 0755 /etc/wicket
cat >/etc/wicket/agent.toml <<TOML
# wicket lab (vagrant/provision/router.sh). The namespace lab runs the agent with --clock-sync warn too: a
# VM's clock may be unsynchronised for a while after boot, and the lab should not wait for NTP.
node_id = "$node"
clock_sync = "warn"
TOML

install -d -m 0700 /var/lib/wicket-agent
if [[ -s /var/lib/wicket-agent/link/controller.json && -s /var/lib/wicket-agent/link/tls.pem ]]; then
	echo "[wicket-lab] $machine: enrolled already"
else
	echo "[wicket-lab] $machine: fetching the join token from the controller VM ($handoff)"
	token=$(cd "$repo" && "$py" -m vagrant.handoff fetch "$handoff/join-token.sealed" --wait 1800)
	if ! printf '%s\n' "$token" | wicket-agent enroll --controller "$link" --node-id "$node"; then
		echo "[wicket-lab] $machine: enrolment refused. A rebuilt router needs its old enrolment revoked and a new" >&2
		echo "  token: vagrant ssh ctl -c 'sudo wicket-lab-as --step-up root agents revoke $node --reason rebuilt && sudo wicket-lab-token'" >&2
		echo "  then: vagrant provision $machine (vagrant/README.md, troubleshooting)" >&2
		exit 1
	fi
fi

install -m 0644 "$repo/nodeagent/systemd/wicket-agent.service" /etc/systemd/system/wicket-agent.service
systemctl daemon-reload
systemctl enable wicket-agent.service
systemctl restart wicket-agent.service

echo "[wicket-lab] $machine: waiting for the agent's link to the controller"
for _ in $(seq 60); do
	if wicket-agent status --json 2>/dev/null | "$py" -c 'import json, sys; sys.exit(not (json.load(sys.stdin).get("link") or "").startswith("connected"))'; then
		break
	fi
	sleep 1
done
wicket-agent doctor || true # it reports; the link check below decides
wicket-agent status --json | "$py" -c 'import json, sys; s = json.load(sys.stdin); print("link:", s.get("link")); sys.exit(not (s.get("link") or "").startswith("connected"))' \
	|| { journalctl -u wicket-agent --no-pager -n 50; exit 1; }
