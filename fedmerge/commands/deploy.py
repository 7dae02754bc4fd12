"""``fedmerge deploy certs`` and ``fedmerge deploy keys``: key material for a real deployment."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedmerge.cli import CommandError


def certs(args: argparse.Namespace) -> int:
    from fedmerge.deploy import CertificateConfig, make_certificates  # cryptography: not on the help path

    config = CertificateConfig(sans=tuple(args.san), days=args.days)
    try:
        files = make_certificates(Path(args.out), config)
    except FileExistsError as exc:
        raise CommandError(str(exc)) from None
    print(f"CA certificate (give to every site): {files.ca_cert}")
    print(f"CA key (keep offline):               {files.ca_key}")
    print(f"SuperLink certificate:               {files.cert}  (SANs: {', '.join(config.all_sans())})")
    print(f"SuperLink key:                       {files.key}")
    return 0


def _key_names(args: argparse.Namespace) -> list[str]:
    if args.names:
        return [n.strip() for n in args.names.split(",") if n.strip()]
    if args.sites < 1:
        raise CommandError(f"--sites must be at least 1, got {args.sites}")
    return [f"{args.prefix}-{i}" for i in range(1, args.sites + 1)]


def keys(args: argparse.Namespace) -> int:
    from fedmerge.deploy import make_node_keys

    try:
        made = make_node_keys(Path(args.out), _key_names(args))
    except FileExistsError as exc:
        raise CommandError(str(exc)) from None
    for key in made:
        print(f"{key.name}: private {key.private_key} (to the site only), public {key.public_key} (to register)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="make TLS certificates and SuperNode keys for a real deployment")
    dsub = p.add_subparsers(dest="deploy_command", required=True, metavar="WHAT")

    c = dsub.add_parser("certs", help="a CA and a SuperLink certificate (SANs: localhost, 127.0.0.1, --san ...)")
    c.add_argument("--out", required=True, help="folder for ca.crt, ca.key, superlink.crt, superlink.key")
    c.add_argument(
        "--san", action="append", default=[], metavar="NAME_OR_IP", help="another host name or IP the sites dial"
    )
    c.add_argument("--days", type=int, default=365, help="validity of the SuperLink certificate")
    c.set_defaults(func=certs)

    k = dsub.add_parser("keys", help="SuperNode authentication key pairs (ECDSA P-384, OpenSSH format)")
    k.add_argument("--out", required=True, help="folder for <name>.key (private, 0600) and <name>.pub")
    which = k.add_mutually_exclusive_group(required=True)
    which.add_argument("--sites", type=int, help="make N pairs named <prefix>-1 ... <prefix>-N")
    which.add_argument("--names", help="comma list of pair names instead, e.g. fog,night,rain")
    k.add_argument("--prefix", default="site", help="name prefix with --sites")
    k.set_defaults(func=keys)
