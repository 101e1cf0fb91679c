"""wicket controller (FastAPI service): identities and MFA, roles, the account-event log.

It may import `nodeagent.wire` (the controller↔agent messages); the reverse import is forbidden and
checked by import-linter (`make lint`).
"""

__version__ = "0.1.0"
