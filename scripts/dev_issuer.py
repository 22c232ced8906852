"""Development OIDC issuer: create signing keys and mint bearer tokens for the local stack.

    python scripts/dev_issuer.py init   --dir .state/keys
    python scripts/dev_issuer.py token  --dir .state/keys --sub alice --tenant hospital-a --roles clinician
    python scripts/dev_issuer.py rotate --dir .state/keys --alg ES256
    python scripts/dev_issuer.py jwks   --dir .state/keys

Point the gateway at ``<dir>/jwks.json``. Never use these keys outside development.
The logic lives in ``enclave_common.auth.dev_issuer`` so that tests mint tokens the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from enclave_common.auth.dev_issuer import DEV_AUDIENCE, DEV_ISSUER, SUPPORTED_ALGORITHMS, DevIssuer
from enclave_common.errors import ConfigurationError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dev_issuer.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init", help="create ES256 and RS256 signing keys and jwks.json")
    init.add_argument("--dir", type=Path, required=True)
    init.add_argument("--issuer", default=DEV_ISSUER)
    init.add_argument("--audience", default=DEV_AUDIENCE)
    init.add_argument("--force", action="store_true", help="replace existing keys")

    rotate = commands.add_parser("rotate", help="add a new current key; the old one stays in jwks.json")
    rotate.add_argument("--dir", type=Path, required=True)
    rotate.add_argument("--alg", choices=SUPPORTED_ALGORITHMS, default="ES256")

    jwks = commands.add_parser("jwks", help="print the public JWKS")
    jwks.add_argument("--dir", type=Path, required=True)

    token = commands.add_parser("token", help="print a signed access token")
    token.add_argument("--dir", type=Path, required=True)
    token.add_argument("--sub", required=True, help="subject (user or service account id)")
    token.add_argument("--tenant", required=True, help="tenant (hospital) id")
    token.add_argument("--roles", required=True, help="comma-separated: uploader,clinician,researcher,...")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    token.add_argument("--alg", choices=SUPPORTED_ALGORITHMS, default="ES256")
    token.add_argument("--issuer", default=None, help="override the issuer recorded at init")
    token.add_argument("--audience", default=None, help="override the audience recorded at init")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "init":
            if (args.dir / "keys.json").exists() and not args.force:
                print(
                    f"{args.dir} already holds dev issuer keys; use --force to replace or rotate",
                    file=sys.stderr,
                )
                return 2
            issuer = DevIssuer.generate(issuer=args.issuer, audience=args.audience)
            path = issuer.save(args.dir)
            kids = ", ".join(f"{k.alg}={k.kid}" for k in issuer.keys)
            print(f"wrote {path} (issuer {issuer.issuer}, audience {issuer.audience}; keys {kids})")
        elif args.command == "rotate":
            issuer = DevIssuer.load(args.dir)
            key = issuer.rotate(args.alg)
            issuer.save(args.dir)
            print(f"new current {key.alg} key {key.kid}; {len(issuer.keys)} keys published")
        elif args.command == "jwks":
            print(json.dumps(DevIssuer.load(args.dir).jwks(), indent=2))
        else:
            roles = [r.strip() for r in args.roles.split(",") if r.strip()]
            if args.ttl <= 0:
                print("--ttl must be a positive number of seconds", file=sys.stderr)
                return 2
            issuer = DevIssuer.load(args.dir, issuer=args.issuer, audience=args.audience)
            print(
                issuer.mint(
                    subject=args.sub, tenant=args.tenant, roles=roles, ttl_seconds=args.ttl, alg=args.alg
                )
            )
    except ConfigurationError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
