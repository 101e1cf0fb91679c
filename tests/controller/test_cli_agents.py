"""`wicket sites join-token|join-tokens|join-token-revoke` and `wicket agents [revoke]` against a real HTTP
server (the server and CLI fixtures of test_cli.py) in front of a controller whose agent link listens on
loopback (`linkpeer.LinkHarness`): the token the CLI prints enrols a real agent (`nodeagent.enroll`), whose
link client then shows in `wicket agents`. Effects are checked through the API and the link. SQLite only:
the API tests cover both databases' behaviour under these commands."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest

from . import test_cli
from .helpers import API
from .linkpeer import LinkHarness, wait_for
from .test_cli import Cli, fresh

server, cli, admin = test_cli.server, test_cli.cli, test_cli.admin  # the CLI fixtures of test_cli.py
pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

SITE, NODE = "north-1", "rtr-1"


@pytest.fixture
def ctl(tmp_path, db_url):
    """conftest's harness, with the agent link in place of the fake nodes (the server fixture serves this one)."""
    h = LinkHarness(tmp_path, db_url)
    yield h
    h.close()


def api(ctl, path: str, **params):
    res = ctl.client.get(path, params=params, headers=ctl.auth(ctl.admin_token()))
    assert res.status_code == 200, res.text
    return res.json()


def test_a_join_token_is_printed_once_enrols_an_agent_and_is_never_listed(ctl, admin):
    ctl.add_site(SITE)
    res = admin("sites", "join-token", SITE, "--ttl", "30m", "--link", ctl.link_url, "--totp", fresh(ctl))
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    ident = re.fullmatch(r"Join token ([a-z0-9]{12}) for site north-1, usable once until (.+)\.", lines[0]).group(1)
    made, = api(ctl, f"{API}/sites/{SITE}/join-tokens")
    assert made["id"] == ident and lines[0].endswith(f"until {datetime.fromisoformat(made['expires_at']).astimezone(UTC):%Y-%m-%d %H:%M} UTC.")
    assert lines[1:4] == ["It is shown only now. On the router, as root:",
                          f"  wicket-agent enroll --controller {ctl.link_url} --node-id NAME   # paste the token when asked", ""]
    assert len(lines) == 5
    token = lines[4]
    prefix, shown_id, secret, pin = token.split(".")
    assert (prefix, shown_id, pin) == ("wkj1", ident, ctl.app.state.agents.ca.pin())

    done = ctl.enrol(token, NODE)  # what it is for
    assert (done.node_id, done.site) == (NODE, SITE)

    res = admin("sites", "join-tokens", SITE)
    assert res.exit_code == 0, res.output
    header, row = res.stdout.splitlines()
    assert header.split() == ["ID", "STATE", "MADE", "BY", "EXPIRES", "USED", "BY"]
    assert row.split()[:3] == [ident, "used", "root"] and row.split()[-1] == NODE
    res = admin("sites", "join-tokens", SITE, "--json")
    listed, = json.loads(res.stdout)
    assert (listed["id"], listed["state"], listed["used_by"]) == (ident, "used", NODE) and "token" not in listed

    res = admin("sites", "join-token-revoke", ident)  # used already: the agent is what to revoke
    assert res.exit_code == 1
    assert res.stderr == f"wicket: join token {ident} was already used by {NODE}: revoke the agent instead\n"

    res = admin("sites", "join-token", SITE, "--totp", fresh(ctl))  # the default --link is a placeholder
    assert res.exit_code == 0, res.output
    assert "wicket-agent enroll --controller CONTROLLER:7443 --node-id NAME" in res.stdout
    spare = re.search(r"Join token ([a-z0-9]{12})", res.stdout).group(1)
    res = admin("sites", "join-token-revoke", spare)
    assert (res.exit_code, res.stdout) == (0, f"Join token {spare} revoked.\n")
    states = {t["id"]: t["state"] for t in api(ctl, f"{API}/sites/{SITE}/join-tokens")}
    assert states == {ident: "used", spare: "revoked"}

    printed = [out for out in admin.outputs if secret in out]
    assert len(printed) == 1, "the token's secret was printed more than once"


def test_agents_shows_each_link_and_revoke_cuts_it(ctl, admin):
    ctl.add_site(SITE)
    ctl.enrolled(SITE, NODE)  # while the test's clock is still near the real one
    agent = ctl.sim(NODE)
    agent.wait_connected()
    ctl.add_agent(SITE, "rtr-9")  # registered, never enrolled
    ctl.add_site("south-2")
    wait_for(lambda: api(ctl, f"{API}/agents", site=SITE)[0]["clock_synchronized"], "the agent's first status")
    shown = {a["name"]: a for a in api(ctl, f"{API}/agents")}

    res = admin("agents")
    assert res.exit_code == 0, res.output
    header, *rows = res.stdout.splitlines()
    assert header.split() == ["AGENT", "SITE", "LINK", "LAST", "SEEN", "GENERATION", "LANES", "VERSION", "CLOCK", "CERT", "UNTIL"]
    linked, = [r.split() for r in rows if r.startswith(NODE)]
    g = shown[NODE]
    assert linked[:3] == [NODE, SITE, "connected"]
    assert linked[6:9] == [f"{g['applied_generation']}/{g['generation']}", "0", g["agent_version"]]
    assert linked[9] == "synced"
    unlinked, = [r.split() for r in rows if r.startswith("rtr-9")]
    assert unlinked[:5] == ["rtr-9", SITE, "not", "enrolled", "-"]

    res = admin("agents", "--json")
    assert {a["name"]: a["connected"] for a in json.loads(res.stdout)} == {NODE: True, "rtr-9": False}
    res = admin("agents", "--site", "south-2")
    assert res.exit_code == 0 and [r.split() for r in res.stdout.splitlines()] == [header.split()]

    res = admin("agents", "revoke", NODE, "--reason", "x", "--totp", fresh(ctl))
    assert res.exit_code == 1 and "reason" in res.stderr and agent.client.connected
    res = admin("agents", "revoke", NODE, "--reason", "router stolen from the yard", "--totp", fresh(ctl))
    assert res.exit_code == 0, res.output
    assert res.stdout == f"Agent {NODE} revoked; its link is cut. Its lanes keep their end times on the router.\n"
    wait_for(lambda: not agent.client.connected, "the link to be cut")
    res = admin("agents")
    linked, = [r.split() for r in res.stdout.splitlines() if r.startswith(NODE)]
    assert linked[2] == "revoked"
    revoked, = [e for e in ctl.events() if e["type"] == "agent.revoke"]
    assert (revoked["actor"], revoked["subject"], revoked["body"]["note"]) == ("root", NODE, "router stolen from the yard")


def test_an_engineer_is_told_plainly_that_agents_are_not_theirs_to_manage(ctl, server, tmp_path):
    ctl.add_site(SITE)
    ctl.add_agent(SITE, NODE)
    eng = ctl.add_user("eng", roles=[("engineer", SITE)])
    ctl.advance(30)
    who = Cli(server, tmp_path / "cli-eng")
    who.login(ctl, eng)
    ctl.advance(30)
    res = who("sites", "join-token", SITE, "--totp", ctl.code(eng))
    assert res.exit_code == 1
    assert res.stderr == f"wicket: only a site admin of {SITE} or an admin manages its agents and join tokens\n"
    res = who("agents")
    assert res.exit_code == 0 and res.stdout.splitlines()[1:] == []  # nothing of theirs to see
