#!/usr/bin/env bash
# Every VM, before its own script: the repository's own set-up (`make setup`: the Debian packages and the
# venv, exactly as on a developer's machine), the shipped unit files' venv path, the lab secret kept for
# later runs, and this machine's routes between the lab networks (from vagrant/lab.json).
#   provision/common.sh MACHINE        (root; WICKET_LAB_SECRET in the environment, from the Vagrantfile)
set -euo pipefail

machine=${1:?usage: common.sh MACHINE}
repo=/wicket
: "${WICKET_LAB_SECRET:?the Vagrantfile passes the lab secret (vagrant/.lab-secret)}"
export DEBIAN_FRONTEND=noninteractive

echo "[wicket-lab] $machine: make setup (Debian packages and the venv; the first time takes a few minutes)"
if ! command -v make >/dev/null; then
	apt-get update -q
	apt-get install -y --no-install-recommends make
fi
make -C "$repo" setup

# The shipped unit files run /opt/wicket/venv/bin/…; here that venv is the one `make setup` built.
install -d -m 0755 /opt/wicket
ln -sfn "$repo/.venv" /opt/wicket/venv
for cmd in wicket wicket-agent wicket-controller; do
	ln -sf "/opt/wicket/venv/bin/$cmd" "/usr/local/bin/$cmd"
done

install -d -m 0700 /etc/wicket-lab
(umask 077 && printf '%s\n' "$WICKET_LAB_SECRET" >/etc/wicket-lab/secret)

# Vagrant's management NIC keeps the default route (packages, rsync); the lab networks get routes of their own.
(cd "$repo" && /opt/wicket/venv/bin/python -m vagrant.labplan routes "$machine") >/etc/wicket-lab/routes
cat >/usr/local/sbin/wicket-lab-routes <<'SCRIPT'
#!/usr/bin/env bash
# Apply /etc/wicket-lab/routes (one `ip route replace` argument line each; written by provision/common.sh).
set -euo pipefail
while read -r route; do
	[[ -z "$route" ]] && continue
	# shellcheck disable=SC2086 # one route is several words on purpose
	ip route replace $route
done </etc/wicket-lab/routes
SCRIPT
chmod 0755 /usr/local/sbin/wicket-lab-routes
cat >/etc/systemd/system/wicket-lab-routes.service <<'UNIT'
[Unit]
Description=wicket lab: routes between the lab networks (/etc/wicket-lab/routes)
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/wicket-lab-routes

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable wicket-lab-routes.service
systemctl restart wicket-lab-routes.service
echo "[wicket-lab] $machine: routes"
sed 's/^/  /' /etc/wicket-lab/routes
