"""`wicket audit …`: the audit chain — export, offline verification, who had access, SIEM sinks.

  wicket audit export --from T --to T [--device X | --session S] -o FILE   a bundle anyone can verify offline
  wicket audit verify BUNDLE [--trust KEY]...      check a bundle without the controller (exit 1 if anything is wrong)
  wicket audit access --device X [--from T] [--to T] [--bundle FILE]        who had access, from the chain
  wicket audit head | keys | check | sinks          the head and its checkpoint; signing keys; check the stored chain; sinks
  wicket audit recording SESSION -o FILE            a session's payload recording (pcap)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .cli_common import EXIT_REFUSED, CliError, JsonOpt, connect, print_json, segment, table, when

audit_app = typer.Typer(help="The audit chain: export, offline verification, access history, SIEM sinks (soc, admin).",
                        no_args_is_help=True, rich_markup_mode=None)

FromOpt = Annotated[str | None, typer.Option("--from", metavar="TIME", help="RFC 3339, e.g. 2026-11-01T00:00:00Z")]
ToOpt = Annotated[str | None, typer.Option("--to", metavar="TIME", help="RFC 3339")]


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")


@audit_app.command("export")
def export(ctx: typer.Context, output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE")],
           since: FromOpt = None, until: ToOpt = None,
           device: Annotated[str | None, typer.Option("--device", metavar="ASSET")] = None,
           session: Annotated[str | None, typer.Option("--session", metavar="ID")] = None,
           force: Annotated[bool, typer.Option("--force", help="overwrite FILE")] = False) -> None:
    """Write a self-contained bundle: records, signed checkpoints, public keys, a signed manifest.
    With --device or --session, other records in the range keep only their hash, so the chain still checks."""
    if output.exists() and not force:
        raise CliError(f"{output} exists: choose another file or --force")
    params = {k: v for k, v in (("from", since), ("to", until), ("device", device), ("session", session)) if v}
    headers = connect(ctx).download("/api/v1/audit/export", str(output), params=params)
    typer.echo(f"Wrote {output}: {headers.get('x-wicket-bundle-records', '?')} records, "
               f"SHA-256 {headers.get('x-wicket-bundle-sha256', '?')}.")
    verified = headers.get("x-wicket-bundle-verified", "")
    if verified.startswith("failed"):
        typer.echo(f"WARNING: the controller's own check of this bundle {verified}. The stored chain is damaged; "
                   "the bundle shows where (wicket audit verify).", err=True)
    typer.echo(f"Check it anywhere with: wicket audit verify {output} --trust KEY_ID   (wicket audit keys shows the key)")


@audit_app.command("verify")
def verify_cmd(bundle_file: Annotated[Path, typer.Argument(metavar="BUNDLE", exists=True, dir_okay=False)],
               trust: Annotated[list[str] | None, typer.Option("--trust", metavar="KEY",
                                                               help="key id or base64 public key the bundle must be signed with")] = None,
               deep: Annotated[bool, typer.Option("--deep", help="also parse every record and check it is canonical (slower)")] = False,
               as_json: JsonOpt = False) -> None:
    """Check a bundle offline: every hash, the numbering, every signature, the checkpoints, the manifest.
    Needs no controller. Names the first bad record. Exit 0 when whole, 1 when anything is wrong."""
    from .audit import verify

    try:
        report = verify.verify_bundle(bundle_file, trust or None, deep=deep)
    except verify.TrustError as exc:
        raise CliError(str(exc)) from None
    if as_json:
        print_json(report.as_dict())
    else:
        typer.echo(report.text())
    if not report.ok:
        raise typer.Exit(EXIT_REFUSED)


@audit_app.command("access")
def access(ctx: typer.Context, device: Annotated[str, typer.Option("--device", metavar="ASSET")],
           since: FromOpt = None, until: ToOpt = None,
           bundle_file: Annotated[Path | None, typer.Option("--bundle", metavar="FILE", exists=True, dir_okay=False,
                                                            help="answer offline from a verified bundle")] = None,
           trust: Annotated[list[str] | None, typer.Option("--trust", metavar="KEY")] = None,
           as_json: JsonOpt = False) -> None:
    """Who had access to a device between two times (NIS2 Art. 23), from the chain's records."""
    if bundle_file is not None:
        from .audit import bundle

        report, rows = bundle.access_from_bundle(bundle_file, device, since, until, trusted_keys=trust or None)
        if not report.ok:
            typer.echo(report.text(), err=True)
            raise CliError("the bundle does not verify: its answer cannot be trusted")
    else:
        params = {k: v for k, v in (("device", device), ("from", since), ("to", until)) if v}
        rows = connect(ctx).call("GET", "/api/v1/audit/access", params=params)
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo(f"Nobody had access to {device} in that window, according to the chain.")
        return
    table(["SESSION", "ENGINEER", "APPROVED BY", "TASK", "OPENED", "ENDED", "WHY", "RECORDS"],
          [[r["session"], r["engineer"] or "-", ", ".join(r["approvers"]) or "-", r["task"] or "-",
            when(r["opened_at"] or r["activated_at"]), when(r["ended_at"]) if r["ended_at"] else "still open",
            r["end_reason"] or "-", _seqs(r["seqs"])] for r in rows])


@audit_app.command("head")
def head(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The chain's newest record and newest signed checkpoint; audit write failures since start."""
    h = connect(ctx).call("GET", "/api/v1/audit/head")
    if as_json:
        print_json(h)
        return
    typer.echo(f"Head: record {h['seq']}, hash {h['hash']}")
    cp = h["checkpoint"]
    typer.echo(f"Checkpoint: {cp['tree_size']} records, signed by {cp['key_id']} at {when(cp['created_at'])}" if cp
               else "Checkpoint: none yet")
    if h["write_failures"]:
        typer.echo(f"AUDIT WRITE FAILURES: {h['write_failures']} (last: {h['last_write_error']}) — actions were refused")


@audit_app.command("keys")
def keys(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The public keys that sign checkpoints and bundles. Keep the key id somewhere wicket cannot change it."""
    rows = connect(ctx).call("GET", "/api/v1/audit/keys")
    if as_json:
        print_json(rows)
        return
    table(["KEY ID", "PUBLIC KEY (ED25519)", "SINCE", "RETIRED"],
          [[k["key_id"], k["public_key"], when(k["created_at"]), when(k["retired_at"]) if k["retired_at"] else "-"] for k in rows])


@audit_app.command("check")
def check(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Check the stored chain in place, on the controller (exit 1 when anything is wrong)."""
    report = connect(ctx).call("GET", "/api/v1/audit/verify")
    if as_json:
        print_json(report)
    else:
        typer.echo(f"{'OK' if report['ok'] else 'BROKEN'}: {report.get('records', '?')} records")
        for p in report.get("problems", [])[:50]:
            typer.echo(f"  problem: {p.get('text', p)}" if isinstance(p, dict) else f"  problem: {p}")
        for w in report.get("warnings", [])[:10]:
            typer.echo(f"  note: {w}")
    if not report["ok"]:
        raise typer.Exit(EXIT_REFUSED)


@audit_app.command("sinks")
def sinks(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """SIEM sinks: how far each is delivered, its lag, its last error."""
    rows = connect(ctx).call("GET", "/api/v1/audit/sinks")
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("No SIEM sinks are configured (docs/siem-export.md).")
        return
    table(["SINK", "STATUS", "KIND", "TARGET", "DELIVERED TO", "LAG", "LAST OK", "LAST ERROR"],
          [[r.get("name"), r.get("status") or "-", r.get("kind") or "-", r.get("target") or "-", r.get("cursor"), _lag(r),
            when(r.get("last_ok_at")) if r.get("last_ok_at") else "-", r.get("last_error") or "-"] for r in rows])


@audit_app.command("recording")
def recording(ctx: typer.Context, session: Annotated[str, typer.Argument(metavar="SESSION")],
              output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE")],
              n: Annotated[int, typer.Option("--n", min=1, help="which recording, when the lane was replaced")] = 1) -> None:
    """Download a session's payload recording (pcap); its SHA-256 is the one in the session's signed evidence."""
    if output.exists():
        raise CliError(f"{output} exists: choose another file")
    headers = connect(ctx).download(f"/api/v1/sessions/{segment(session)}/recording", str(output), params={"n": n})
    typer.echo(f"Wrote {output} (SHA-256 {headers.get('x-wicket-recording-sha256', '?')}). Read it with: tcpdump -nn -r {output}")


def _seqs(seqs: list) -> str:
    seqs = [s for s in seqs if s is not None]
    if not seqs:
        return "-"
    return f"{seqs[0]}…{seqs[-1]} ({len(seqs)})" if len(seqs) > 3 else ", ".join(map(str, seqs))


def _lag(r: dict) -> str:
    records = r.get("lag_records")
    seconds = r.get("lag_seconds")
    if records is None:
        return "-"
    return f"{records} records" + (f", {seconds:.0f} s" if seconds else "")
