#!/usr/bin/env bash
# The engineer VM (erin's laptop on the internet side): the standard WireGuard tools (from `make setup`),
# erin's login and the lab CA handed over by the controller VM, and `wicket-lab-job`, the job to run:
# request RTU-17, bring the one-time config up with wg-quick, interrogate the RTU through the lane.
#   provision/engineer.sh MACHINE     (root, after common.sh)
set -euo pipefail

machine=${1:?usage: engineer.sh MACHINE}
repo=/wicket
py=/opt/wicket/venv/bin/python
lab() { (cd "$repo" && "$py" -m vagrant.labplan "$@"); }
handoff=$(lab get controller.handoff)
api=$(lab get controller.api)

command -v wg-quick >/dev/null || { echo "wg-quick is missing: make setup installs wireguard-tools" >&2; exit 1; }
if ! command -v update-ca-certificates >/dev/null; then
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates
fi

echo "[wicket-lab] $machine: fetching erin's login from the controller VM ($handoff)"
(cd "$repo" && "$py" -m vagrant.handoff fetch "$handoff/engineer.sealed" --wait 1800 -o /etc/wicket-lab/engineer.json)
(cd "$repo" && "$py" -m vagrant.job install)

# The lab CA in the system store, and in the environment of login shells for the `wicket` CLI (httpx reads
# SSL_CERT_FILE), so that erin can also use the CLI by hand: wicket login --user erin.
install -m 0644 /etc/wicket-lab/api-ca.pem /usr/local/share/ca-certificates/wicket-lab-ca.crt
update-ca-certificates >/dev/null
cat >/etc/profile.d/wicket-lab.sh <<PROFILE
export WICKET_CONTROLLER=$api
export SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
PROFILE

printf '#!/bin/sh\ncd %s && exec %s -m vagrant.job "$@"\n' "$repo" "$py" >/usr/local/bin/wicket-lab-job
chmod 0755 /usr/local/bin/wicket-lab-job
echo "[wicket-lab] $machine: ready. From the host: vagrant ssh $machine -c 'sudo wicket-lab-job'"
