"""
The C{zwrm} command.

Each subcommand module in L{COMMAND_MODULES} has C{register(subparsers)}, which adds
its parsers and sets C{func} on each: C{async func(reactor, args)} returning an exit code
(or None for 0).  Raise L{zwrm.cli.client.CliError} for a readable failure.  Add your
module with one line to L{COMMAND_MODULES}.
"""

import argparse
import importlib
import sys

from zwrm.cli.client import EXIT_USAGE, CliError

COMMAND_MODULES = [
    "zwrm.cli.host",
    "zwrm.cli.apps",
    "zwrm.cli.tokens",
    "zwrm.cli.images",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_USAGE, f"zwrm: {message} (see {self.prog} --help)\n")


def build_parser():
    """The argument parser with every command module's subcommands."""
    parser = _Parser(prog="zwrm", description="Operate a zwrm cluster.")
    parser.add_argument(
        "--api-url", help="the control plane's WebSocket URL (default: $ZWRM_API_URL)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


async def _run(reactor, args):
    try:
        code = await args.func(reactor, args)
    except CliError as e:
        sys.stderr.write(f"zwrm: {e.message}\n")
        code = e.code
    except Exception as e:  # a bug: still one line, never a traceback
        sys.stderr.write(f"zwrm: internal error: {e.__class__.__name__}: {e}\n")
        code = 70
    if code:
        raise SystemExit(code)


def main(argv=None):
    """Entry point of the C{zwrm} console script."""
    from twisted.internet import defer, task

    args = build_parser().parse_args(argv)
    task.react(lambda reactor: defer.Deferred.fromCoroutine(_run(reactor, args)))
