"""The agent's two error families, and where kernel failures are translated into them.

Temporary errors are retried on the next reconcile (a busy kernel, a process that has not come up yet);
permanent ones need a changed input (a bad desired state, a port already taken by something else).
"""

from __future__ import annotations


class AgentError(Exception):
    temporary = False


class TemporaryError(AgentError):
    temporary = True


class PermanentError(AgentError):
    pass


class InvalidDesiredState(PermanentError):
    """A desired state that must not be applied (bad values, older generation)."""


class FirewallError(TemporaryError):
    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


class LaneError(TemporaryError):
    """A lane could not be opened or closed; the message names the lane and the step."""


class PrerequisiteError(PermanentError):
    """The node cannot enforce lanes safely (e.g. conntrack accounting cannot be switched on)."""
