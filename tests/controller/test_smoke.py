"""The harness itself: both databases come up, an admin logs in and adds a person who logs in."""


def test_admin_adds_an_engineer_who_logs_in(ctl):
    ctl.add_site("north-1")  # a role at a site needs the site
    bob = ctl.add_user("bob", roles=[("engineer", "north-1")])
    token = ctl.login(bob)
    me = ctl.client.get("/api/v1/auth/whoami", headers=ctl.auth(token)).json()
    assert me["username"] == "bob" and me["roles"] == [{"role": "engineer", "site": "north-1"}]
    types = [(e["type"], e["subject"]) for e in ctl.events()]
    assert ("user_created", "bob") in types and ("login", "bob") in types
