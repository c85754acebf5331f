"""
C{python -m zwrm.pki}: create the control plane's CA and server certificate, or print the CA's
fingerprint (used by install.sh).
"""

from zwrm.errors import InvalidArgument
from zwrm.pki.ca import CertificateAuthority


def main(argv=None, out=None):
    """
    C{python -m zwrm.pki init DIR NAME...}: create (or load) the CA in DIR and a server
    certificate for the NAMEs (DNS names or IP addresses); print the CA fingerprint.
    C{python -m zwrm.pki fingerprint DIR}: print the CA fingerprint.

    Errors are one line on stderr and exit status 1 (usage: 2).
    """
    import argparse
    import sys

    out = out or sys.stdout
    parser = argparse.ArgumentParser(prog="python -m zwrm.pki", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create the CA and a server certificate")
    init.add_argument("directory")
    init.add_argument("names", nargs="+", metavar="NAME")
    show = sub.add_parser("fingerprint", help="print the CA's fingerprint")
    show.add_argument("directory")
    args = parser.parse_args(argv)
    try:
        if args.command == "init":
            ca = CertificateAuthority.load_or_create(args.directory)
            ca.server_credentials(args.names)
        else:
            ca = CertificateAuthority.load(args.directory)
    except (InvalidArgument, OSError) as e:
        print(f"zwrm.pki: {getattr(e, 'message', None) or e}", file=sys.stderr)
        return 1
    print(ca.fingerprint, file=out)
    return 0
