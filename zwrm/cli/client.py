"""
The CLI's connection to the control plane.

Where things come from, first hit wins:

 - URL: C{--api-url}, C{$ZWRM_API_URL}, C{api_url} in C{~/.zwrm/config.toml},
   C{ws://127.0.0.1:8080/ws}.
 - token: C{$ZWRM_TOKEN}, C{token} (or C{token_file}) in C{~/.zwrm/config.toml}.
 - authid: C{$ZWRM_AUTHID}, C{authid} in the file, C{operator}.
 - CA for C{wss://}: C{$ZWRM_CA_FILE}, C{ca_file} in the file, the platform's.

Every failure is a L{CliError}: one readable line and an exit code.
"""

import os
import tomllib

from autobahn.twisted.wamp import ApplicationSession
from autobahn.twisted.websocket import WampWebSocketClientFactory
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.serializer import JsonSerializer
from autobahn.wamp.types import ComponentConfig
from autobahn.websocket.util import parse_url
from twisted.internet import defer, error

DEFAULT_URL = "ws://127.0.0.1:8080/ws"
EXIT_REMOTE = 1
"""The control plane answered with a zwrm.error.* (not found, conflict, ...)."""
EXIT_USAGE = 2
"""Bad arguments, bad URL, missing token or bad config file."""
EXIT_UNREACHABLE = 3
"""The control plane could not be reached."""
EXIT_AUTH = 4
"""The control plane rejected the token."""


class CliError(Exception):
    """
    A failure to report as one line.

    @ivar message: the line.
    @ivar code: the exit code.
    """

    def __init__(self, message, code=EXIT_REMOTE):
        Exception.__init__(self, message)
        self.message = message
        self.code = code


def config_path():
    """C{~/.zwrm/config.toml}."""
    return os.path.join(os.path.expanduser("~"), ".zwrm", "config.toml")


def load_settings(api_url=None, environ=None, path=None):
    """
    The connection settings: C{{"url", "token", "authid", "ca_file"}}.

    @raise CliError: for an unreadable config file or no token.
    """
    environ = os.environ if environ is None else environ
    path = path or config_path()
    data = {}
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise CliError(f"cannot read {path}: {e}", EXIT_USAGE) from None
    token = environ.get("ZWRM_TOKEN") or data.get("token")
    if not token and data.get("token_file"):
        try:
            with open(os.path.expanduser(data["token_file"])) as f:
                token = f.read().strip()
        except OSError as e:
            raise CliError(f"cannot read token file {data['token_file']}: {e.strerror}", EXIT_USAGE) from None
    if not token:
        raise CliError(
            f"no token: set ZWRM_TOKEN or token = \"...\" in {path}", EXIT_USAGE
        )
    return {
        "url": api_url or environ.get("ZWRM_API_URL") or data.get("api_url") or DEFAULT_URL,
        "token": token.strip(),
        "authid": environ.get("ZWRM_AUTHID") or data.get("authid") or "operator",
        "ca_file": environ.get("ZWRM_CA_FILE") or data.get("ca_file"),
    }


class _Session(ApplicationSession):
    def __init__(self, authid, ticket):
        ApplicationSession.__init__(self, ComponentConfig(realm="zwrm"))
        self._authid = authid
        self._ticket = ticket
        self.joined = defer.Deferred()
        self.ended = defer.Deferred()
        self._leave = None

    def onConnect(self):
        self.join("zwrm", authmethods=["ticket"], authid=self._authid)

    def onChallenge(self, challenge):
        return self._ticket

    def onJoin(self, details):
        self.joined.callback(self)

    def onLeave(self, details):
        self._leave = details
        self.disconnect()

    def onDisconnect(self):
        if not self.joined.called:
            d = self._leave
            if d is not None and d.reason == "wamp.error.authentication_failed":
                exc = CliError(f"the control plane rejected the token: {d.message}", EXIT_AUTH)
            elif d is not None:
                exc = CliError(f"the control plane refused the session: {d.reason}: {d.message}",
                               EXIT_UNREACHABLE)
            else:
                exc = CliError("the control plane closed the connection", EXIT_UNREACHABLE)
            self.joined.errback(exc)
        if not self.ended.called:
            self.ended.callback(None)


async def connect(reactor, settings, timeout=10):
    """
    A joined WAMP session to the control plane.

    @param settings: from L{load_settings}.
    @raise CliError: bad URL, unreachable, rejected token.
    """
    from zwrm.agent.service import client_endpoint

    url = settings["url"]
    try:
        parse_url(url)
    except Exception as e:
        raise CliError(f"bad API URL {url!r}: {e}", EXIT_USAGE) from None
    session = _Session(settings["authid"], settings["token"])
    factory = WampWebSocketClientFactory(
        lambda: session, url=url, serializers=[JsonSerializer()], reactor=reactor
    )
    factory.noisy = False
    try:
        endpoint = client_endpoint(reactor, url, settings.get("ca_file"), timeout=timeout)
        await endpoint.connect(factory)
    except error.ConnectionRefusedError:
        raise CliError(f"cannot reach the control plane at {url}: connection refused",
                       EXIT_UNREACHABLE) from None
    except error.DNSLookupError:
        raise CliError(f"cannot reach the control plane at {url}: unknown host",
                       EXIT_UNREACHABLE) from None
    except (error.ConnectError, OSError) as e:
        raise CliError(f"cannot reach the control plane at {url}: {e}", EXIT_UNREACHABLE) from None
    timer = reactor.callLater(timeout, lambda: session.joined.called or session.joined.errback(
        CliError(f"the control plane at {url} did not answer in {timeout}s", EXIT_UNREACHABLE)))
    try:
        await session.joined
    finally:
        if timer.active():
            timer.cancel()
    return session


async def call(session, procedure, *args, **kwargs):
    """
    Call C{procedure}; a WAMP error becomes a L{CliError} with its readable message.
    """
    try:
        return await session.call(procedure, *args, **kwargs)
    except ApplicationError as e:
        text = e.args[0] if e.args else e.error
        if e.error == "wamp.error.not_authorized":
            raise CliError(f"not allowed: {text}", EXIT_AUTH) from None
        if e.error == "wamp.error.no_such_procedure":
            raise CliError(f"the control plane does not offer {procedure}", EXIT_REMOTE) from None
        raise CliError(str(text), EXIT_REMOTE) from None


async def close(session):
    """Leave and wait (briefly) for the connection to end."""
    if session.is_attached():
        session.leave()
        await session.ended
