#!/usr/bin/env bash
# The controller VM: `wicket-controller serve` under the shipped systemd unit (SQLite), seeded once with the
# namespace lab's site (vagrant/seed.py), nginx in front of the API with a lab CA's certificate, and the
# sealed hand-over for the other VMs: the router's join token and the engineer's login (vagrant/handoff.py).
#   provision/controller.sh MACHINE     (root, after common.sh)
set -euo pipefail

machine=${1:?usage: controller.sh MACHINE}
repo=/wicket
py=/opt/wicket/venv/bin/python
lab() { (cd "$repo" && "$py" -m vagrant.labplan "$@"); }
addr=$(lab get "machines.$machine.address")
export DEBIAN_FRONTEND=noninteractive

if ! dpkg-query -W -f='${Status}' nginx 2>/dev/null | grep -q 'install ok installed'; then
	apt-get update -q
	apt-get install -y --no-install-recommends nginx openssl
fi

# 1. The service user and its state directory, as docs/controller.md ("As a systemd service").
id wicket >/dev/null 2>&1 || adduser --system --group --home /var/lib/wicket-controller --no-create-home wicket
install -d -o wicket -g wicket -m 0700 /var/lib/wicket-controller
install -d -m 0755 /etc/wicket /var/lib/wicket-lab
install -d -m 0700 /var/lib/wicket-lab/people

# 2. Seed once: the namespace lab's own set-up (first admin, policy, site, RTU-17, alex, erin) and the
#    service's settings in /etc/wicket/controller.env. A second run changes nothing.
(cd "$repo" && "$py" -m vagrant.seed --data-dir /var/lib/wicket-controller \
	--people-dir /var/lib/wicket-lab/people --env-file /etc/wicket/controller.env)
chown -R wicket:wicket /var/lib/wicket-controller
chgrp wicket /etc/wicket/controller.env
chmod 0640 /etc/wicket/controller.env

# 3. The shipped unit, unchanged: the API on 127.0.0.1:8443, the agent link on the lab address (controller.env).
install -m 0644 "$repo/controller/systemd/wicket-controller.service" /etc/systemd/system/wicket-controller.service
systemctl daemon-reload
systemctl enable wicket-controller.service
systemctl restart wicket-controller.service
echo "[wicket-lab] $machine: waiting for the controller's /healthz"
for _ in $(seq 60); do
	if "$py" -c 'import sys, urllib.request; sys.exit(urllib.request.urlopen("http://127.0.0.1:8443/healthz", timeout=2).status != 200)' 2>/dev/null; then
		break
	fi
	sleep 1
done
"$py" -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:8443/healthz", timeout=5).read().decode())' \
	|| { journalctl -u wicket-controller --no-pager -n 50; exit 1; }

# 4. TLS for the API: a lab CA (its certificate goes to the engineer) and a certificate for this address.
tls=/etc/wicket-lab/tls
install -d -m 0755 "$tls"
if [[ ! -s "$tls/server.pem" ]]; then
	(
		umask 077
		openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 -subj "/CN=wicket lab CA" \
			-addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" \
			-keyout "$tls/ca.key" -out "$tls/ca.pem"
		openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$addr" \
			-keyout "$tls/server.key" -out "$tls/server.csr"
		printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
			"extendedKeyUsage=serverAuth" "subjectAltName=IP:$addr" "subjectKeyIdentifier=hash" \
			"authorityKeyIdentifier=keyid:always" >"$tls/server.ext"
		openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" -CAcreateserial -days 825 \
			-extfile "$tls/server.ext" -out "$tls/server.pem"
	)
	chmod 0644 "$tls/ca.pem" "$tls/server.pem"
fi

# 5. nginx: the API over HTTPS (docs/controller.md's proxy settings), and the sealed hand-over over plain
#    HTTP (sealed files only: they open only with the lab secret).
install -d -m 0755 /var/lib/wicket-lab/handoff
cat >/etc/nginx/sites-available/wicket-lab <<NGINX
server {
    listen $addr:443 ssl;
    ssl_certificate $tls/server.pem;
    ssl_certificate_key $tls/server.key;
    location / {
        proxy_pass http://127.0.0.1:8443;
        proxy_set_header Host \$host;
        proxy_set_header X-Forwarded-For \$remote_addr;
    }
}
server {
    listen $addr:80;
    location /lab-handoff/ {
        alias /var/lib/wicket-lab/handoff/;
        default_type application/octet-stream;
    }
    location / {
        return 404;
    }
}
NGINX
rm -f /etc/nginx/sites-enabled/default
ln -sfn /etc/nginx/sites-available/wicket-lab /etc/nginx/sites-enabled/wicket-lab
nginx -t
systemctl enable nginx.service
systemctl restart nginx.service

# 6. The hand-over: a fresh join token for the router (each run makes one; an unused one lapses in a day)
#    and erin's login with the lab CA for the engineer.
(cd "$repo" && "$py" -m vagrant.ctl token && "$py" -m vagrant.ctl engineer-bundle)

# 7. Commands for people at this VM (vagrant ssh ctl): the lab's accounts at the real `wicket` CLI.
for pair in "wicket-lab-token:token" "wicket-lab-approve:approve" "wicket-lab-as:as"; do
	printf '#!/bin/sh\ncd %s && exec %s -m vagrant.ctl %s "$@"\n' "$repo" "$py" "${pair#*:}" >"/usr/local/bin/${pair%%:*}"
	chmod 0755 "/usr/local/bin/${pair%%:*}"
done
echo "[wicket-lab] $machine: controller at https://$addr (API) and $(lab get controller.link) (agent link)"
