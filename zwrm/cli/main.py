"""
The C{zwrm} command.

Each subcommand module in L{COMMAND_MODULES} has C{register(subparsers)}, which adds
its parsers and sets C{func} on each: C{async func(reactor, args)} returning an exit code
(or None for 0).  Raise L{zwrm.cli.client.CliError} for a readable failure.  Add your
module with one line to L{COMMAND_MODULES}.

Every command ends within its timeout (C{--timeout}, C{timeout} in the configuration,
L{zwrm.cli.client.DEFAULT_TIMEOUT}): a command that waits on purpose extends it (see
L{budget}).
"""

import argparse
import importlib
import math
import os
import sys

from twisted.internet import defer

from zwrm.cli import client
from zwrm.cli.client import (
    EXIT_CODES,
    EXIT_INTERNAL,
    EXIT_PIPE,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    CliError,
)

COMMAND_MODULES = [
    "zwrm.cli.host",
    "zwrm.cli.apps",
    "zwrm.cli.tokens",
    "zwrm.cli.images",
    "zwrm.cli.console",
    "zwrm.cli.certs",
    "zwrm.cli.events",
    "zwrm.cli.audit",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_USAGE, f"zwrm: {message} (see {self.prog} --help)\n")


def build_parser():
    """The argument parser with every command module's subcommands."""
    parser = _Parser(
        prog="zwrm", description="Operate a zwrm cluster.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--api-url", metavar="URL",
        help="the control plane: https://HOST:PORT (or http://, wss://, ws://);"
             " default $ZWRM_API_URL, then url in the configuration")
    parser.add_argument(
        "--timeout", type=_seconds, metavar="SECONDS",
        help="give up after this long (default $ZWRM_TIMEOUT, then timeout in the"
             f" configuration, then {client.DEFAULT_TIMEOUT:g}); --wait extends it")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def parse_args(parser, argv):
    """
    C{parser.parse_args(argv)}, but an argument no command takes is a usage error of the
    command it was given to, pointing at that command's help (C{zwrm events --help}), not
    at C{zwrm --help}, which does not list it.
    """
    args, extra = parser.parse_known_args(argv)
    if extra:
        given_to = argv[:argv.index(extra[0])] if extra[0] in argv else argv
        _command_parser(parser, given_to).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _command_parser(parser, argv):
    """The parser of the deepest (sub)command that C{argv} names (C{parser} if none)."""
    for token in argv:
        [commands] = [a for a in parser._actions
                      if isinstance(a, argparse._SubParsersAction)] or [None]
        if commands is None:
            break
        parser = commands.choices.get(token, parser)
    return parser


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < math.inf:  # (nan and inf too)
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return value


def _following(args):
    """Whether the command follows progress until the control plane says it ended."""
    name = getattr(args.func, "__name__", "")
    if name == "host_drain":
        return not (getattr(args, "detach", False) or getattr(args, "dry_run", False))
    if name == "host_drain_status":
        return bool(getattr(args, "watch", False))
    if name == "console" or (name == "logs" and getattr(args, "follow", False)):
        return True  # until detached, or the console closes
    if name == "events":
        return bool(getattr(args, "follow", False))  # until interrupted
    if name == "deploy":  # a rolling update: until it ends (zwrm.cli.apps.deploy_following)
        return not getattr(args, "plan", False)
    return getattr(args, "images_command", None) == "push"


def budget(args, timeout):
    """
    How long the whole command may take: C{timeout} (and a second), plus C{--wait} for a command that waits
    (C{zwrm deploy --wait}); L{None} (no overall limit) for one that follows progress until
    the control plane says it ended (C{host drain} without C{--detach}, C{host drain-status
    --watch}, C{images push}): each of their requests is still bounded by C{timeout} and a
    lost connection still ends them (exit 3).
    """
    if _following(args):
        return None
    # plus a second, so that a single request's own limit (a more precise message) comes first
    return timeout + (getattr(args, "wait", 0) or 0) + 1


async def _run(reactor, args):
    # a request may take the timeout plus what the command waits on purpose (deploy --wait)
    client.set_flags(timeout=getattr(args, "timeout", None), extra=getattr(args, "wait", None))
    limit = budget(args, client.configured_timeout())
    d = defer.Deferred.fromCoroutine(args.func(reactor, args))
    expired = []

    def expire():
        expired.append(True)
        d.cancel()

    timer = reactor.callLater(limit, expire) if limit else None
    # Interrupted (Ctrl-C, SIGTERM): the reactor's shutdown closes the connection, and the
    # command's "lost the connection" is then no news to the one who interrupted it.
    interrupted = []
    trigger = reactor.addSystemEventTrigger("before", "shutdown", interrupted.append, True)
    try:
        code = await d
    except CliError as e:
        if not interrupted:
            sys.stderr.write(f"zwrm: {e.message}\n")
        code = e.code
    except defer.CancelledError:
        if not expired:
            raise
        sys.stderr.write(f"zwrm: no answer within {limit:g} s (--timeout)\n")
        code = EXIT_TIMEOUT
    except BrokenPipeError:
        code = _output_closed()
    except Exception as e:  # a bug: still one line, never a traceback
        sys.stderr.write(f"zwrm: internal error: {e.__class__.__name__}: {e}\n")
        code = EXIT_INTERNAL
    finally:
        if timer is not None and timer.active():
            timer.cancel()
        if not interrupted:  # (once fired, the reactor has let go of it)
            reactor.removeSystemEventTrigger(trigger)
    if code:
        raise SystemExit(code)


EPILOG = "configuration: /etc/zwrm/cli.toml, then ~/.zwrm/config.toml (or $ZWRM_CONFIG):\n" \
    "  url = \"https://HOST:PORT\", ca_file = \"PATH\", token_file = \"PATH\", timeout = SECONDS\n" \
    "\nexit codes:\n" + "".join(f"  {code:<3} {text}\n" for code, text in EXIT_CODES)


def _output_closed():
    """
    Its reader closed stdout early (C{zwrm host list | head}): nothing is wrong but that;
    no message, and nothing more written there (not even at the interpreter's exit).

    @return: L{EXIT_PIPE}.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError):
        pass
    return EXIT_PIPE


def main(argv=None):
    """Entry point of the C{zwrm} console script."""
    from twisted.internet import task

    args = parse_args(build_parser(), sys.argv[1:] if argv is None else argv)
    task.react(lambda reactor: defer.Deferred.fromCoroutine(_run(reactor, args)))
