"""Authorisation matrix (acceptance check 15): every /api/v1 endpoint × every kind of caller × someone
else's object (and the caller's own, and one that does not exist).

The table below is the specification. A route the application serves but the table does not list fails
the test, so a new endpoint cannot ship without someone deciding who may call it.

Beyond the status code, every refused call is checked for side effects: no account, site, agent, device,
policy or session changed, no account, inventory or policy event written, no step-up recorded, and the
step-up code the caller sent is still unused afterwards (refusal happens before the second factor is
touched). The one exception is a policy's refusal of break-glass (DECIDED_AFTER_STEP_UP): like a denied
request it is decided after the step-up and recorded, as a denied session and a failure event. Scoped reads
that succeed are checked for what they show: a list names only the caller's sites, a list of sessions or
the approval queue exactly the sessions the caller may see there.

Session rows aim at sessions made for them (`World.session_for`); from the first of them on, the engineer
also holds a break-glass grant at north-1, so that someone may open a break-glass session.

The full matrix runs on SQLite only: who may call what is decided in code above the database, and it
is the suite's longest test (1 700 calls). The coverage check, step-up, disabled-user and self-service
tests run on both databases.

Cells where the application disagrees with the table today are `KNOWN_BUGS`: the matrix tolerates exactly
the answer each gives now, and each has a strict xfail test (`test_known_authorisation_bug`) that fails
once it is fixed, so that its entry is removed.
"""

from __future__ import annotations

import csv
import io
import itertools
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import fastapi.routing
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import delete, func, select

from controller.models import (
    AccessSession,
    AgentCertificate,
    Device,
    Event,
    JoinToken,
    LaneLease,
    NodeAgent,
    PolicyVersion,
    RecoveryCode,
    RoleGrant,
    SessionApproval,
    Site,
    Throttle,
    UsedTotp,
    User,
)
from controller.sessions import READERS

from . import session_helpers
from .conftest import Harness, Person, example_policy_files
from .helpers import iccid_for
from .portal import shared_client

SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # what it tests does not depend on the database

API = "/api/v1"
SITE = "north-1"  # where engineer, contractor, approver and site_admin hold their roles
OTHER_SITE = "south-2"  # where engineer_s2 and site_admin_s2 hold theirs
NO_SITE = "nowhere-9"
MISSING_ID = 987_654
MISSING_ASSET = "NO-SUCH-ASSET"
TASK = "iec104-diagnostics"
APPROVAL_TASK = "der-commissioning"  # one approver
NO_SESSION = "s-aaaaaaaaaaaa"  # a well-formed session ID that no session has
NO_GROUP = "g-aaaaaaaaaaaa"  # … and a group ID no grant has
GRANT_TASK = "der-commissioning-mqtt"  # no approval (but for contractors): opens at once
APPROVAL_GRANT = "dlms-firmware-window"  # one approver
MISSING_TOKEN = "nosuchtoken0"  # a well-formed join token ID that no token has

CALLERS = ("anon", "garbage", "forged", "engineer", "engineer_s2", "contractor", "approver", "site_admin",
           "site_admin_s2", "soc", "admin")
PEOPLE = CALLERS[3:]  # callers with an account (the others have no identity at all)
_ = None  # not applicable: this caller has no "self" to use here

# Row key: "METHOD path" for routes that act on the caller (or on nothing in particular);
# "METHOD path @target" where the request names an object:
#   accounts: @other = someone else's account, @self = the caller's own, @missing = no such account
#     (for /auth/login, @self logs in with the caller's own credentials, @other with someone else's user
#     name and the caller's own password and code);
#   sites, agents, devices: @north = the object at north-1, @south = at south-2 (for lists: ?site=),
#     @missing = no such site or device, @empty = a site with nothing in it;
#   policy versions and tasks: @existing, @missing;
#   attacks, each explained in `World.request_for`: @south-agent-via-north, @north-to-south,
#     @south-to-north, @other-user, @other-user-south, @missing-user.
# fmt: off
#                                                                anon garb forg  eng eng2  con appr sadm sad2  soc  adm
_ROWS = {
    "POST /api/v1/auth/login @self":                               (_,   _,   _,   200, 200, 200, 200, 200, 200, 200, 200),
    "POST /api/v1/auth/login @other":                              (401, 401, 401, 401, 401, 401, 401, 401, 401, 401, 401),
    "GET /api/v1/auth/whoami":                                     (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    "POST /api/v1/auth/recovery-codes":                            (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    "POST /api/v1/auth/password":                                  (401, 401, 401, 204, 204, 204, 204, 204, 204, 204, 204),
    "POST /api/v1/auth/logout":                                    (401, 401, 401, 204, 204, 204, 204, 204, 204, 204, 204),
    "GET /api/v1/events":                                          (401, 401, 401, 403, 403, 403, 403, 403, 403, 200, 200),
    # the audit chain: soc and admin read it; anyone logged in may fetch the public keys to verify with
    "GET /api/v1/audit/head":                                      (401, 401, 401, 403, 403, 403, 403, 403, 403, 200, 200),
    "GET /api/v1/audit/checkpoints":                               (401, 401, 401, 403, 403, 403, 403, 403, 403, 200, 200),
    "GET /api/v1/audit/keys":                                      (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    "GET /api/v1/audit/verify":                                    (401, 401, 401, 403, 403, 403, 403, 403, 403, 200, 200),
    "GET /api/v1/audit/export":                                    (401, 401, 401, 403, 403, 403, 403, 403, 403, 200, 200),
    "GET /api/v1/audit/access":                                    (401, 401, 401, 403, 403, 403, 403, 403, 403, 200, 200),
    "GET /api/v1/audit/sinks":                                     (401, 401, 401, 403, 403, 403, 403, 403, 403, 200, 200),
    "GET /api/v1/sessions/{sid}/recording @missing":               (401, 401, 401, 403, 403, 403, 403, 403, 403, 404, 404),
    # sites and their agents: reading needs a role at the site (else 404); changes: site_admin there or admin
    "GET /api/v1/sites":                                           (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    "POST /api/v1/sites":                                          (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 201),
    "GET /api/v1/sites/{name} @north":                             (401, 401, 401, 200, 404, 200, 200, 200, 404, 200, 200),
    "GET /api/v1/sites/{name} @south":                             (401, 401, 401, 404, 200, 404, 404, 404, 200, 200, 200),
    "GET /api/v1/sites/{name} @missing":                           (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "PATCH /api/v1/sites/{name} @north":                           (401, 401, 401, 403, 404, 403, 403, 200, 404, 403, 200),
    "PATCH /api/v1/sites/{name} @south":                           (401, 401, 401, 404, 403, 404, 404, 404, 200, 403, 200),
    "PATCH /api/v1/sites/{name} @missing":                         (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "DELETE /api/v1/sites/{name} @empty":                          (401, 401, 401, 404, 404, 404, 404, 404, 404, 403, 204),
    "DELETE /api/v1/sites/{name} @north":                          (401, 401, 401, 403, 404, 403, 403, 403, 404, 403, 409),
    "DELETE /api/v1/sites/{name} @south":                          (401, 401, 401, 404, 403, 404, 404, 404, 403, 403, 409),
    "DELETE /api/v1/sites/{name} @missing":                        (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "POST /api/v1/sites/{name}/agents @north":                     (401, 401, 401, 403, 404, 403, 403, 201, 404, 403, 201),
    "POST /api/v1/sites/{name}/agents @south":                     (401, 401, 401, 404, 403, 404, 404, 404, 201, 403, 201),
    "POST /api/v1/sites/{name}/agents @missing":                   (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "DELETE /api/v1/sites/{name}/agents/{agent} @north":           (401, 401, 401, 403, 404, 403, 403, 204, 404, 403, 204),
    "DELETE /api/v1/sites/{name}/agents/{agent} @south":           (401, 401, 401, 404, 403, 404, 404, 404, 204, 403, 204),
    "DELETE /api/v1/sites/{name}/agents/{agent} @missing":         (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "DELETE /api/v1/sites/{name}/agents/{agent} @south-agent-via-north":
                                                                   (401, 401, 401, 403, 404, 403, 403, 404, 404, 403, 404),
    # enrolling agents: a site's join tokens are its site_admin's or an admin's to make (step-up) and to list, others who
    # see the site are refused (403); revoking one is for them too, and for everyone else the token is not there (404).
    # The agents' link state: site_admin, soc, admin see it (a list shows others nothing); revoking an agent: site_admin
    # there or admin (step-up), and like removing it, refused with 403 to whoever sees the site that lists it.
    "POST /api/v1/sites/{name}/join-tokens @north":                (401, 401, 401, 403, 404, 403, 403, 201, 404, 403, 201),
    "POST /api/v1/sites/{name}/join-tokens @south":                (401, 401, 401, 404, 403, 404, 404, 404, 201, 403, 201),
    "POST /api/v1/sites/{name}/join-tokens @missing":              (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "GET /api/v1/sites/{name}/join-tokens @north":                 (401, 401, 401, 403, 404, 403, 403, 200, 404, 403, 200),
    "GET /api/v1/sites/{name}/join-tokens @south":                 (401, 401, 401, 404, 403, 404, 404, 404, 200, 403, 200),
    "GET /api/v1/sites/{name}/join-tokens @missing":               (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "DELETE /api/v1/join-tokens/{token_id} @north":                (401, 401, 401, 404, 404, 404, 404, 204, 404, 404, 204),
    "DELETE /api/v1/join-tokens/{token_id} @south":                (401, 401, 401, 404, 404, 404, 404, 404, 204, 404, 204),
    "DELETE /api/v1/join-tokens/{token_id} @missing":              (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "GET /api/v1/agents":                                          (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    "GET /api/v1/agents @south":                                   (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    "POST /api/v1/agents/{agent}/revoke @north":                   (401, 401, 401, 403, 404, 403, 403, 204, 404, 403, 204),
    "POST /api/v1/agents/{agent}/revoke @south":                   (401, 401, 401, 404, 403, 404, 404, 404, 204, 403, 204),
    "POST /api/v1/agents/{agent}/revoke @missing":                 (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    # devices: the same scoping; export: site_admin, soc, admin (of what they can read)
    "GET /api/v1/devices":                                         (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    "GET /api/v1/devices @south":                                  (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    "POST /api/v1/devices @north":                                 (401, 401, 401, 403, 403, 403, 403, 201, 403, 403, 201),
    "POST /api/v1/devices @south":                                 (401, 401, 401, 403, 403, 403, 403, 403, 201, 403, 201),
    "POST /api/v1/devices @missing":                               (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 422),
    "POST /api/v1/devices/import @north":                          (401, 401, 401, 403, 403, 403, 403, 200, 422, 403, 200),
    "POST /api/v1/devices/import @south":                          (401, 401, 401, 403, 403, 403, 403, 422, 200, 403, 200),
    "POST /api/v1/devices/import @missing":                        (401, 401, 401, 403, 403, 403, 403, 422, 422, 403, 422),
    "POST /api/v1/devices/import @south-to-north":                 (401, 401, 401, 403, 403, 403, 403, 422, 422, 403, 200),
    "GET /api/v1/devices/export":                                  (401, 401, 401, 403, 403, 403, 403, 200, 200, 200, 200),
    "GET /api/v1/devices/export @south":                           (401, 401, 401, 403, 403, 403, 403, 200, 200, 200, 200),
    "GET /api/v1/devices/{asset_id} @north":                       (401, 401, 401, 200, 404, 200, 200, 200, 404, 200, 200),
    "GET /api/v1/devices/{asset_id} @south":                       (401, 401, 401, 404, 200, 404, 404, 404, 200, 200, 200),
    "GET /api/v1/devices/{asset_id} @missing":                     (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "PATCH /api/v1/devices/{asset_id} @north":                     (401, 401, 401, 403, 404, 403, 403, 200, 404, 403, 200),
    "PATCH /api/v1/devices/{asset_id} @south":                     (401, 401, 401, 404, 403, 404, 404, 404, 200, 403, 200),
    "PATCH /api/v1/devices/{asset_id} @missing":                   (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "PATCH /api/v1/devices/{asset_id} @north-to-south":            (401, 401, 401, 403, 404, 403, 403, 403, 404, 403, 200),
    "POST /api/v1/devices/{asset_id}/bind @north":                 (401, 401, 401, 403, 404, 403, 403, 200, 404, 403, 200),
    "POST /api/v1/devices/{asset_id}/bind @south":                 (401, 401, 401, 404, 403, 404, 404, 404, 200, 403, 200),
    "POST /api/v1/devices/{asset_id}/bind @missing":               (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "DELETE /api/v1/devices/{asset_id} @north":                    (401, 401, 401, 403, 404, 403, 403, 204, 404, 403, 204),
    "DELETE /api/v1/devices/{asset_id} @south":                    (401, 401, 401, 404, 403, 404, 404, 404, 204, 403, 204),
    "DELETE /api/v1/devices/{asset_id} @missing":                  (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "GET /api/v1/devices/{asset_id}/passport @north":              (401, 401, 401, 200, 404, 200, 200, 200, 404, 200, 200),
    "GET /api/v1/devices/{asset_id}/passport @south":              (401, 401, 401, 404, 200, 404, 404, 404, 200, 200, 200),
    "GET /api/v1/devices/{asset_id}/passport @missing":            (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "GET /api/v1/controller/signing-key":                          (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    # policy: everyone logged in reads and checks it; admins apply it
    "POST /api/v1/policy/check":                                   (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    "POST /api/v1/policy/diff":                                    (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    "POST /api/v1/policy/apply":                                   (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 200),
    "GET /api/v1/policy":                                          (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    "GET /api/v1/policy/history":                                  (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    "GET /api/v1/policy/versions/{policy_id} @existing":           (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    "GET /api/v1/policy/versions/{policy_id} @missing":            (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "GET /api/v1/protocols":                                       (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    "GET /api/v1/device-types":                                    (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    "GET /api/v1/tasks":                                           (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    "GET /api/v1/tasks/{name} @existing":                          (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    "GET /api/v1/tasks/{name} @missing":                           (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    # a dry run for yourself on a device you can read (else 404, first); for someone else: admin, soc, approver
    "POST /api/v1/policy/evaluate @north":                         (401, 401, 401, 200, 404, 200, 200, 200, 404, 200, 200),
    "POST /api/v1/policy/evaluate @south":                         (401, 401, 401, 404, 200, 404, 404, 404, 200, 200, 200),
    "POST /api/v1/policy/evaluate @missing":                       (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "POST /api/v1/policy/evaluate @other-user":                    (401, 401, 401, 403, 404, 403, 200, 403, 404, 200, 200),
    "POST /api/v1/policy/evaluate @other-user-south":              (401, 401, 401, 404, 403, 404, 404, 404, 403, 200, 200),
    "POST /api/v1/policy/evaluate @missing-user":                  (401, 401, 401, 403, 404, 403, 404, 403, 404, 404, 404),
    # sessions. Targets: @own = the caller's own (only the engineers can open one under the example policy),
    # @north / @south = another engineer's at north-1 / south-2, @missing = none; for requests, the device's site.
    # Seeing a session needs approver, site_admin, soc or admin at its site (else 404: engineer A never learns of
    # B's session); answering: approver there; revoking: approver there, soc, admin; reviewing break-glass: the
    # same but never its opener; the owner alone activates, downloads, extends and closes. A request is decided
    # (201, maybe denied) for anyone who may read the device; break-glass without a grant is 403 with the decision.
    "POST /api/v1/sessions @north":                                (401, 401, 401, 201, 404, 201, 201, 201, 404, 201, 201),
    "POST /api/v1/sessions @south":                                (401, 401, 401, 404, 201, 404, 404, 404, 201, 201, 201),
    "POST /api/v1/sessions @missing":                              (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "POST /api/v1/break-glass @north":                             (401, 401, 401, 201, 404, 403, 403, 403, 404, 403, 403),
    "POST /api/v1/break-glass @south":                             (401, 401, 401, 404, 403, 404, 404, 404, 403, 403, 403),
    "POST /api/v1/break-glass @missing":                           (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "GET /api/v1/sessions":                                        (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    "GET /api/v1/sessions @all":                                   (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    "GET /api/v1/sessions/{sid} @own":                             (_,   _,   _,   200, 200, _,   _,   _,   _,   _,   _),
    "GET /api/v1/sessions/{sid} @north":                           (401, 401, 401, 404, 404, 404, 200, 200, 404, 200, 200),
    "GET /api/v1/sessions/{sid} @south":                           (401, 401, 401, 404, 404, 404, 404, 404, 200, 200, 200),
    "GET /api/v1/sessions/{sid} @missing":                         (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "GET /api/v1/approvals":                                       (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    "POST /api/v1/sessions/{sid}/approve @own":                    (_,   _,   _,   403, 403, _,   _,   _,   _,   _,   _),
    "POST /api/v1/sessions/{sid}/approve @north":                  (401, 401, 401, 404, 404, 404, 200, 403, 404, 403, 403),
    "POST /api/v1/sessions/{sid}/approve @south":                  (401, 401, 401, 404, 404, 404, 404, 404, 403, 403, 403),
    "POST /api/v1/sessions/{sid}/approve @missing":                (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "POST /api/v1/sessions/{sid}/reject @own":                     (_,   _,   _,   403, 403, _,   _,   _,   _,   _,   _),
    "POST /api/v1/sessions/{sid}/reject @north":                   (401, 401, 401, 404, 404, 404, 200, 403, 404, 403, 403),
    "POST /api/v1/sessions/{sid}/reject @missing":                 (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "POST /api/v1/sessions/{sid}/activate @own":                   (_,   _,   _,   200, 200, _,   _,   _,   _,   _,   _),
    "POST /api/v1/sessions/{sid}/activate @north":                 (401, 401, 401, 404, 404, 404, 403, 403, 404, 403, 403),
    "POST /api/v1/sessions/{sid}/activate @missing":               (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "GET /api/v1/sessions/{sid}/config @own":                      (_,   _,   _,   200, 200, _,   _,   _,   _,   _,   _),
    "GET /api/v1/sessions/{sid}/config @north":                    (401, 401, 401, 404, 404, 404, 403, 403, 404, 403, 403),
    "GET /api/v1/sessions/{sid}/config @missing":                  (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "POST /api/v1/sessions/{sid}/extend @own":                     (_,   _,   _,   200, 200, _,   _,   _,   _,   _,   _),
    "POST /api/v1/sessions/{sid}/extend @north":                   (401, 401, 401, 404, 404, 404, 403, 403, 404, 403, 403),
    "POST /api/v1/sessions/{sid}/extend @missing":                 (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "POST /api/v1/sessions/{sid}/close @own":                      (_,   _,   _,   200, 200, _,   _,   _,   _,   _,   _),
    "POST /api/v1/sessions/{sid}/close @north":                    (401, 401, 401, 404, 404, 404, 403, 403, 404, 403, 403),
    "POST /api/v1/sessions/{sid}/close @missing":                  (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "POST /api/v1/sessions/{sid}/revoke @own":                     (_,   _,   _,   403, 403, _,   _,   _,   _,   _,   _),
    "POST /api/v1/sessions/{sid}/revoke @north":                   (401, 401, 401, 404, 404, 404, 200, 403, 404, 200, 200),
    "POST /api/v1/sessions/{sid}/revoke @south":                   (401, 401, 401, 404, 404, 404, 404, 404, 403, 200, 200),
    "POST /api/v1/sessions/{sid}/revoke @missing":                 (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "POST /api/v1/sessions/{sid}/review @own":                     (_,   _,   _,   403, _,   _,   _,   _,   _,   _,   _),
    "POST /api/v1/sessions/{sid}/review @north":                   (401, 401, 401, 404, 404, 404, 200, 403, 404, 200, 200),
    "POST /api/v1/sessions/{sid}/review @south":                   (401, 401, 401, 404, 404, 404, 404, 404, 403, 200, 200),
    "POST /api/v1/sessions/{sid}/review @missing":                 (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    # who had access to a device: approver, site_admin, soc, admin at its site; a node's desired state: site_admin
    # there, admin. Whoever reads the device (or the site, which lists its agents) is refused with 403, others 404.
    "GET /api/v1/devices/{asset_id}/access @north":                (401, 401, 401, 403, 404, 403, 200, 200, 404, 200, 200),
    "GET /api/v1/devices/{asset_id}/access @south":                (401, 401, 401, 404, 403, 404, 404, 404, 200, 200, 200),
    "GET /api/v1/devices/{asset_id}/access @missing":              (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "GET /api/v1/nodes/{node}/desired @north":                     (401, 401, 401, 403, 404, 403, 403, 200, 404, 403, 200),
    "GET /api/v1/nodes/{node}/desired @south":                     (401, 401, 401, 404, 403, 404, 404, 404, 200, 403, 200),
    "GET /api/v1/nodes/{node}/desired @missing":                   (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    # grants, as sessions: a request names devices the caller must see (else 404, before the step-up), and the policy
    # decides after it: the commissioning task is for engineers, contractors and site admins, so an approver, the SOC
    # and an admin are refused with the decision (403, recorded), and so is the contractor, whose requests must come
    # from the partner gateway (a location rule; the test client has no address). @own: the caller's grant; @north,
    # @south: another engineer's there, in the state the action needs (GRANT_NEEDS), named by its group for approve,
    # activate and close; seeing it needs approver, site_admin, soc or admin there; answering: approver there, never
    # the requester; activating and signing off: the requester; revoking: approver there, soc, admin.
    "POST /api/v1/grants @north":                                  (401, 401, 401, 201, 404, 403, 403, 201, 404, 403, 403),
    "POST /api/v1/grants @south":                                  (401, 401, 401, 404, 201, 404, 404, 404, 201, 403, 403),
    "POST /api/v1/grants @missing":                                (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "GET /api/v1/grants":                                          (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    "GET /api/v1/grants @all":                                     (401, 401, 401, 200, 200, 200, 200, 200, 200, 200, 200),
    "GET /api/v1/grants/{ref} @own":                               (_,   _,   _,   200, 200, _,   _,   _,   _,   _,   _),
    "GET /api/v1/grants/{ref} @north":                             (401, 401, 401, 404, 404, 404, 200, 200, 404, 200, 200),
    "GET /api/v1/grants/{ref} @south":                             (401, 401, 401, 404, 404, 404, 404, 404, 200, 200, 200),
    "GET /api/v1/grants/{ref} @missing":                           (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "POST /api/v1/grants/{ref}/approve @own":                      (_,   _,   _,   403, 403, _,   _,   _,   _,   _,   _),
    "POST /api/v1/grants/{ref}/approve @north":                    (401, 401, 401, 404, 404, 404, 200, 403, 404, 403, 403),
    "POST /api/v1/grants/{ref}/approve @south":                    (401, 401, 401, 404, 404, 404, 404, 404, 403, 403, 403),
    "POST /api/v1/grants/{ref}/approve @missing":                  (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "POST /api/v1/grants/{ref}/reject @own":                       (_,   _,   _,   403, 403, _,   _,   _,   _,   _,   _),
    "POST /api/v1/grants/{ref}/reject @north":                     (401, 401, 401, 404, 404, 404, 200, 403, 404, 403, 403),
    "POST /api/v1/grants/{ref}/reject @missing":                   (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "POST /api/v1/grants/{ref}/activate @own":                     (_,   _,   _,   200, 200, _,   _,   _,   _,   _,   _),
    "POST /api/v1/grants/{ref}/activate @north":                   (401, 401, 401, 404, 404, 404, 403, 403, 404, 403, 403),
    "POST /api/v1/grants/{ref}/activate @missing":                 (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "POST /api/v1/grants/{ref}/close @own":                        (_,   _,   _,   200, 200, _,   _,   _,   _,   _,   _),
    "POST /api/v1/grants/{ref}/close @north":                      (401, 401, 401, 404, 404, 404, 403, 403, 404, 403, 403),
    "POST /api/v1/grants/{ref}/close @missing":                    (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    "POST /api/v1/grants/{ref}/revoke @own":                       (_,   _,   _,   403, 403, _,   _,   _,   _,   _,   _),
    "POST /api/v1/grants/{ref}/revoke @north":                     (401, 401, 401, 404, 404, 404, 200, 403, 404, 200, 200),
    "POST /api/v1/grants/{ref}/revoke @south":                     (401, 401, 401, 404, 404, 404, 404, 404, 403, 200, 200),
    "POST /api/v1/grants/{ref}/revoke @missing":                   (401, 401, 401, 404, 404, 404, 404, 404, 404, 404, 404),
    # accounts: admins only (the last row deletes the account the others aim at)
    "GET /api/v1/users":                                           (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 200),
    "POST /api/v1/users":                                          (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 201),
    "GET /api/v1/users/{user_id} @other":                          (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 200),
    "GET /api/v1/users/{user_id} @self":                           (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 200),
    "GET /api/v1/users/{user_id} @missing":                        (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 404),
    "PUT /api/v1/users/{user_id}/roles @other":                    (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 200),
    "PUT /api/v1/users/{user_id}/roles @self":                     (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 200),
    "PUT /api/v1/users/{user_id}/roles @missing":                  (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 404),
    "POST /api/v1/users/{user_id}/totp @other":                    (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 200),
    "POST /api/v1/users/{user_id}/totp @self":                     (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 200),
    "POST /api/v1/users/{user_id}/totp @missing":                  (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 404),
    "PUT /api/v1/users/{user_id}/password @other":                 (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 204),
    "PUT /api/v1/users/{user_id}/password @self":                  (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 204),
    "PUT /api/v1/users/{user_id}/password @missing":               (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 404),
    "POST /api/v1/users/{user_id}/disable @other":                 (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 200),
    "POST /api/v1/users/{user_id}/disable @self":                  (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 409),
    "POST /api/v1/users/{user_id}/disable @missing":               (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 404),
    "POST /api/v1/users/{user_id}/enable @other":                  (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 200),
    "POST /api/v1/users/{user_id}/enable @self":                   (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 200),
    "POST /api/v1/users/{user_id}/enable @missing":                (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 404),
    "DELETE /api/v1/users/{user_id} @missing":                     (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 404),
    "DELETE /api/v1/users/{user_id} @self":                        (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 409),
    "DELETE /api/v1/users/{user_id} @other":                       (401, 401, 401, 403, 403, 403, 403, 403, 403, 403, 204),
}
# fmt: on
MATRIX: dict[str, dict[str, int | None]] = {key: dict(zip(CALLERS, row, strict=True)) for key, row in _ROWS.items()}

# The routes a person uses on their own account: no path, query or body field can name anyone else.
SELF_SERVICE = {"GET /api/v1/auth/whoami", "POST /api/v1/auth/logout", "POST /api/v1/auth/recovery-codes",
                "POST /api/v1/auth/password"}
# The routes that need a fresh TOTP code (X-Wicket-TOTP) even inside a valid login: every change.
STEP_UP = {"POST /api/v1/auth/password", "POST /api/v1/auth/recovery-codes", "POST /api/v1/users",
           "PUT /api/v1/users/{user_id}/roles", "POST /api/v1/users/{user_id}/disable",
           "POST /api/v1/users/{user_id}/enable", "DELETE /api/v1/users/{user_id}",
           "POST /api/v1/users/{user_id}/totp", "PUT /api/v1/users/{user_id}/password",
           "POST /api/v1/sites", "PATCH /api/v1/sites/{name}", "DELETE /api/v1/sites/{name}",
           "POST /api/v1/sites/{name}/agents", "DELETE /api/v1/sites/{name}/agents/{agent}",
           "POST /api/v1/sites/{name}/join-tokens", "POST /api/v1/agents/{agent}/revoke",
           "POST /api/v1/devices", "POST /api/v1/devices/import", "PATCH /api/v1/devices/{asset_id}",
           "DELETE /api/v1/devices/{asset_id}", "POST /api/v1/policy/apply",
           "POST /api/v1/sessions", "POST /api/v1/break-glass", "POST /api/v1/sessions/{sid}/approve",
           "POST /api/v1/sessions/{sid}/activate", "POST /api/v1/sessions/{sid}/extend", "POST /api/v1/sessions/{sid}/review",
           "POST /api/v1/devices/{asset_id}/bind", "POST /api/v1/grants", "POST /api/v1/grants/{ref}/approve",
           "POST /api/v1/grants/{ref}/activate"}
# Refusals that are policy decisions, made (and recorded, with the decision) after the step-up, as a request's
# denial is: break-glass, or a grant, asked by someone the policy does not let open it. Route → the failure event.
DECIDED_AFTER_STEP_UP = {"POST /api/v1/break-glass": "break_glass.open", "POST /api/v1/grants": "session.request"}


# ---- where the application disagrees with the table ----


@dataclass(frozen=True)
class KnownBug:
    reason: str
    cells: dict[tuple[str, str], object]  # (row, caller) → what the application answers today


# Fixed since, and now plain cells of the matrix: "agent-lookup-after-step-up" (DELETE /sites/{name}/agents/{agent}
# for an agent the site does not have answered 404 only after spending the caller's TOTP code);
# "session-device-lookup-after-step-up" (POST /sessions and /break-glass looked the device up after the step-up);
# "session-role-check-after-step-up" (approve, activate, extend, review checked role and ownership after it);
# "history-and-desired-404-to-readers" (device access history and a node's desired state answered 404, not 403,
# to callers who can read the device or site); "agent-revoke-404-to-site-readers" (POST /agents/{agent}/revoke answered
# 404, not 403, to an engineer, contractor or approver of the agent's site, who sees the agent in the site's record).
KNOWN_BUGS: dict[str, KnownBug] = {
}


def _made_address(n: int) -> str:
    """A LAN address of its own for the n-th device the matrix makes (one address, one device per site)."""
    return f"10.20.{200 + n // 250}.{n % 250 + 1}"


def split_key(key: str) -> tuple[str, str]:
    route, _sep, target = key.partition(" @")
    return route, target or "self"


def api_routes(app) -> dict[str, APIRoute]:
    """Every "METHOD path" the app serves under /api/v1, with its APIRoute.

    `app.routes` is walked through FastAPI's own iterator where it has one (in recent releases an included router
    is a single entry of `app.routes`); the OpenAPI document is a second, independent listing, so that a
    route hidden from one of them still counts."""
    iter_contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    if iter_contexts is not None:
        pairs = [(c.original_route, c.path) for c in iter_contexts(app.routes)]
    else:
        pairs = [(r, getattr(r, "path", None)) for r in app.routes]
    out = {}
    for route, path in pairs:
        if isinstance(route, APIRoute) and path and path.startswith(API + "/"):
            for method in sorted(route.methods):
                out[f"{method} {path}"] = route
    for path, item in app.openapi().get("paths", {}).items():
        if path.startswith(API + "/"):
            for method in item:
                key = f"{method.upper()} {path}"
                assert key in out, f"{key} is in the OpenAPI document but not found among app.routes"
    assert f"GET {API}/auth/whoami" in out, "route discovery found nothing: has FastAPI changed its routing?"
    return out


def takes_step_up(route: APIRoute) -> bool:
    return any(p.alias == "X-Wicket-TOTP" for p in route.dependant.header_params)


@dataclass
class Mismatch:
    key: str
    caller: str
    expected: object
    got: object
    detail: str


# ---- the world: one account per role, two sites with devices and agents, a policy ----

# The stock objects requests aim at, by slot; a slot whose object a successful call used up is refilled.
RENEW = {
    ("DELETE /api/v1/sites/{name}", "empty"): "site:empty",
    ("DELETE /api/v1/sites/{name}/agents/{agent}", "north"): "agent:north",
    ("DELETE /api/v1/sites/{name}/agents/{agent}", "south"): "agent:south",
    ("DELETE /api/v1/devices/{asset_id}", "north"): "retired:north",
    ("DELETE /api/v1/devices/{asset_id}", "south"): "retired:south",
    ("PATCH /api/v1/devices/{asset_id}", "north-to-south"): "device:north",
    ("POST /api/v1/devices/import", "south-to-north"): "device:south",
    ("DELETE /api/v1/join-tokens/{token_id}", "north"): "token:north",
    ("DELETE /api/v1/join-tokens/{token_id}", "south"): "token:south",
    ("POST /api/v1/devices/{asset_id}/bind", "north"): "device:north",  # bound once: another ICCID would need --rebind
    ("POST /api/v1/devices/{asset_id}/bind", "south"): "device:south",
}
CSV_HEADER = "asset_id,device_type,site,addresses\n"
# What a refused call must leave as it was: every row (a policy version by its content hash, not its files).
STATE = [select(m.__table__).order_by(m.id) for m in (User, RoleGrant, RecoveryCode, Site, NodeAgent, Device)] + [
    select(PolicyVersion.id, PolicyVersion.version, PolicyVersion.comment, PolicyVersion.applied_by).order_by(PolicyVersion.id),
    select(JoinToken.__table__).order_by(JoinToken.id), select(AgentCertificate.__table__).order_by(AgentCertificate.serial)]
# ... and every session, its approvals and its leased address and port.
SESSION_STATE = [select(AccessSession.__table__).order_by(AccessSession.id), select(SessionApproval.__table__).order_by(SessionApproval.id),
                 select(LaneLease.__table__).order_by(LaneLease.session_id)]
# The state a session must be in for a route to act on it: made afresh for each row, and again after a call used it up.
SESSION_NEEDS = {"approve": "pending", "reject": "pending", "activate": "approved", "review": "break-glass"}
GRANT_NEEDS = {"approve": "pending", "reject": "pending", "activate": "approved"}  # else active
BY_GROUP = ("approve", "activate", "close")  # these rows name the grant by its group


@dataclass
class World:
    ctl: Harness
    people: dict[str, Person] = field(default_factory=dict)
    tokens: dict[str, str | None] = field(default_factory=dict)
    logged_in_at: dict[str, float] = field(default_factory=dict)
    used_at: dict[str, float] = field(default_factory=dict)
    victim: Person | None = None
    victim_token: str | None = None
    client: TestClient | None = None
    stock: dict[str, str] = field(default_factory=dict)
    counter: itertools.count = field(default_factory=itertools.count)
    session_devices: dict[str, str] = field(default_factory=dict)  # "rtu:north", "der:south"… → asset ID
    seen_at: float = 0.0  # when the session devices were last marked seen
    slots: dict[tuple, str] = field(default_factory=dict)  # (route, target, owner) → the session calls aim at
    last_slot: tuple | None = None
    open_sessions: dict[str, list[str]] = field(default_factory=dict)  # owner → sessions they may still have open

    @classmethod
    def build(cls, ctl: Harness, roles=PEOPLE, victim_password: str | None = None) -> World:
        w = cls(ctl)
        # A client that turns a crash into a 500 (recorded as a mismatch) instead of raising.
        w.client = shared_client(ctl.app, raise_server_exceptions=False)
        ctl.apply_policy()
        ctl.add_site(SITE, tunnel_pool="100.100.1.0/24")
        ctl.add_site(OTHER_SITE, tunnel_pool="100.100.2.0/24")
        for slot in ("device:north", "device:south", "retired:north", "retired:south", "agent:north", "agent:south",
                     "site:empty", "token:north", "token:south"):
            w.renew(slot)
        until = (datetime.fromtimestamp(ctl.t, UTC) + timedelta(days=1)).isoformat()
        specs = {
            "engineer": dict(roles=[("engineer", SITE)]),
            "engineer_s2": dict(roles=[("engineer", OTHER_SITE)]),
            "contractor": dict(roles=[("contractor", SITE)], kind="contractor", sponsor="eng", valid_until=until),
            "approver": dict(roles=[("approver", SITE)]),
            "site_admin": dict(roles=[("site_admin", SITE)]),
            "site_admin_s2": dict(roles=[("site_admin", OTHER_SITE)]),
            "soc": dict(roles=[("soc", None)]),
            "admin": dict(roles=[("admin", None)]),
        }
        names = {"engineer": "eng", "engineer_s2": "eng2", "contractor": "con", "approver": "appr",
                 "site_admin": "sadm", "site_admin_s2": "sadm2", "soc": "soc", "admin": "adm2"}
        if "contractor" in roles and "engineer" not in roles:
            roles = ("engineer", *roles)  # the contractor's sponsor
        for caller in PEOPLE:
            if caller in roles:
                w.people[caller] = ctl.add_user(names[caller], **specs[caller])
        w.victim = ctl.add_user("victim", roles=[("engineer", SITE)],
                                **({"password": victim_password} if victim_password else {}))
        w.tokens = {"anon": None, "garbage": "not-a-login-token",
                    "forged": "wkt_" + secrets.token_urlsafe(32)}  # well-formed, but never issued
        for caller in w.people:
            w.relogin(caller)
        return w

    # ---- stock objects ----

    def renew(self, slot: str) -> None:
        """A fresh object for `slot` ("device:north", "agent:south", "site:empty"…), made by the first admin."""
        kind, _sep, where = slot.partition(":")
        n = next(self.counter)
        site = {"north": SITE, "south": OTHER_SITE}.get(where)
        if kind == "device":
            self.stock[slot] = self.ctl.add_device(f"{where[0].upper()}-RTU-{n}", site)["asset_id"]
        elif kind == "retired":
            self.stock[slot] = self.ctl.add_device(f"{where[0].upper()}-OLD-{n}", site, lifecycle="decommissioned")["asset_id"]
        elif kind == "agent":
            res = self.ctl.client.post(f"{API}/sites/{site}/agents", json={"name": f"agent-{where}-{n}"},
                                       headers=self.ctl.step_up_admin())
            assert res.status_code == 201, res.text
            self.stock[slot] = f"agent-{where}-{n}"
        elif kind == "site":
            self.stock[slot] = self.ctl.add_site(f"empty-{n}", tunnel_pool=_pool(n))["name"]
        elif kind == "token":
            res = self.ctl.client.post(f"{API}/sites/{site}/join-tokens", json={}, headers=self.ctl.step_up_admin())
            assert res.status_code == 201, res.text
            self.stock[slot] = res.json()["id"]

    def site_name(self, target: str) -> str:
        return {"south": OTHER_SITE, "missing": NO_SITE, "empty": self.stock["site:empty"]}.get(target, SITE)

    def asset_id(self, route: str, target: str) -> str:
        if target == "missing":
            return MISSING_ASSET
        where = "south" if target == "south" else "north"
        return self.stock[f"{'retired' if route.startswith('DELETE') else 'device'}:{where}"]

    # ---- calls ----

    def fresh_code(self, caller: str) -> str | None:
        person = self.people.get(caller)
        return self.ctl.code(person) if person else None

    def call(self, caller: str, method: str, path: str, *, json=None, totp: str | None = None, params=None,
             token: str | None = ...):
        headers = {}
        if token is ...:
            token = self.tokens.get(caller)
            if not path.endswith("/auth/login"):  # logging in does not look at the token, nor keep it alive
                self.used_at[caller] = self.ctl.t
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if totp:
            headers["X-Wicket-TOTP"] = totp
        return self.client.request(method, path, json=json, headers=headers, params=params)

    def relogin(self, caller: str) -> None:
        self.ctl.advance(30)
        self.tokens[caller] = self.ctl.login(self.people[caller])
        self.logged_in_at[caller] = self.used_at[caller] = self.ctl.t

    def keep_logged_in(self, caller: str) -> bool:
        """A login lasts 8 hours of the test's clock, which the whole matrix outlasts, and dies after 15
        minutes unused, which a caller the test leaves out for a while may be. True if it logged in again."""
        if caller not in self.logged_in_at:
            return False
        settings, now = self.ctl.settings, self.ctl.t
        if now - self.logged_in_at[caller] > settings.token_max_s - 3600 or now - self.used_at[caller] > settings.token_idle_s - 300:
            self.relogin(caller)
            return True
        return False

    def forget_failures(self) -> None:
        """Clear the failed-attempt throttle (it has tests of its own; here a refusal must not be a hold-off)."""
        with self.ctl.app.state.auth.factory() as s:
            s.execute(delete(Throttle))
            s.commit()

    # ---- what a refused call must leave alone ----

    def last_seq(self) -> int:
        with self.ctl.app.state.auth.factory() as s:
            return s.scalar(select(func.max(Event.seq))) or 0

    def events_after(self, seq: int) -> list[Event]:
        with self.ctl.app.state.auth.factory() as s:
            return list(s.scalars(select(Event).where(Event.seq > seq).order_by(Event.seq)))

    def state(self) -> tuple:
        """Every row of accounts, grants, recovery codes, sites, agents, devices, applied policies and sessions."""
        with self.ctl.app.state.auth.factory() as s:
            return tuple(tuple(s.execute(query).all()) for query in STATE + SESSION_STATE)

    @staticmethod
    def only_denied_sessions_added(before: tuple, after: tuple) -> bool:
        """Between two `state()`s: nothing changed but new sessions, each of them denied (a recorded decision)."""
        core = len(STATE)
        if before[:core] != after[:core] or before[core + 1:] != after[core + 1:]:
            return False
        old = {r.id for r in before[core]}
        return (tuple(r for r in after[core] if r.id in old) == before[core]
                and all(r.state == "denied" for r in after[core] if r.id not in old))

    def steps_used(self, caller: str) -> set[int]:
        """The TOTP steps `caller` has spent: the replay guard's rows, which a login or a step-up writes (a
        code is spent exactly when its step is here)."""
        with self.ctl.app.state.auth.factory() as s:
            return set(s.scalars(select(UsedTotp.step).where(UsedTotp.user_id == self.people[caller].user_id)))

    def target_id(self, caller: str, target: str) -> int:
        if target == "missing":
            return MISSING_ID
        if target == "self" and caller in self.people:
            return self.people[caller].user_id
        return self.victim.user_id  # "other"; and "self" for callers without an account

    def person_by_id(self, user_id: int) -> Person | None:
        return next((p for p in [*self.people.values(), self.victim] if p.user_id == user_id), None)

    def request_for(self, route: str, caller: str, target: str) -> tuple[str, str, dict | None, dict | None]:
        """Method, path, query and a minimal valid body for `route`, aimed at `target`."""
        method, template = route.split(" ", 1)
        person = self.people.get(caller)
        is_admin = caller == "admin"
        n = next(self.counter)
        site = self.site_name(target)
        path = template.replace("{user_id}", str(self.target_id(caller, target)))
        if "{asset_id}" in path:
            path = path.replace("{asset_id}", self.asset_id(route, target))
        if path.startswith(f"{API}/tasks/"):
            path = path.replace("{name}", TASK if target == "existing" else "no-such-task")
        path = path.replace("{name}", site)
        if "{agent}" in path:  # @south-agent-via-north: south-2's agent, removed by way of north-1
            agent = self.stock["agent:south" if target in ("south", "south-agent-via-north") else "agent:north"]
            if target == "missing" and path.startswith(f"{API}/agents/"):
                agent = "no-such-agent"
            path = path.replace("{agent}", agent)
        if "{token_id}" in path:
            path = path.replace("{token_id}", MISSING_TOKEN if target == "missing" else self.stock[f"token:{target}"])
        path = path.replace("{policy_id}", "1" if target == "existing" else str(MISSING_ID))
        if "{sid}" in path:
            path = path.replace("{sid}", self.session_for(route, caller, target))
        if "{ref}" in path:
            path = path.replace("{ref}", self.grant_for(route, caller, target))
        if "{node}" in path:
            path = path.replace("{node}", self.stock.get(f"agent:{target}", "no-such-node"))
        params = ({"site": site} if target != "self" and route in (f"GET {API}/devices", f"GET {API}/devices/export", f"GET {API}/agents")
                  else None)
        if route in ("GET /api/v1/sessions", "GET /api/v1/grants"):
            params = {"limit": 1000, **({"scope": "all"} if target == "all" else {})}
        elif route == "GET /api/v1/audit/access":
            params = {"device": MISSING_ASSET}
        elif route == "GET /api/v1/devices/{asset_id}/access":
            self.session_setup()
            asset = MISSING_ASSET if target == "missing" else self.session_devices[f"rtu:{target}"]
            path = f"{API}/devices/{asset}/access"
            params = {"from": _iso(self.ctl.t - 86400), "to": _iso(self.ctl.t + 3600)}
        body = None
        if route == "POST /api/v1/auth/login":
            if target == "self":
                body = {"username": person.username, "password": person.password, "totp_code": self.fresh_code(caller)}
            else:
                body = {"username": self.victim.username, "password": person.password if person else "wrong-password-1",
                        "totp_code": self.fresh_code(caller) or "123456"}
        elif route == "POST /api/v1/auth/password":
            body = {"current_password": person.password if person else "whatever-it-was",
                    "new_password": f"new password number {n}"}
        elif route == "POST /api/v1/users":
            # non-administrators try to create an administrator; the administrator creates an engineer
            role = {"role": "engineer", "site": SITE} if is_admin else {"role": "admin", "site": None}
            body = {"username": f"made{n}", "display_name": f"Made {n}", "password": f"made password {n}!",
                    "roles": [role]}
        elif route == "PUT /api/v1/users/{user_id}/roles":
            if not is_admin:
                body = {"roles": [{"role": "admin", "site": None}]}  # an attempt to escalate
            elif target == "self":
                body = {"roles": [{"role": "admin", "site": None}]}  # unchanged: keep the admin an admin
            else:
                body = {"roles": [{"role": "engineer", "site": SITE}, {"role": "approver", "site": SITE}]}
        elif route == "PUT /api/v1/users/{user_id}/password":
            body = {"password": f"set password number {n}"}
        elif route == "POST /api/v1/sites":
            body = {"name": f"made-{n}", "display_name": f"Made {n}", "tunnel_pool": _pool(n), "port_min": 51000,
                    "port_max": 51999, "public_endpoint": "203.0.113.9"}
        elif route == "PATCH /api/v1/sites/{name}":
            body = {"display_name": f"Changed {n}"}
        elif route == "POST /api/v1/sites/{name}/agents":
            body = {"name": f"agent-made-{n}", "description": "made by the matrix"}
        elif route == "POST /api/v1/sites/{name}/join-tokens":
            body = {"ttl": "30m"}
        elif route == "POST /api/v1/agents/{agent}/revoke":
            body = {"reason": f"matrix revocation {n}"}
        elif route == "POST /api/v1/devices":
            body = {"asset_id": f"MADE-{n}", "site": site, "device_type": "substation-rtu", "addresses": [_made_address(n)],
                    "lifecycle": "active"}
        elif route == "POST /api/v1/devices/import":
            if target == "south-to-north":  # south-2's device, rewritten and moved to north-1
                body = {"csv": f"{CSV_HEADER}{self.stock['device:south']},substation-rtu,{SITE},10.20.0.99\n", "update": True}
            else:
                body = {"csv": f"{CSV_HEADER}MADE-{n},substation-rtu,{site},{_made_address(n)}\n"}
        elif route == "POST /api/v1/devices/{asset_id}/bind":
            body = {"iccid": iccid_for(n)}
        elif route == "POST /api/v1/grants":
            self.session_setup()
            self.devices_seen()
            device = MISSING_ASSET if target == "missing" else self.session_devices[f"der:{target}"]
            body = {"task": GRANT_TASK, "devices": [device], "reason": f"matrix grant {n}"}
        elif route in ("POST /api/v1/grants/{ref}/approve", "POST /api/v1/grants/{ref}/reject",
                       "POST /api/v1/grants/{ref}/close", "POST /api/v1/grants/{ref}/revoke"):
            body = {"reason": f"matrix {route.rsplit('/', 1)[-1]} {n}"}
        elif route == "PATCH /api/v1/devices/{asset_id}":
            # @north-to-south: north-1's device, moved to south-2
            body = {"site": OTHER_SITE} if target == "north-to-south" else {"description": f"changed {n}"}
        elif route in ("POST /api/v1/policy/check", "POST /api/v1/policy/diff"):
            body = {"files": example_policy_files()}
        elif route == "POST /api/v1/policy/apply":  # a policy that differs from the active one
            extra = f"wicket_policy: 1\ndestinations:\n  made-{n}:\n    addresses: [198.51.100.{n % 250 + 1}]\n"
            body = {"files": {**example_policy_files(), "made.yaml": extra}, "comment": f"made {n}"}
        elif route in ("POST /api/v1/sessions", "POST /api/v1/break-glass"):
            self.session_setup()
            device = MISSING_ASSET if target == "missing" else self.session_devices[f"rtu:{'south' if target == 'south' else 'north'}"]
            body = {"device": device, "task": TASK, "reason": f"matrix request {n}"}
            if route.endswith("break-glass"):
                body["incident"] = f"INC-{n}"
        elif route in ("POST /api/v1/sessions/{sid}/approve", "POST /api/v1/sessions/{sid}/reject"):
            body = {"reason": f"matrix answer {n}"}
        elif route == "POST /api/v1/sessions/{sid}/activate":
            body = {}
        elif route == "POST /api/v1/sessions/{sid}/extend":
            body = {"by": "5m", "reason_code": "fault-still-open"}
        elif route == "POST /api/v1/sessions/{sid}/close":
            body = {"reason": f"matrix close {n}"}
        elif route == "POST /api/v1/sessions/{sid}/revoke":
            body = {"reason": f"matrix revocation {n}"}
        elif route == "POST /api/v1/sessions/{sid}/review":
            body = {"note": f"matrix review {n}"}
        elif route == "POST /api/v1/policy/evaluate":
            # @other-user: the victim (an engineer at north-1) on north-1's device; -south: on south-2's;
            # @missing-user: someone who does not exist
            device = self.stock["device:south"] if target in ("south", "other-user-south") else self.stock["device:north"]
            body = {"device": MISSING_ASSET if target == "missing" else device, "task": TASK}
            if target.startswith("other-user"):
                body["user"] = self.victim.username
            elif target == "missing-user":
                body["user"] = "nobody-here"
        if self.keep_logged_in(caller):  # making the sessions to aim at took a while
            self.ctl.advance(30)  # and the login spent this step's code
        return method, path, params, body

    def after_success(self, route: str, target: str, caller: str, path: str, body: dict | None, res) -> None:
        """Keep our picture of the world true after a call that changed it."""
        if (route, target) in RENEW:
            self.renew(RENEW[(route, target)])
        elif route == "POST /api/v1/auth/password":
            self.people[caller].password = body["new_password"]
        elif route == "POST /api/v1/auth/logout":
            self.relogin(caller)
        elif route == "PUT /api/v1/users/{user_id}/password":
            target = self.person_by_id(int(path.rsplit("/", 2)[-2]))
            if target is not None:
                target.password = body["password"]
        elif route == "POST /api/v1/users/{user_id}/totp":
            target = self.person_by_id(int(path.rsplit("/", 2)[-2]))
            if target is not None:
                target.secret = re.search(r"secret=([A-Z2-7]+)", res.json()["otpauth_uri"]).group(1)
        elif route in ("POST /api/v1/sessions", "POST /api/v1/break-glass"):
            self.open_sessions.setdefault(caller, []).append(res.json()["id"])
        elif ("{sid}" in route and route != "GET /api/v1/sessions/{sid}") or ("{ref}" in route and not route.startswith("GET")):
            self.slots.pop(self.last_slot, None)  # used up: the next caller gets a fresh one

    # ---- sessions for the calls to aim at ----

    def session_setup(self) -> None:
        """Once, before the first session call: a device of each kind seen now at both sites; the engineers who
        own the @north and @south sessions (with break-glass grants) and the approvers who approve them; and a
        break-glass grant at north-1 for the engineer, so that one caller may open a break-glass session."""
        if self.session_devices:
            return
        ctl = self.ctl
        for where, site in (("north", SITE), ("south", OTHER_SITE)):
            for kind, device_type in (("rtu", "substation-rtu"), ("der", "der-gateway"), ("mc", "meter-concentrator")):
                asset = f"S-{kind.upper()}-{where[0].upper()}"
                ctl.add_device(asset, site, device_type=device_type, last_seen=_iso(ctl.t))
                self.session_devices[f"{kind}:{where}"] = asset
        self.seen_at = ctl.t
        for where, site in (("north", SITE), ("south", OTHER_SITE)):
            n = where[0]
            self.people[f"owner:{where}"] = ctl.add_user(f"sown{n}", roles=[("engineer", site), ("break_glass", site)])
            self.people[f"approver:{where}"] = ctl.add_user(f"sappr{n}", roles=[("approver", site)])
            self.relogin(f"owner:{where}")
            self.relogin(f"approver:{where}")
        if "engineer" in self.people:
            session_helpers.grant(ctl, self.people["engineer"], "break_glass", SITE)

    def session_for(self, route: str, caller: str, target: str) -> str:
        """The session a call of `route` aims at: @own the caller's, @north / @south another engineer's there,
        in the state the route acts on (SESSION_NEEDS; active otherwise). One per row and owner, until used up."""
        if target == "missing":
            return NO_SESSION
        self.session_setup()
        owner = caller if target == "own" else f"owner:{target}"
        where = ("south" if caller.endswith("_s2") else "north") if target == "own" else target
        key = self.last_slot = (route, target, owner)
        if key not in self.slots:
            self.slots[key] = self.open_session(owner, where, SESSION_NEEDS.get(route.rsplit("/", 1)[-1], "active"))
        return self.slots[key]

    def devices_seen(self) -> None:
        ctl = self.ctl
        if ctl.t - self.seen_at > 3 * 3600:  # the policy refuses a device not seen for a while (a meter concentrator: 6h)
            for asset in self.session_devices.values():
                res = ctl.client.patch(f"{API}/devices/{asset}", json={"last_seen": _iso(ctl.t)}, headers=ctl.step_up_admin())
                assert res.status_code == 200, res.text
            self.seen_at = ctl.t

    def grant_for(self, route: str, caller: str, target: str) -> str:
        """The grant (or, for BY_GROUP actions, its group) a call of `route` aims at, like `session_for`."""
        action = route.rsplit("/", 1)[-1]
        if target == "missing":
            return NO_GROUP if action in BY_GROUP else NO_SESSION
        self.session_setup()
        owner = caller if target == "own" else f"owner:{target}"
        where = ("south" if caller.endswith("_s2") else "north") if target == "own" else target
        key = self.last_slot = (route, target, owner)
        if key not in self.slots:
            self.slots[key] = self.open_grant(owner, where, GRANT_NEEDS.get(action, "active"), by_group=action in BY_GROUP)
        return self.slots[key]

    def open_grant(self, owner: str, where: str, need: str, *, by_group: bool) -> str:
        """A new grant of `owner` at `where` in state `need` (active, pending, approved): its ID, or its group's."""
        self.devices_seen()
        self.keep_logged_in(owner)
        waits = need in ("pending", "approved")
        body = {"task": APPROVAL_GRANT if waits else GRANT_TASK, "reason": "made by the authorisation matrix",
                "devices": [self.session_devices[f"{'mc' if waits else 'der'}:{where}"]]}
        res = self.stepped_up(owner, "POST", f"{API}/grants", body)
        assert res.status_code == 201, res.text
        (grant,) = res.json()["grants"]
        assert grant["state"] == ("pending_approval" if waits else "active"), res.text
        if need == "approved":
            res = self.stepped_up(f"approver:{where}", "POST", f"{API}/grants/{grant['id']}/approve", {"reason": "made by the matrix"})
            assert res.status_code == 200 and res.json()["grants"][0]["state"] == "approved", res.text
        self.ctl.advance(30)  # whoever calls next sends a code from a step nobody has used
        return grant["grant_group"] if by_group else grant["id"]

    def open_session(self, owner: str, where: str, need: str) -> str:
        """A new session of `owner` at `where` in state `need` (active, pending, approved, break-glass); the
        owner's earlier ones are closed first (the policy allows two open at a time)."""
        ctl = self.ctl
        self.devices_seen()
        self.keep_logged_in(owner)
        for sid in self.open_sessions.pop(owner, []):
            self.call(owner, "POST", f"{API}/sessions/{sid}/close")  # 409 for one that has ended: fine
        asks_approval = need in ("pending", "approved")
        body = {"device": self.session_devices[f"{'der' if asks_approval else 'rtu'}:{where}"],
                "task": APPROVAL_TASK if asks_approval else TASK, "reason": "made by the authorisation matrix"}
        if need == "break-glass":
            body["incident"] = "INC-MATRIX"
        elif need == "active":
            body["duration"] = "1h"
        res = self.stepped_up(owner, "POST", f"{API}/{'break-glass' if need == 'break-glass' else 'sessions'}", body)
        assert res.status_code == 201, res.text
        sid, state = res.json()["id"], res.json()["state"]
        self.open_sessions.setdefault(owner, []).append(sid)
        assert state == ("pending_approval" if asks_approval else "active"), res.text
        if need == "approved":
            res = self.stepped_up(f"approver:{where}", "POST", f"{API}/sessions/{sid}/approve", {"reason": "made by the matrix"})
            assert res.status_code == 200 and res.json()["state"] == "approved", res.text
        ctl.advance(30)  # whoever calls next sends a code from a step nobody has used
        return sid

    def stepped_up(self, who: str, method: str, path: str, body: dict):
        self.keep_logged_in(who)
        self.ctl.advance(30)
        return self.call(who, method, path, json=body, totp=self.fresh_code(who))

    # ---- what a successful read may show ----

    def readable(self, caller: str) -> set[str] | None:
        """The sites `caller` may read; None: every site."""
        roles = self.people[caller].roles
        if any(site is None for _role, site in roles):
            return None
        return {site for _role, site in roles}

    def shown_too_much(self, route: str, caller: str, params: dict | None, res) -> str | None:
        """For a list, the sites it names must be exactly the caller's sites that have such objects; a list of
        sessions or the approval queue exactly the sessions the caller may see in it."""
        if route in ("GET /api/v1/sessions", "GET /api/v1/approvals", "GET /api/v1/grants"):
            return self.sessions_shown_wrong(route, caller, params, res)
        if route == "GET /api/v1/agents":
            return self.agents_shown_wrong(caller, params, res)
        if route not in ("GET /api/v1/sites", "GET /api/v1/devices", "GET /api/v1/devices/export"):
            return None
        with self.ctl.app.state.auth.factory() as s:
            all_sites = set(s.scalars(select(Site.name)))
            with_devices = set(s.scalars(select(Site.name).join(Device, Device.site_id == Site.id)))
        mine = self.readable(caller)
        if route == "GET /api/v1/sites":
            shown, want = {x["name"] for x in res.json()}, all_sites if mine is None else all_sites & mine
        elif route in ("GET /api/v1/devices", "GET /api/v1/devices/export"):
            if route.endswith("export"):
                shown = {row["site"] for row in csv.DictReader(io.StringIO(res.text))}
            else:
                shown = {d["site"] for d in res.json()["devices"]}
            want = with_devices if mine is None else with_devices & mine
            if params:
                want &= {params["site"]}
        return None if shown == want else f"showed sites {sorted(shown)}, not {sorted(want)}"

    def agents_shown_wrong(self, caller: str, params: dict | None, res) -> str | None:
        """GET /agents: every agent at a site where the caller is site_admin, soc or admin (of the one asked for)."""
        with self.ctl.app.state.auth.factory() as s:
            rows = s.execute(select(NodeAgent.name, Site.name).join(Site, Site.id == NodeAgent.site_id)).all()
        sites = self.sites_with(caller, ("site_admin", "soc", "admin"))
        want = {agent for agent, site in rows if (sites is None or site in sites) and (not params or site == params["site"])}
        shown = {a["name"] for a in res.json()}
        return None if shown == want else f"showed agents {sorted(shown - want)} it should not, and not {sorted(want - shown)}"

    def sites_with(self, caller: str, roles: tuple[str, ...]) -> set[str] | None:
        """The sites where `caller` holds one of `roles`; None: every site."""
        out = set()
        for role, site in self.people[caller].roles:
            if role in roles:
                if site is None:
                    return None
                out.add(site)
        return out

    def sessions_shown_wrong(self, route: str, caller: str, params: dict | None, res) -> str | None:
        """GET /sessions: the caller's own; with scope=all, also every one at a site where the caller is approver,
        site_admin, soc or admin. GET /approvals: requests pending at the caller's approver sites, not their own,
        not yet answered by them."""
        me = self.people[caller]
        with self.ctl.app.state.auth.factory() as s:
            query = select(AccessSession.id, AccessSession.user_id, AccessSession.site, AccessSession.state)
            if route == "GET /api/v1/grants":
                query = query.where(AccessSession.kind == "grant")
            rows = s.execute(query).all()
            answered = set(s.scalars(select(SessionApproval.session_id).where(SessionApproval.approver_id == me.user_id,
                                                                              SessionApproval.kind == "request")))
        if route in ("GET /api/v1/sessions", "GET /api/v1/grants"):
            shown = {x["id"] for x in res.json()}
            sites = self.sites_with(caller, READERS) if (params or {}).get("scope") == "all" else set()
            want = {sid for sid, user_id, site, _state in rows if user_id == me.user_id or sites is None or site in sites}
        else:
            shown = {x["session"]["id"] for x in res.json()}
            sites = self.sites_with(caller, ("approver",))
            want = {sid for sid, user_id, site, state in rows if state == "pending_approval" and user_id != me.user_id
                    and (sites is None or site in sites) and sid not in answered}
        if shown == want:
            return None
        return f"showed {sorted(shown - want)} it should not, and not {sorted(want - shown)}"

    # ---- one cell of the table ----

    def check(self, key: str, caller: str) -> list[Mismatch]:
        """Make the call of row `key` as `caller` and compare everything observable with the table."""
        route, target = split_key(key)
        expected = MATRIX[key][caller]
        self.keep_logged_in(caller)
        self.ctl.advance(30)  # a fresh TOTP step: every caller with an account sends an unused code
        method, path, params, body = self.request_for(route, caller, target)
        code = self.fresh_code(caller)
        refused = expected >= 400
        if refused:
            seq, before = self.last_seq(), self.state()
            steps = self.steps_used(caller) if code else None
        res = self.call(caller, method, path, json=body, params=params, totp=code)
        got = res.status_code
        out = []
        if got != expected:
            out.append(Mismatch(key, caller, expected, got, res.text))
        if 200 <= got < 300:
            problem = self.shown_too_much(route, caller, params, res)
            if problem:
                out.append(Mismatch(key, caller, "own sites", "more", problem))
            self.after_success(route, target, caller, path, body, res)
        if got == 200 and route == "GET /api/v1/auth/whoami" and res.json()["username"] != self.people[caller].username:
            out.append(Mismatch(key, caller, "own name", res.json()["username"], "whoami named someone else"))
        if route == "POST /api/v1/auth/logout" and got == 204:
            seen = self.call("victim", "GET", f"{API}/auth/whoami", token=self.victim_token)
            if seen.status_code != 200:
                out.append(Mismatch(key, caller, "victim on", seen.status_code, "a logout ended someone else's login"))
        if refused:
            # refused: nothing changed, no account, inventory or policy event; and when refused for who is
            # asking or what is asked for (401/403/404), before the step-up: no step-up event, the code unspent.
            # A policy's refusal (DECIDED_AFTER_STEP_UP) comes after the step-up and leaves its record: a denied
            # session and a failure event.
            decided = got == expected == 403 and route in DECIDED_AFTER_STEP_UP
            before_step_up = expected in (401, 403, 404) and not decided
            found = self.events_after(seq)
            bad = [f"{e.type}/{e.result}" for e in found
                   if e.category in ("account", "inventory", "policy", "agent") or (before_step_up and e.type == "step_up")]
            if bad:
                out.append(Mismatch(key, caller, "no events", "events", f"recorded {bad}"))
            after = self.state()
            if decided:
                if not self.only_denied_sessions_added(before, after):
                    out.append(Mismatch(key, caller, "a denial", "changed", "a refused request changed more than its record"))
                if not any(e.type == DECIDED_AFTER_STEP_UP[route] and e.result == "failure" and e.actor_id == self.people[caller].user_id
                           for e in found):
                    out.append(Mismatch(key, caller, "recorded", "unrecorded", "a refused request left no failure event"))
            elif after != before:
                out.append(Mismatch(key, caller, "unchanged", "changed", "a refused call changed an account, the inventory or a session"))
            if before_step_up and code is not None and self.steps_used(caller) != steps:
                out.append(Mismatch(key, caller, "code unused", "spent", "a refused call consumed the step-up code"))
        return out


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def _pool(n: int) -> str:
    return f"100.{101 + n // 250}.{n % 250}.0/24"


def known_bug_at(key: str, caller: str, found: list[Mismatch]) -> str | None:
    """The known bug that explains what this cell shows: the answer the bug gives today (with whatever
    follows from it, such as the change a wrongly allowed call made)."""
    for name, bug in KNOWN_BUGS.items():
        today = bug.cells.get((key, caller))
        if today is not None and any(m.got == today for m in found):
            return name
    return None


def report(title: str, mismatches: list[Mismatch]) -> str:
    lines = [f"{title}: {len(mismatches)} mismatch(es)", ""]
    width = max(len(m.key) for m in mismatches)
    lines.append(f"  {'route':<{width}}  {'caller':<13}  {'expected':>8}  {'got':>8}  detail")
    for m in mismatches:
        lines.append(f"  {m.key:<{width}}  {m.caller:<13}  {m.expected!s:>8}  {m.got!s:>8}  {m.detail[:160]}")
    return "\n".join(lines)


def uncovered(app, table_routes: set[str]) -> tuple[set[str], set[str]]:
    served = set(api_routes(app))
    return served - table_routes, table_routes - served


# ---- the tests ----


def test_the_table_covers_every_route_and_its_step_up(ctl):
    routes = api_routes(ctl.app)
    missing, stale = uncovered(ctl.app, {split_key(k)[0] for k in MATRIX})
    assert not missing, f"routes with no row in the authorisation matrix (add them to _ROWS): {sorted(missing)}"
    assert not stale, f"matrix rows for routes the app does not serve: {sorted(stale)}"
    assert {k for k, r in routes.items() if takes_step_up(r)} == STEP_UP
    for key in SELF_SERVICE:
        assert key in routes
    for bug in KNOWN_BUGS.values():
        for key, caller in bug.cells:
            assert key in MATRIX and caller in CALLERS, (key, caller)


@SQLITE
def test_every_route_by_every_caller(ctl):
    missing, stale = uncovered(ctl.app, {split_key(k)[0] for k in MATRIX})
    assert not missing and not stale, f"matrix out of date: missing {sorted(missing)}, stale {sorted(stale)}"
    w = World.build(ctl)
    mismatches: list[Mismatch] = []
    tolerated: set[str] = set()
    calls = 0
    for key, expected_by_caller in MATRIX.items():
        if split_key(key)[0] == "POST /api/v1/auth/logout":
            w.victim_token = ctl.login(w.victim)  # someone else's login, which nobody's logout may end
        for caller in CALLERS:
            if expected_by_caller[caller] is None:
                continue
            found = w.check(key, caller)
            bug = known_bug_at(key, caller, found) if found else None
            if bug:
                tolerated.add(bug)
            else:
                mismatches += found
            calls += 1
    print(f"{calls} calls; known bugs seen: {sorted(tolerated) or 'none'}")
    assert calls > 900
    if mismatches:
        pytest.fail(report("authorisation matrix", mismatches), pytrace=False)


if KNOWN_BUGS:  # none today; an empty parameter set would only show up as a skipped test

    @pytest.mark.parametrize("bug", [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=b.reason))
                                     for name, b in KNOWN_BUGS.items()])
    def test_known_authorisation_bug(ctl, bug):
        """The cells of one known bug, checked against the table: this fails (xfail) while the bug is there."""
        w = World.build(ctl)
        mismatches = [m for key, caller in KNOWN_BUGS[bug].cells for m in w.check(key, caller)]
        assert not mismatches, report(bug, mismatches)


def step_up_callers(route: str) -> list[tuple[str, str]]:
    """Each caller the table lets through on `route` somewhere, with the first target where it does."""
    out = []
    for caller in PEOPLE:
        for key, row in MATRIX.items():
            if split_key(key)[0] == route and 200 <= (row[caller] or 0) < 300:
                out.append((caller, split_key(key)[1]))
                break
    return out


def test_step_up_is_required_and_single_use(ctl):
    """Every route that changes something, with a valid login of a caller allowed to make the change:
    no X-Wicket-TOTP → 401 step_up_required; a code already used → 401; and nothing changes."""
    w = World.build(ctl)
    mismatches: list[Mismatch] = []
    for route in sorted(STEP_UP):
        allowed = step_up_callers(route)
        assert allowed, f"{route}: the table lets nobody make this change"
        for caller, target in allowed:
            variants = ("no header", "reused code") if caller in ("admin", "engineer", "contractor") else ("no header",)
            for variant in variants:
                w.keep_logged_in(caller)
                ctl.advance(30)
                method, path, params, body = w.request_for(route, caller, target)
                code = None
                if variant == "reused code":
                    code = w.fresh_code(caller)
                    spend = w.call(caller, "POST", f"{API}/auth/recovery-codes", totp=code)
                    assert spend.status_code == 200, spend.text
                seq, before = w.last_seq(), w.state()
                res = w.call(caller, method, path, json=body, params=params, totp=code)
                error = res.json().get("error") if res.headers.get("content-type", "").startswith("application/json") else None
                label = f"{route} @{target} [{variant}]"
                if (res.status_code, error) != (401, "step_up_required"):
                    mismatches.append(Mismatch(label, caller, "401 step_up_required", f"{res.status_code} {error}", res.text))
                if w.state() != before:
                    mismatches.append(Mismatch(label, caller, "unchanged", "changed", "an account or the inventory changed"))
                done = [f"{e.type}/{e.result}" for e in w.events_after(seq)
                        if e.category in ("account", "inventory", "policy", "agent") or (e.type == "step_up" and e.result == "success")]
                if done:
                    mismatches.append(Mismatch(label, caller, "nothing done", "events", f"recorded {done}"))
                if variant == "reused code":
                    w.forget_failures()  # a reused code counts as a failed attempt; enough of them would hold us off
    if mismatches:
        pytest.fail(report("step-up", mismatches), pytrace=False)


def test_a_disabled_users_token_is_refused_on_every_route(ctl):
    w = World.build(ctl, roles=("engineer", "admin"))
    gone = ctl.add_user("gone", roles=[("site_admin", SITE), ("approver", SITE)])
    w.people["gone"] = gone
    w.tokens["gone"] = ctl.login(gone)
    ctl.advance(30)
    res = w.call("admin", "POST", f"{API}/users/{gone.user_id}/disable", totp=w.fresh_code("admin"))
    assert res.status_code == 200, res.text
    mismatches: list[Mismatch] = []
    routes = api_routes(ctl.app)
    for route in routes:
        for target in (("self", "other") if "{user_id}" in route else ("north",)):
            ctl.advance(30)
            method, path, params, body = w.request_for(route, "gone", target)  # a minimal valid body
            if route == "POST /api/v1/auth/login":
                # no token here: the right password and code still do not let a disabled account in
                body = {"username": gone.username, "password": gone.password, "totp_code": ctl.code(gone)}
                want = (403, "account_disabled")
            else:
                want = (401, "account_disabled")
            seq, before = w.last_seq(), w.state()
            res = w.call("gone", method, path, json=body, params=params, totp=ctl.code(gone))
            error = res.json().get("error") if res.headers.get("content-type", "").startswith("application/json") else None
            if (res.status_code, error) != want:
                mismatches.append(Mismatch(f"{route} @{target}", "gone", f"{want[0]} {want[1]}",
                                           f"{res.status_code} {error}", res.text))
            done = [f"{e.type}/{e.result}" for e in w.events_after(seq)
                    if e.category in ("account", "inventory", "policy", "agent") or (e.type in ("step_up", "login") and e.result == "success")]
            if done:
                mismatches.append(Mismatch(f"{route} @{target}", "gone", "nothing done", "events", f"recorded {done}"))
            if w.state() != before:
                mismatches.append(Mismatch(f"{route} @{target}", "gone", "unchanged", "changed", "something changed"))
    if mismatches:
        pytest.fail(report("disabled account", mismatches), pytrace=False)


def test_self_service_routes_cannot_address_someone_else(ctl):
    """whoami, logout, recovery codes and own password act on the caller and nothing names anyone else:
    no path or query parameter, a body that refuses extra fields; trying to smuggle a name in is ignored
    (query) or refused (body), and the other person is untouched."""
    routes = api_routes(ctl.app)
    for key in SELF_SERVICE:
        dep = routes[key].dependant
        assert not dep.path_params and not dep.query_params, f"{key} takes a parameter that could name someone"
        for p in dep.body_params:
            model = p.field_info.annotation
            assert model.model_config.get("extra") == "forbid", f"{key}: body accepts unknown fields"
            assert set(model.model_fields) <= {"current_password", "new_password"}, f"{key}: {set(model.model_fields)}"

    w = World.build(ctl, roles=("engineer", "admin"), victim_password="the victim's own password")
    victim = w.victim
    victim_token = ctl.login(victim)
    smuggle = {"user_id": victim.user_id, "username": victim.username, "subject": victim.username}
    for caller in ("engineer", "admin"):
        me = w.people[caller]

        res = w.call(caller, "GET", f"{API}/auth/whoami", params=smuggle)
        assert res.status_code == 200 and res.json()["username"] == me.username, res.text

        ctl.advance(30)
        seq = w.last_seq()
        res = w.call(caller, "POST", f"{API}/auth/recovery-codes", params=smuggle, json=smuggle, totp=w.fresh_code(caller))
        assert res.status_code == 200, res.text
        issued = [e.subject for e in w.events_after(seq) if e.type == "recovery_codes_issued"]
        assert issued == [me.username]

        ctl.advance(30)
        body = {"current_password": me.password, "new_password": "somebody else's new pw", **smuggle}
        res = w.call(caller, "POST", f"{API}/auth/password", params=smuggle, json=body, totp=w.fresh_code(caller))
        assert res.status_code == 422, res.text
        ctl.advance(30)  # the other person's current password does not change theirs, nor the caller's
        body = {"current_password": victim.password, "new_password": "somebody else's new pw"}
        res = w.call(caller, "POST", f"{API}/auth/password", params=smuggle, json=body, totp=w.fresh_code(caller))
        assert res.status_code == 401 and res.json()["error"] == "invalid_credentials", res.text

        res = w.call(caller, "POST", f"{API}/auth/logout", params=smuggle, json=smuggle)
        assert res.status_code == 204, res.text
        assert w.call(caller, "GET", f"{API}/auth/whoami").status_code == 401, "the caller's own login ended"
        assert w.call("victim", "GET", f"{API}/auth/whoami", token=victim_token).status_code == 200, \
            "a logout ended someone else's login"
        w.relogin(caller)

    # the victim still logs in with the old password: nobody changed it
    ctl.advance(30)
    assert ctl.login(victim)
