"""`wicket-controller`: run and set up the controller on its host.

  wicket-controller init --admin NAME [--display-name "…"]   database, keys, first admin (TOTP shown once)
  wicket-controller serve [--host 127.0.0.1] [--port 8443]   the API (behind a TLS-terminating proxy)
  wicket-controller migrate                                  bring the database schema up to date
Settings come from WICKET_* environment variables (docs/controller.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import DomainError
from .settings import SettingsError, load


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wicket-controller", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("init", help="create the database, the keys and the first administrator")
    i.add_argument("--admin", required=True, help="the first administrator's user name")
    i.add_argument("--display-name", default=None)
    i.add_argument("--password-stdin", action="store_true", help="read the admin's password from stdin (else one is generated)")
    s = sub.add_parser("serve", help="run the API")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8443)
    sub.add_parser("migrate", help="bring the database schema up to date")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.umask(0o077)  # the database and keys are the controller's alone
    try:
        settings = load()
        if args.cmd == "init":
            return _init(settings, args)
        if args.cmd == "migrate":
            from .bootstrap import migrate_only

            migrate_only(settings)
            print("database schema is up to date")
            return 0
        return _serve(settings, args)
    except (SettingsError, DomainError) as exc:
        print(f"wicket-controller: {exc}", file=sys.stderr)
        return 2


def _init(settings, args) -> int:
    from .bootstrap import init

    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
    result = init(settings, args.admin, args.display_name or args.admin, password)
    print(f"controller initialised in {settings.data_dir}")
    print(f"  database: {settings.database_url.split('@')[-1]}")
    print(f"  signing key (public): {result.public_signing_key}")
    print(f"  first administrator: {result.admin}")
    if result.password:
        print(f"  password (shown once, change it): {result.password}")
    print("  TOTP enrolment (shown once) — scan the QR code or enter the URI in an authenticator app:")
    print(f"  {result.enrolment.otpauth_uri}")
    print(result.enrolment.qr_text)
    return 0


def _serve(settings, args) -> int:
    import uvicorn

    from .app import create_app

    app = create_app(settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False, proxy_headers=settings.trust_forwarded_for)
    return 0


if __name__ == "__main__":
    sys.exit(main())
