"""wicket controller (FastAPI service).

Not built yet: identities and MFA, inventory, policy, sessions and the agent link arrive with
later issues. It already may import `nodeagent.wire` (the controller↔agent messages); the
reverse import is forbidden and checked by import-linter (`make lint`).
"""
