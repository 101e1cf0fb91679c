"""What the policy API takes and returns."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from .schemas import PRINTABLE, UtcTime, _In

FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # the CLI checks local files with it before sending
FileName = Annotated[str, StringConstraints(pattern=FILE_NAME.pattern)]


def _text(value):
    """File contents: any text but NUL and other control characters (tabs and line ends are fine)."""
    if isinstance(value, str) and any((ord(c) < 32 and c not in "\t\n\r") or ord(c) == 127 for c in value):
        raise ValueError("text must not contain control characters other than tab and line ends")
    return value


FileText = Annotated[str, BeforeValidator(_text), StringConstraints(max_length=4 * 1024 * 1024)]
CSV_MAX_CHARS = 16 * 1024 * 1024  # about 110 000 passports; devicecsv.MAX_ROWS is 100 000
CsvText = Annotated[str, BeforeValidator(_text), StringConstraints(max_length=CSV_MAX_CHARS)]


class _Files(BaseModel):
    """Like `_In`, but file texts may hold tabs and line ends."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _printable(cls, data):
        def walk(v):
            if isinstance(v, dict):
                for k, x in v.items():
                    walk(k)
                    walk(x)
            elif isinstance(v, list):
                for x in v:
                    walk(x)
            else:
                _text(v)
        walk(data)
        return data


class PolicyFilesIn(_Files):
    files: dict[FileName, FileText] = Field(min_length=1, max_length=64)


class PolicyApplyIn(PolicyFilesIn):
    comment: str = Field(default="", max_length=500, pattern=PRINTABLE)


class PolicyCheckOut(BaseModel):
    version: str
    protocols: int
    destinations: int
    device_types: int
    tasks: int
    change_windows: int
    locations: int


class PolicyDiffOut(BaseModel):
    version: str
    active_version: str | None
    changes: list[str]


class PolicyVersionOut(BaseModel):
    id: int
    version: str
    applied_at: datetime
    applied_by: str
    comment: str
    files: list[str]


class PolicyAppliedOut(PolicyVersionOut):
    changes: list[str]


class PolicyFull(PolicyVersionOut):
    document: dict[str, Any]
    sources: dict[str, str]


class EvaluateIn(_In):
    device: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=PRINTABLE)]
    task: Annotated[str, StringConstraints(min_length=1, max_length=48, pattern=PRINTABLE)]
    duration: str | None = Field(default=None, max_length=16, description="e.g. 30m; default: the task's")
    user: str | None = Field(default=None, max_length=64, pattern=PRINTABLE, description="someone else (admin, soc, approver)")
    source: str | None = Field(default=None, max_length=45, pattern=PRINTABLE, description="a source address to test; default: yours")
    at: UtcTime | None = Field(default=None, description="a time to test; default: now")

    @field_validator("duration")
    @classmethod
    def _duration(cls, v):
        if v is not None:
            from .policy.durations import parse_duration

            parse_duration(v)
        return v


class TraceEntry(BaseModel):
    check: str
    result: str
    reason: str
    inputs: dict[str, Any]


class AccessOut(BaseModel):
    protocol: str
    transport: str
    port: int
    address: str


class DecisionOut(BaseModel):
    outcome: str = Field(description="allow | allow_with_approval | deny")
    reason: str
    failed_checks: list[str]
    policy_version: str
    evaluated_at: str
    approvals_required: int
    approval_reasons: list[str]
    duration: str | None
    ends_at: str | None
    access: list[AccessOut]
    recording: str | None
    trace: list[TraceEntry]


class CsvImportIn(_Files):
    csv: CsvText
    update: bool = Field(default=False, description="change existing passports too (otherwise they are errors)")
    dry_run: bool = False


class SigningKeyOut(BaseModel):
    key_id: str
    public_key: str = Field(description="Ed25519, raw 32 bytes, base64")
