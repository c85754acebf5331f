"""
The CLI's connection to the control plane.

Configuration files (TOML, top-level keys): C{/etc/zwrm/cli.toml}, then
C{~/.zwrm/config.toml} (a key in the user's file wins); C{$ZWRM_CONFIG} names one file to
read instead of both.  Keys:

 - C{url}: the control plane, C{https://host:port} (meaning C{wss://host:port/ws}),
   C{http://host:port} (C{ws://host:port/ws}), or a C{wss://} / C{ws://} URL (a URL
   without a path gets C{/ws}).  C{api_url} is an older name for it.
 - C{ca_file}: PEM file of the CA to trust for C{https://} / C{wss://} (default: the
   platform's trust store).
 - C{token_file}: path of a file holding the operator token; or C{token}: the token itself.
 - C{authid}: default C{operator}.
 - C{timeout}: seconds a command may take (L{DEFAULT_TIMEOUT}).

Where each setting comes from, first hit wins: the flag (C{--api-url}, C{--timeout}), the
environment (C{$ZWRM_API_URL}, C{$ZWRM_TOKEN}, C{$ZWRM_CA_FILE}, C{$ZWRM_AUTHID},
C{$ZWRM_TIMEOUT}), the user's file, the system file, the default
(C{ws://127.0.0.1:8080/ws}).

Every failure is a L{CliError}: one readable line and an exit code (the C{EXIT_*}
constants; docs/operators.md lists them).  A connection that drops fails every call in
flight at once (L{EXIT_UNREACHABLE}); every call is bounded by the timeout
(L{EXIT_TIMEOUT}).
"""

import argparse
import json
import math
import os
import sys
import tomllib
from urllib.parse import urlsplit, urlunsplit

from autobahn.twisted.wamp import ApplicationSession
from autobahn.twisted.websocket import WampWebSocketClientFactory, WampWebSocketClientProtocol
from autobahn.wamp.exception import ApplicationError, TransportLost
from autobahn.wamp.serializer import JsonSerializer
from autobahn.wamp.types import CallOptions, ComponentConfig
from autobahn.websocket.util import parse_url
from twisted.internet import defer, error

from zwrm.endpoints import client_endpoint, connect_error_text, tls_error_text

DEFAULT_URL = "ws://127.0.0.1:8080/ws"
DEFAULT_TIMEOUT = 120.0
"""Seconds a command (and each of its requests) may take unless C{--timeout} / C{timeout}
say otherwise: long enough for a deploy that pulls a large image to its hosts."""
CONNECT_TIMEOUT = 30.0
"""At most this long (or the timeout, if shorter) to connect, shake hands and join."""
SYSTEM_CONFIG = "/etc/zwrm/cli.toml"

EXIT_REMOTE = 1
"""The control plane answered with a zwrm.error.* (not found, conflict, ...)."""
EXIT_USAGE = 2
"""Bad arguments."""
EXIT_UNREACHABLE = 3
"""The control plane could not be reached (refused, unknown host), or the connection
dropped while the command ran."""
EXIT_AUTH = 4
"""The control plane rejected the token, or the operator may not do this."""
EXIT_CONFIG = 5
"""A configuration, CA or token file is missing, unreadable or malformed; or no token."""
EXIT_URL = 6
"""The control plane URL is malformed or has a scheme other than https, http, wss, ws."""
EXIT_TLS = 7
"""The control plane's certificate is not trusted (or the TLS handshake failed)."""
EXIT_TIMEOUT = 8
"""The command did not finish within its timeout."""
EXIT_INTERNAL = 70
"""A bug in zwrm (still one line, never a traceback)."""
EXIT_PIPE = 141
"""Its output was closed before it was all written (C{zwrm ... | head}): silent, as a
command killed by SIGPIPE (128 + 13)."""

EXIT_CODES = [
    (0, "success"),
    (EXIT_REMOTE, "the control plane refused the request (not found, conflict, ...)"),
    (EXIT_USAGE, "bad arguments"),
    (EXIT_UNREACHABLE, "cannot reach the control plane, or the connection dropped"),
    (EXIT_AUTH, "token rejected or not allowed"),
    (EXIT_CONFIG, "a configuration, CA or token file is missing or unreadable; no token"),
    (EXIT_URL, "bad control plane URL (use https://, http://, wss:// or ws://)"),
    (EXIT_TLS, "the control plane's certificate is not trusted"),
    (EXIT_TIMEOUT, "no answer within the timeout (--timeout)"),
    (EXIT_INTERNAL, "internal error (a bug: please report it)"),
    (EXIT_PIPE, "its output was closed before it was all written (e.g. | head)"),
]

_SCHEMES = {"https": "wss", "http": "ws", "wss": "wss", "ws": "ws"}
_KEYS = ("url", "api_url", "ca_file", "token", "token_file", "authid", "timeout")

# set by the zwrm command from its flags (zwrm.cli.main), read by load_settings
_flags = {}


def set_flags(**flags):
    """Settings from the C{zwrm} command's global flags (e.g. C{timeout}); they win."""
    _flags.clear()
    _flags.update({k: v for k, v in flags.items() if v is not None})


def _extra():
    """Seconds the command adds to the timeout (C{deploy --wait}), from L{set_flags}."""
    return float(_flags.get("extra") or 0)


def print_json(value, out):
    """
    Write C{value} to C{out} as every command's C{--json} does: indented, keys sorted, one
    line ending.

    @return: 0, the exit code of a command that printed it.
    """
    json.dump(value, out, indent=2, sort_keys=True)
    out.write("\n")
    return 0


def seconds_arg(text):
    """
    An argparse type: seconds, 0 or more (at most ten years; not nan or inf).

    @raise argparse.ArgumentTypeError: for anything else.
    """
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0 <= v <= 10 * 365 * 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not seconds (0 or more)")
    return v


def count_arg(noun, low, high):
    """
    An argparse type: a whole number of C{noun} from C{low} to C{high}.

    @return: the function that checks one argument (and raises
        L{argparse.ArgumentTypeError} with one readable line).
    """
    def count(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {noun}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r}: give {low} to {high}")
        return value

    return count


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


class NotOffered(CliError):
    """The control plane has no such procedure (e.g. one older than this CLI)."""


def config_path():
    """C{~/.zwrm/config.toml}."""
    return os.path.join(os.path.expanduser("~"), ".zwrm", "config.toml")


def config_paths(environ=None):
    """The configuration files to read, system first: C{$ZWRM_CONFIG} or the two defaults."""
    environ = os.environ if environ is None else environ
    if environ.get("ZWRM_CONFIG"):
        return [environ["ZWRM_CONFIG"]]
    return [SYSTEM_CONFIG, config_path()]


def _read_config(path, required):
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if required:
            raise CliError(f"configuration file {path} ($ZWRM_CONFIG) does not exist",
                           EXIT_CONFIG) from None
        return {}
    except OSError as e:
        raise CliError(f"cannot read configuration file {path}: {e.strerror}", EXIT_CONFIG) from None
    except tomllib.TOMLDecodeError as e:
        raise CliError(f"configuration file {path} is not valid TOML: {e}", EXIT_CONFIG) from None
    for key, value in data.items():
        if key not in _KEYS:
            raise CliError(f"{path}: unknown setting {key!r} (known: url, ca_file, token_file,"
                           " token, authid, timeout)", EXIT_CONFIG)
        if key == "timeout":
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise CliError(f"{path}: timeout must be a positive number of seconds",
                               EXIT_CONFIG)
        elif not isinstance(value, str) or not value.strip():
            raise CliError(f"{path}: {key} must be a non-empty string", EXIT_CONFIG)
    return data


def _layered(paths, required):
    """
    The settings of the files in C{paths}, a later file's key winning, each with where it
    came from: C{{key: (value, "set in <path>")}}.  C{token} and C{token_file} go together:
    a file that sets either replaces both.
    """
    merged = {}
    for path in paths:
        data = _read_config(path, required)
        if "token" in data or "token_file" in data:
            merged.pop("token", None)
            merged.pop("token_file", None)
        if "api_url" in data and "url" not in data:
            data["url"] = data.pop("api_url")
        data.pop("api_url", None)
        for key, value in data.items():
            merged[key] = (value, f"set in {path}")
    return merged


def normalize_url(url):
    """
    The WebSocket URL for what an operator may write: C{https://h:p} -> C{wss://h:p/ws},
    C{http://h:p} -> C{ws://h:p/ws}; C{wss://} and C{ws://} stay; an empty path becomes
    C{/ws}.

    @raise CliError: (L{EXIT_URL}) for another scheme or a malformed URL.
    """
    text = str(url).strip()
    parts = urlsplit(text)
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        given = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise CliError(f"control plane URL {text!r} has {given}: use https://HOST:PORT"
                       " (or http://, wss://, ws://)", EXIT_URL)
    if not parts.hostname:
        raise CliError(f"control plane URL {text!r} has no host", EXIT_URL)
    try:
        parts.port  # noqa: B018 -- raises for a bad port
    except ValueError:
        raise CliError(f"control plane URL {text!r} has a bad port", EXIT_URL) from None
    path = parts.path if parts.path not in ("", "/") else "/ws"
    result = urlunsplit((scheme, parts.netloc, path, parts.query, ""))
    try:
        parse_url(result)
    except Exception as e:
        raise CliError(f"control plane URL {text!r}: {e}", EXIT_URL) from None
    return result


def _read_file(path, setting, origin, what):
    path = os.path.expanduser(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CliError(f"{what} {path} ({setting}, {origin}) does not exist", EXIT_CONFIG) from None
    except IsADirectoryError:
        raise CliError(f"{what} {path} ({setting}, {origin}) is a directory", EXIT_CONFIG) from None
    except OSError as e:
        raise CliError(f"cannot read {what} {path} ({setting}, {origin}): {e.strerror}",
                       EXIT_CONFIG) from None


def load_settings(api_url=None, environ=None, path=None):
    """
    The connection settings: C{{"url", "token", "authid", "ca_file", "ca_pem", "timeout"}}
    (C{url} normalized by L{normalize_url}; C{ca_pem} the bytes of C{ca_file}, read and
    checked here for a secure URL).

    @param path: read only this configuration file (tests); default L{config_paths}.
    @raise CliError: for a bad or unreadable configuration, CA or token file, a bad URL,
        or no token.
    """
    environ = os.environ if environ is None else environ
    if path is not None:
        files = _layered([path], required=False)
    else:
        files = _layered(config_paths(environ), required=bool(environ.get("ZWRM_CONFIG")))
    where = " or ".join(config_paths(environ)) if path is None else path

    def pick(flag, env, key, default=None):
        if flag is not None:
            return flag, "from the command line"
        if env and environ.get(env):
            return environ[env], f"from ${env}"
        if key in files:
            return files[key]
        return default, "the default"

    url, _ = pick(api_url, "ZWRM_API_URL", "url", DEFAULT_URL)
    url = normalize_url(url)

    if environ.get("ZWRM_TOKEN"):
        token = environ["ZWRM_TOKEN"]
    elif "token" in files:
        token = files["token"][0]
    elif "token_file" in files:
        token_file, origin = files["token_file"]
        token = _read_file(token_file, "token_file", origin, "token file").decode(
            "utf-8", "replace")
        if not token.strip():
            raise CliError(f"token file {token_file} (token_file, {origin}) is empty", EXIT_CONFIG)
    else:
        raise CliError(f"no token: set ZWRM_TOKEN, or token_file = \"...\" in {where}",
                       EXIT_CONFIG)

    timeout, origin = pick(_flags.get("timeout"), "ZWRM_TIMEOUT", "timeout", DEFAULT_TIMEOUT)
    try:
        timeout = float(timeout)
        if not 0 < timeout < math.inf:  # (nan and inf too)
            raise ValueError(timeout)
    except ValueError:
        raise CliError(f"timeout {timeout!r} ({origin}) must be a positive number of seconds",
                       EXIT_CONFIG) from None

    ca_file, ca_origin = pick(None, "ZWRM_CA_FILE", "ca_file")
    ca_pem = None
    if ca_file and url.startswith("wss:"):
        ca_file = os.path.expanduser(ca_file)
        ca_pem = _read_file(ca_file, "ca_file", ca_origin, "CA file")
        from twisted.internet import ssl

        try:
            ssl.Certificate.loadPEM(ca_pem)
        except Exception:
            raise CliError(f"CA file {ca_file} (ca_file, {ca_origin}) is not a PEM certificate",
                           EXIT_CONFIG) from None
    return {
        "url": url,
        "token": token.strip(),
        "authid": environ.get("ZWRM_AUTHID") or files.get("authid", ("operator",))[0],
        "ca_file": ca_file or None,
        "ca_pem": ca_pem,
        "timeout": timeout + _extra(),
    }


def configured_timeout(environ=None):
    """
    The command timeout from the flag, environment or configuration files, without
    reading anything else (L{DEFAULT_TIMEOUT} if none, or if they are unreadable: the
    command itself then reports that).
    """
    environ = os.environ if environ is None else environ
    try:
        if _flags.get("timeout") is not None:
            value = float(_flags["timeout"])
        elif environ.get("ZWRM_TIMEOUT"):
            value = float(environ["ZWRM_TIMEOUT"])
        else:
            files = _layered(config_paths(environ), required=False)
            value = float(files.get("timeout", (DEFAULT_TIMEOUT,))[0])
    except (CliError, ValueError, TypeError):
        return DEFAULT_TIMEOUT
    return value if 0 < value < math.inf else DEFAULT_TIMEOUT


def _describe_lost(url, ca_file, reason):
    """The L{CliError} for a connection lost before the session joined."""
    from OpenSSL import SSL

    value = getattr(reason, "value", None)
    trust = f"ca_file={ca_file}" if ca_file else "no ca_file: the platform's trust store"
    if isinstance(value, SSL.Error):
        text = tls_error_text(value)
        if "certificate verify failed" in text:
            return CliError(f"the control plane's certificate is not trusted: {text} ({trust})",
                            EXIT_TLS)
        return CliError(f"TLS with the control plane at {url} failed: {text or 'no handshake'}"
                        " (is it a TLS listener? for a plain one use http://)", EXIT_TLS)
    if value is not None and value.__class__.__name__ == "VerificationError":
        return CliError(f"the control plane's certificate is not trusted: it is not for"
                        f" {urlsplit(url).hostname} ({trust})", EXIT_TLS)
    why = f": {value}" if value is not None and str(value) else ""
    clean = isinstance(value, error.ConnectionDone)  # as a TLS listener closes on plain text
    hint = " (if it is a TLS listener, use https://)" if clean and url.startswith("ws:") else ""
    return CliError(f"the control plane at {url} closed the connection{why}{hint}",
                    EXIT_UNREACHABLE)


class _Protocol(WampWebSocketClientProtocol):
    """Keeps why the connection ended (a TLS failure shows only here)."""

    def connectionLost(self, reason):
        session = self.factory._zwrm_session
        if session is not None and session.lost_reason is None:
            session.lost_reason = reason
        WampWebSocketClientProtocol.connectionLost(self, reason)
        if session is not None:
            # lost before the WebSocket opened (TLS, HTTP): autobahn tells no session
            session.connection_lost()


class _Session(ApplicationSession):
    """
    The CLI's session: joins with a ticket; when the connection ends, every pending call
    fails with a L{CliError} (L{EXIT_UNREACHABLE}) and C{ended} fires.
    """

    def __init__(self, authid, ticket, reactor=None, url=None, ca_file=None, timeout=None):
        ApplicationSession.__init__(self, ComponentConfig(realm="zwrm"))
        self._authid = authid
        self._ticket = ticket
        self.reactor = reactor
        self.url = url
        self.ca_file = ca_file
        self.timeout = timeout
        self.joined = defer.Deferred()
        self.ended = defer.Deferred()
        self.lost_reason = None
        self._leave = None

    def onConnect(self):
        self.join("zwrm", authmethods=["ticket"], authid=self._authid)

    def onChallenge(self, challenge):
        return self._ticket

    def onJoin(self, details):
        self.joined.callback(self)

    def _lost(self):
        d = self._leave
        if d is not None and d.reason not in ("wamp.close.transport_lost", "wamp.close.normal",
                                               "wamp.close.goodbye_and_out"):
            return CliError(f"the control plane ended the session: {d.reason}: {d.message}",
                            EXIT_UNREACHABLE)
        return CliError(f"lost the connection to the control plane at {self.url}",
                        EXIT_UNREACHABLE)

    def onLeave(self, details):
        # autobahn's onLeave fails the pending calls; do so with a readable error
        self._leave = details
        if self.joined.called:
            self._errback_outstanding_requests(self._lost())
        self.disconnect()

    def onDisconnect(self):
        if not self.joined.called:
            d = self._leave
            if d is not None and d.reason == "wamp.error.authentication_failed":
                exc = CliError(f"the control plane rejected the token: {d.message}", EXIT_AUTH)
            elif d is not None and d.reason != "wamp.close.transport_lost":
                exc = CliError(f"the control plane refused the session: {d.reason}: {d.message}",
                               EXIT_UNREACHABLE)
            else:
                exc = _describe_lost(self.url, self.ca_file, self.lost_reason)
            self.joined.errback(exc)
        else:
            self._errback_outstanding_requests(self._lost())
        if not self.ended.called:
            self.ended.callback(None)

    def connection_lost(self):
        """The connection is gone, whether or not autobahn told this session."""
        if not self.joined.called:
            self.joined.errback(_describe_lost(self.url, self.ca_file, self.lost_reason))
        if not self.ended.called:
            self.ended.callback(None)

    def abort(self):
        """Drop the connection now (no goodbye)."""
        proto = self._transport
        transport = getattr(proto, "transport", None)
        if transport is not None:
            transport.abortConnection()


async def connect(reactor, settings, timeout=None):
    """
    A joined WAMP session to the control plane.

    @param settings: from L{load_settings} (or a dict with at least C{url}, C{token},
        C{authid}).
    @param timeout: seconds to connect and join (default: C{settings["timeout"]}, at most
        L{CONNECT_TIMEOUT}); each call on the session is bounded by C{settings["timeout"]}.
    @raise CliError: bad URL, unreachable, untrusted certificate, rejected token, timeout.
    """
    url = normalize_url(settings["url"])
    call_timeout = settings.get("timeout") or DEFAULT_TIMEOUT
    timeout = timeout or min(call_timeout, CONNECT_TIMEOUT)
    ca_file = settings.get("ca_file")
    ca_pem = settings.get("ca_pem")
    if ca_file and ca_pem is None and url.startswith("wss:"):
        ca_pem = _read_file(ca_file, "ca_file", "given", "CA file")
    session = _Session(settings["authid"], settings["token"], reactor, url, ca_file, call_timeout)
    factory = WampWebSocketClientFactory(
        lambda: session, url=url, serializers=[JsonSerializer()], reactor=reactor
    )
    factory.protocol = _Protocol
    factory._zwrm_session = session
    factory.noisy = False
    # our own timer (below) reports a handshake that does not finish; autobahn's only after
    factory.setProtocolOptions(openHandshakeTimeout=timeout + 5)
    try:
        await client_endpoint(reactor, url, timeout=timeout, ca_pem=ca_pem).connect(factory)
    except error.ConnectionRefusedError:
        raise CliError(f"cannot reach the control plane at {url}: connection refused",
                       EXIT_UNREACHABLE) from None
    except error.DNSLookupError:
        raise CliError(f"cannot reach the control plane at {url}: cannot resolve its host name",
                       EXIT_UNREACHABLE) from None
    except error.TimeoutError:
        raise CliError(f"cannot reach the control plane at {url}: no connection within"
                       f" {timeout:g} s", EXIT_TIMEOUT) from None
    except (error.ConnectError, OSError) as e:
        raise CliError(f"cannot reach the control plane at {url}: {connect_error_text(e)}",
                       EXIT_UNREACHABLE) from None

    def expire():
        if not session.joined.called:
            session.joined.errback(CliError(
                f"the control plane at {url} did not answer within {timeout:g} s", EXIT_TIMEOUT))
            session.abort()

    timer = reactor.callLater(timeout, expire)
    try:
        await session.joined
    except BaseException:
        session.abort()
        raise
    finally:
        if timer.active():
            timer.cancel()
    return session


async def call(session, procedure, *args, on_progress=None, **kwargs):
    """
    Call C{procedure}; a WAMP error becomes a L{CliError} with its readable message; a lost
    connection one with L{EXIT_UNREACHABLE}; no answer within the session's timeout one with
    L{EXIT_TIMEOUT}.

    @param on_progress: L{None}, or C{on_progress(dict)}: the call asks for progressive
        results (L{zwrm.wamp.progress}: the control plane sends one at least every 10 s
        while the work goes on) and each is given to it; the timeout then bounds how long
        the control plane stays silent, not how long the work takes.
    """
    timer = None
    if on_progress is not None:
        def heard(*a, **kw):
            if timer is not None and timer.active():
                timer.reset(timeout)
            payload = a[0] if a else kw
            if isinstance(payload, dict):
                on_progress(payload)

        kwargs["options"] = CallOptions(on_progress=heard)
    d = defer.maybeDeferred(session.call, procedure, *args, **kwargs)
    result = defer.Deferred()
    reactor = getattr(session, "reactor", None)
    timeout = getattr(session, "timeout", None)

    def done(value):
        # once timed out, a late answer or failure is dropped (nothing to log)
        if not result.called:
            result.callback(value)

    d.addBoth(done)
    if reactor is not None and timeout:
        def expire():
            if not result.called:
                what = ("said nothing of" if on_progress is not None
                        else "did not answer")
                result.errback(CliError(
                    f"the control plane {what} {procedure} within {timeout:g} s",
                    EXIT_TIMEOUT))

        timer = reactor.callLater(timeout, expire)
    try:
        return await result
    except ApplicationError as e:
        text = e.args[0] if e.args else e.error
        if e.error == "wamp.error.not_authorized":
            raise CliError(f"not allowed: {text}", EXIT_AUTH) from None
        if e.error == "wamp.error.no_such_procedure":
            raise NotOffered(f"the control plane does not offer {procedure}", EXIT_REMOTE) \
                from None
        if e.error.startswith("wamp.close."):
            raise CliError(f"lost the connection to the control plane ({e.error})",
                           EXIT_UNREACHABLE) from None
        raise CliError(str(text), EXIT_REMOTE) from None
    except TransportLost:
        url = getattr(session, "url", None) or "the control plane"
        raise CliError(f"lost the connection to the control plane at {url}",
                       EXIT_UNREACHABLE) from None
    finally:
        if timer is not None and timer.active():
            timer.cancel()


def seconds_of(text, what="duration", examples="90s, 15m or 1h"):
    """
    C{90}, C{90s}, C{15m}, C{2h}, C{1d} -> seconds.

    @raise CliError: (usage) it is none of these: the line names C{what} and C{examples}.
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = str(text).strip().lower()
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError:
        raise CliError(f"bad {what} {text!r}: use e.g. {examples}", EXIT_USAGE) from None


def working(what, err=None, every=5.0):
    """
    An C{on_progress} for L{call} (a copy of a volume's data): on a terminal, a line on
    standard error at most every C{every} seconds (C{what}, how long, and the bytes when
    the control plane says them); elsewhere (a timer's log) nothing.
    """
    err = err or sys.stderr
    shown = [0.0]

    def show(p):
        elapsed = p.get("elapsed")
        if not isinstance(elapsed, int | float) or elapsed - shown[0] < every:
            return
        if not getattr(err, "isatty", lambda: False)():
            return
        shown[0] = elapsed
        done, total = p.get("done"), p.get("total")
        size = (f", {done / (1 << 20):.0f} of {total / (1 << 20):.0f} MiB"
                if isinstance(done, int) and isinstance(total, int) and total else "")
        err.write(f"{what}: {elapsed:.0f} s{size}\n")
        err.flush()

    return show


async def call_once(reactor, api_url, procedure, *args, **kwargs):
    """Connect (to C{api_url}, or as the settings say), call C{procedure}, leave."""
    session = await connect(reactor, load_settings(api_url))
    try:
        return await call(session, procedure, *args, **kwargs)
    finally:
        await close(session)


async def close(session, timeout=2.0):
    """Leave and wait (at most C{timeout} seconds, then drop the connection) for the end."""
    if session.is_attached():
        try:
            session.leave()
        except Exception:
            session.abort()
    if session.ended.called:
        return
    reactor = getattr(session, "reactor", None)
    if reactor is None:
        await session.ended
        return
    timer = reactor.callLater(timeout, session.abort)
    try:
        await session.ended
    finally:
        if timer.active():
            timer.cancel()
