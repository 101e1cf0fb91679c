"""Policy: the files operators write (`loader`), and the engine that decides requests (`engine`)."""

from .engine import (
    ALLOW,
    ALLOW_WITH_APPROVAL,
    CHECKS,
    DENY,
    AccessRequest,
    Check,
    Decision,
    DeviceFacts,
    SiteFacts,
    UserFacts,
    break_glass_tasks,
    evaluate,
)
from .loader import Policy, canonical, load_files
from .source import PolicyError

__all__ = [
    "ALLOW", "ALLOW_WITH_APPROVAL", "CHECKS", "DENY", "AccessRequest", "Check", "Decision", "DeviceFacts",
    "Policy", "PolicyError", "SiteFacts", "UserFacts", "break_glass_tasks", "canonical", "evaluate", "load_files",
]
