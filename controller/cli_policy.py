"""`wicket policy …`, `wicket tasks …`, `wicket protocols`, `wicket device-types`: policy files and what
the active policy says. `cli.py` adds these commands to the root app (`register`).

\b
  wicket policy check PATH...                       offline: load the files as the controller would
  wicket policy diff PATH...                        what applying them would change
  wicket policy apply PATH... [--comment TEXT] [--yes] [--totp CODE]
  wicket policy show [--files DIR [--force]] [--json] | history [--json]
  wicket policy explain --device ASSET --task NAME [--for 30m] [--user NAME] [--source ADDR] [--at TIME] [--json]

A PATH is a policy file or a directory of *.yaml / *.yml files. The controller knows files by name
only, so two PATHs may not hold files of the same name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .cli_common import (
    EXIT_USAGE,
    CliError,
    JsonOpt,
    TotpOpt,
    YesOpt,
    connect,
    instant,
    listed,
    pairs,
    print_json,
    segment,
    step_up,
    table,
    when,
)
from .policy import PolicyError, load_files
from .policy.model import SECTIONS
from .policy_schemas import FILE_NAME

EXIT_DENY = 2

policy_app = typer.Typer(help="Policy files: check, diff, apply, show, history, explain a decision.",
                         no_args_is_help=True, rich_markup_mode=None)
tasks_app = typer.Typer(help="Tasks (job templates) of the active policy.", no_args_is_help=True, rich_markup_mode=None)

PathsArg = Annotated[list[Path], typer.Argument(metavar="PATH...", help="policy files, or directories of *.yaml / *.yml")]


def register(app: typer.Typer) -> None:
    app.add_typer(policy_app, name="policy")
    app.add_typer(tasks_app, name="tasks")
    app.command("protocols")(protocols)
    app.command("device-types")(device_types)


# ---- policy files ----


@policy_app.command("check")
def policy_check(paths: PathsArg) -> None:
    """Check policy files offline (no controller needed): the version and counts, or every problem."""
    files = read_policy_files(paths)
    try:
        policy = load_files({str(path): text for path, text in files.values()})
    except PolicyError as exc:
        raise CliError(f"the policy is not valid ({len(exc.problems)} problem(s)):", lines=exc.problems) from None
    typer.echo(f"Policy OK: version {policy.version}")
    typer.echo(f"{len(files)} file(s): " + _counts({s: getattr(policy.document, s) for s in SECTIONS}))


@policy_app.command("diff")
def policy_diff(ctx: typer.Context, paths: PathsArg) -> None:
    """What applying these files would change on the controller."""
    out = connect(ctx).call("POST", "/api/v1/policy/diff", body={"files": _texts(read_policy_files(paths))})
    _show_changes(out)


@policy_app.command("apply")
def policy_apply(ctx: typer.Context, paths: PathsArg,
                 comment: Annotated[str, typer.Option("--comment", "-m", metavar="TEXT", help="why (kept in the history)")] = "",
                 yes: YesOpt = False, totp: TotpOpt = None) -> None:
    """Show what changes, ask, then apply the files as the new policy version (admin)."""
    api = connect(ctx)
    files = _texts(read_policy_files(paths))
    out = api.call("POST", "/api/v1/policy/diff", body={"files": files})
    if _show_changes(out):
        return
    if not yes:
        typer.confirm(f"Apply policy {out['version']}?", abort=True)
    row = api.call("POST", "/api/v1/policy/apply", body={"files": files, "comment": comment}, totp=step_up(totp))
    typer.echo(f"Applied policy {row['id']}: version {row['version']} ({len(row['changes'])} change(s)).")


@policy_app.command("show")
def policy_show(ctx: typer.Context,
                files_dir: Annotated[Path | None, typer.Option("--files", metavar="DIR", help="also write the active policy's files into DIR")] = None,
                force: Annotated[bool, typer.Option("--force", help="with --files: overwrite files that differ")] = False,
                as_json: JsonOpt = False) -> None:
    """The active policy: version, who applied it and when, what it holds."""
    p = connect(ctx).call("GET", "/api/v1/policy")
    if files_dir is not None:
        _write_files(files_dir, p["sources"], force)
    if as_json:
        print_json(p)
        return
    pairs([("policy", f"{p['id']} (version {p['version']})"), ("applied", f"{when(p['applied_at'])} by {p['applied_by']}"),
           ("comment", p["comment"] or "-"), ("files", listed(p["files"])),
           ("contents", _counts({s: p["document"].get(s) or {} for s in SECTIONS}))])
    if files_dir is not None:
        typer.echo(f"Wrote {len(p['sources'])} file(s) to {files_dir}.")


@policy_app.command("history")
def policy_history(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Every applied policy version, newest first."""
    rows = connect(ctx).call("GET", "/api/v1/policy/history")
    if as_json:
        print_json(rows)
    elif rows:
        table(["ID", "VERSION", "APPLIED", "BY", "FILES", "COMMENT"],
              [[r["id"], _short(r["version"]), when(r["applied_at"]), r["applied_by"], len(r["files"]), r["comment"] or "-"]
               for r in rows])
    else:
        typer.echo("No policy has been applied yet.")


@policy_app.command("explain")
def policy_explain(ctx: typer.Context,
                   device: Annotated[str, typer.Option("--device", metavar="ASSET", help="the device's asset ID")],
                   task: Annotated[str, typer.Option("--task", metavar="NAME", help="the task (wicket tasks list)")],
                   duration: Annotated[str | None, typer.Option("--for", metavar="DURATION", help="e.g. 30m, 1h30m (default: the task's)")] = None,
                   user: Annotated[str | None, typer.Option("--user", metavar="NAME", help="for someone else (admin, soc, approver)")] = None,
                   source: Annotated[str | None, typer.Option("--source", metavar="ADDR", help="a source address to test (default: yours)")] = None,
                   at: Annotated[str | None, typer.Option("--at", metavar="TIME", help="a time to test, e.g. 2026-06-01T22:30Z (default: now)")] = None,
                   as_json: JsonOpt = False) -> None:
    """What would the policy decide, and why: every check in order. Exit 0 allow, 2 deny. Nothing opens."""
    body: dict[str, Any] = {"device": device, "task": task, "duration": duration, "user": user, "source": source}
    if at:
        body["at"] = instant(at, "--at").isoformat()
    d = connect(ctx).call("POST", "/api/v1/policy/evaluate", body={k: v for k, v in body.items() if v is not None})
    if as_json:
        print_json(d)
    else:
        _show_decision(d)
    if d["outcome"] == "deny":
        raise typer.Exit(EXIT_DENY)


# ---- the active policy's contents ----


@tasks_app.command("list")
def tasks_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Every task: protocols, device types, roles, duration, approval, change window."""
    tasks = connect(ctx).call("GET", "/api/v1/tasks")
    if as_json:
        print_json(tasks)
        return
    if not tasks:
        typer.echo("No tasks.")
        return
    table(["TASK", "PROTOCOLS", "DEVICE TYPES", "ROLES", "DURATION", "APPROVAL", "WINDOW", "TITLE"],
          [[name, listed(t["protocols"]), listed(t["device_types"]), listed(t["roles"]), _duration(t),
            _approval(t), "yes" if t["change_window"] else "-", t["title"]] for name, t in sorted(tasks.items())])


@tasks_app.command("show")
def tasks_show(ctx: typer.Context, name: Annotated[str, typer.Argument(metavar="NAME")], as_json: JsonOpt = False) -> None:
    """One task, in full."""
    t = connect(ctx).call("GET", f"/api/v1/tasks/{segment(name)}")
    if as_json:
        print_json(t)
        return
    ext = t["extensions"]
    extensions = (f"up to {ext['max_count']}, {ext['max_total'] or 'no total limit'}; reasons: {listed(ext['reason_codes'])}"
                  + ("; each needs approval again" if ext["reapproval"] else "")) if ext["max_count"] else "none"
    pairs([("task", name), ("title", t["title"]), ("description", t["description"] or "-"),
           ("protocols", listed(t["protocols"])), ("device types", listed(t["device_types"])), ("roles", listed(t["roles"])),
           ("duration", _duration(t)), ("approval", _approval(t)), ("recording", t["recording"]),
           ("change window", "required" if t["change_window"] else "not required"), ("extensions", extensions)])


def protocols(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The protocol catalogue: the built-in protocols and those the policy adds."""
    rows = connect(ctx).call("GET", "/api/v1/protocols")
    if as_json:
        print_json(rows)
        return
    table(["PROTOCOL", "TRANSPORT", "PORTS", "SECURE", "TITLE"],
          [[name, p["transport"], listed(p["ports"]), "yes" if p["secure"] else "-", p["title"]] for name, p in sorted(rows.items())])


def device_types(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Device types: the protocols engineers may use, and the device's own baseline flows."""
    rows = connect(ctx).call("GET", "/api/v1/device-types")
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("No device types.")
        return
    table(["TYPE", "ACCESS", "BASELINE", "MAX SILENCE", "TITLE"],
          [[name, listed(t["access"]), "; ".join(_flow(f) for f in t["baseline"]) or "-", t["max_silence"] or "-", t["title"]]
           for name, t in sorted(rows.items())])


# ---- helpers ----


def read_policy_files(paths: list[Path]) -> dict[str, tuple[Path, str]]:
    """File name → (path, text) for every file given or found in a directory given (*.yaml, *.yml)."""
    found: dict[str, tuple[Path, str]] = {}
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
            if not inside:
                raise CliError(f"{path}: no *.yaml or *.yml files in this directory", exit_code=EXIT_USAGE)
        elif path.is_file():
            inside = [path]
        else:
            raise CliError(f"{path}: no such file or directory", exit_code=EXIT_USAGE)
        for file in inside:
            if not FILE_NAME.match(file.name):
                raise CliError(f"{file}: name policy files with letters, digits, '.', '-' and '_' only", exit_code=EXIT_USAGE)
            if file.name in found:
                raise CliError(f"{file} and {found[file.name][0]} have the same name: the controller keeps files by name",
                               exit_code=EXIT_USAGE)
            try:
                found[file.name] = (file, file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as exc:
                raise CliError(f"{file}: {getattr(exc, 'strerror', None) or exc}", exit_code=EXIT_USAGE) from None
    return found


def _texts(files: dict[str, tuple[Path, str]]) -> dict[str, str]:
    return {name: text for name, (_path, text) in files.items()}


def _show_changes(out: dict) -> bool:
    """Print a diff answer; True when the files are the active policy already (nothing to do)."""
    if out["version"] == out["active_version"]:
        typer.echo(f"No changes: these files are the active policy ({out['version']}).")
        return True
    typer.echo(f"Policy {out['version']} (active: {out['active_version'] or 'none'})")
    for line in out["changes"]:
        typer.echo(f"  {line}")
    if not out["changes"]:
        typer.echo("  (no entry changes)")
    return False


def _write_files(target: Path, sources: dict[str, str], force: bool) -> None:
    # Names come from the controller: write only names the API itself would accept, so none escapes DIR.
    bad = [n for n in sources if not FILE_NAME.match(n)]
    if bad:
        raise CliError(f"the controller sent unusable file names: {', '.join(map(repr, bad))}")
    differ = [n for n, text in sources.items() if (target / n).exists() and (target / n).read_text(encoding="utf-8") != text]
    if differ and not force:
        raise CliError(f"{target}: {', '.join(sorted(differ))} would be overwritten", exit_code=EXIT_USAGE,
                       hint="--force overwrites them")
    target.mkdir(parents=True, exist_ok=True)
    for name, text in sources.items():
        (target / name).write_text(text, encoding="utf-8")


def _show_decision(d: dict) -> None:
    typer.echo(f"{d['outcome']}: {d['reason']}")
    if d["failed_checks"]:
        typer.echo(f"failed checks: {listed(d['failed_checks'])}")
    if d["outcome"] != "deny":
        if d["approvals_required"]:
            typer.echo(f"approvals required: {d['approvals_required']} ({'; '.join(d['approval_reasons'])})")
        typer.echo(f"duration: {d['duration']}, until {when(d['ends_at'])}; recording: {d['recording']}")
        for a in d["access"]:
            typer.echo(f"access: {a['protocol']} {a['transport']}/{a['port']} to {a['address']}")
    typer.echo(f"policy {d['policy_version']}, evaluated at {when(d['evaluated_at'], seconds=True)} UTC")
    typer.echo("")
    table(["CHECK", "RESULT", "REASON"], [[c["check"], c["result"], c["reason"] or "-"] for c in d["trace"]])


def _counts(sections: dict[str, Any]) -> str:
    return ", ".join(f"{len(entries)} {name.replace('_', ' ')}" for name, entries in sections.items())


def _short(version: str) -> str:
    return version[:19] + "…" if len(version) > 19 else version


def _duration(t: dict) -> str:
    return f"{t['duration']['default']} (max {t['duration']['max']})"


def _approval(t: dict) -> str:
    a = t["approval"]
    return f"{a['approvers']} approver(s)" if a["required"] else "-"


def _flow(f: dict) -> str:
    ports = f"/{listed(f['ports'])}" if f.get("ports") else ""
    return f"{f['protocol']}{ports} → {listed(f['to'])}"

