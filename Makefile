# wicket — the two commands in the README are `make demo` and `make test`; both set up everything first.
# Everything runs as root on Debian 12: the lab builds network namespaces, nftables tables and WireGuard lanes.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# Debian's python3 (3.11) is the one python3-nftables (libnftables bindings) is built for; the venv sees
# that package through --system-site-packages. Any other python3 on PATH cannot import `nftables`.
SYSPY := /usr/bin/python3
APT_PACKAGES := wireguard-tools wireguard-go nftables python3-nftables conntrack iproute2 util-linux \
	python3-venv python3-pip iperf3 tcpdump nmap procps kmod postgresql zbar-tools rsyslog rsyslog-gnutls \
	mosquitto dnsmasq-base ruby shellcheck
PYTEST_ARGS ?=

# The controller's tests run on SQLite and on this local PostgreSQL (loopback only).
PG_TEST_URL := postgresql+psycopg://wicket_test:wicket_test@127.0.0.1:5432/postgres

.PHONY: setup system venv pg demo test test-fast lint bench bench-lanes bench-policy bench-sessions bench-link bench-audit bench-baselines soak sweep clean

setup: system venv

# Installs only what is missing, so a second run costs a second.
system:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "[setup] apt-get install $$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q && apt-get install -y --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@[ -x $(PY) ] || $(SYSPY) -m venv --system-site-packages $(VENV)
	@$(PY) -c 'import nftables' || { echo "[setup] the venv cannot import nftables (python3-nftables)"; exit 1; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

demo: setup
	$(PY) -m tests.lab.demo $(DEMO_ARGS)

test: setup lint pg
	WICKET_TEST_POSTGRES_URL=$(PG_TEST_URL) $(PY) -m pytest $(PYTEST_ARGS)

# Start the local PostgreSQL cluster and make the test role (can create and drop its own databases).
pg: system
	@read ver name _ <<< "$$(pg_lsclusters -h | head -1)"; \
	pg_lsclusters -h | head -1 | grep -q online || pg_ctlcluster $$ver $$name start
	@su postgres -c "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname='wicket_test'\"" | grep -q 1 || \
		su postgres -c "psql -qc \"CREATE ROLE wicket_test LOGIN CREATEDB PASSWORD 'wicket_test'\""

test-fast: venv
	$(PY) -m pytest -m "not lab and not kernel" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check nodeagent controller tests bench vagrant

# Each benchmark writes its own section of docs/benchmarks.md (and its raw numbers to docs/bench/).
bench: bench-lanes bench-policy bench-sessions bench-link bench-audit bench-baselines

bench-lanes: setup
	$(PY) -m bench.lanes $(BENCH_ARGS)

# Inventory import and policy evaluation, on SQLite and on the local PostgreSQL; about three minutes.
bench-policy: setup pg
	WICKET_TEST_POSTGRES_URL=$(PG_TEST_URL) $(PY) -m bench.policy $(BENCH_POLICY_ARGS)

# The controller's session path (activation with 0 / 1 000 / 4 000 lanes on the node, clock ticks, config
# download, approval), on SQLite and on the local PostgreSQL; under four minutes.
bench-sessions: setup pg
	WICKET_TEST_POSTGRES_URL=$(PG_TEST_URL) $(PY) -m bench.sessions $(BENCH_SESSIONS_ARGS)

# The agent link: approval → first packet through a lane in the lab, and one controller serving 20 / 100 / 200
# agents on loopback (memory, idle CPU, push latency, reconnection after a restart); about five minutes.
bench-link: setup
	$(PY) -m bench.link $(BENCH_LINK_ARGS)

# audit append (SQLite, and PostgreSQL) and offline verification speed
bench-audit: setup pg
	WICKET_TEST_POSTGRES_URL=$(PG_TEST_URL) $(PY) -m bench.audit_append $(BENCH_AUDIT_ARGS)
	$(PY) -m bench.audit_verify

# Device baselines on one agent, in the lab: per-packet cost and change cost with 10 / 1 000 / 5 000 / 10 000
# passported devices, and the start-up apply; a little over a minute.
bench-baselines: setup
	$(PY) -m bench.baselines $(BENCH_BASELINES_ARGS)

# Hours of lanes opened and closed every few seconds with traffic (not in CI): docs/soak.md, docs/soak.png and
# docs/bench/soak.csv; exits 1 when something grew without bound. HOURS may be a fraction (0.1 for a quick look).
HOURS ?= 1
soak: setup
	$(PY) -m bench.soak --hours $(HOURS) $(SOAK_ARGS)

sweep: venv
	$(PY) -m tests.lab sweep

clean: sweep
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
