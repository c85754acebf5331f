"""
C{zwrm images}: push, list and remove VM images in the control plane's registry.

    zwrm images push NAME[:TAG] --kernel FILE [--initrd FILE] [--disk FILE]
                     [--cmdline TEXT] [--port N] [-q] [--json]
    zwrm images list [NAME] [--json]
    zwrm images rm NAME:TAG ... | NAME@sha256:DIGEST ... [--json]

The registry is the control plane's HTTP listener, path C{/v2/}: at the address the control
plane gives (C{zwrm.cluster.info}, its C{[control] registry_url}; needed behind an external
router), else at the same host and port as its WAMP C{/ws} URL. Bulk bytes go over HTTP,
never through WAMP.

The connection settings are the CLI's (L{zwrm.cli.client.load_settings}): C{--api-url} /
C{$ZWRM_API_URL} (C{ws://host:port/ws} means C{http://host:port/v2/}, C{wss://} https),
the token and authid (sent as HTTP Basic auth, user = authid, password = token), and the
CA file for https.
"""

import argparse
import sys

from zwrm.cli.client import (
    EXIT_AUTH,
    EXIT_REMOTE,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
    call_once,
    load_settings,
    print_json,
    seconds_arg,
)
from zwrm.errors import (
    AuthenticationFailed,
    InvalidArgument,
    NotAuthorized,
    NotFound,
    Unavailable,
    ZwrmError,
)
from zwrm.registry import image
from zwrm.registry.client import RegistryClient, make_http_client, push_image, registry_url


async def learn_registry_url(reactor, settings):
    """
    The registry's URL as the control plane gives it (C{zwrm.cluster.info}), or L{None}
    when it gives none, does not have the procedure, or cannot be asked (then the caller
    uses the WAMP URL's host and port, and the registry's own answer says what is wrong).
    """
    from zwrm.cli import client

    try:
        session = await client.connect(reactor, settings)
    except CliError:
        return None
    try:
        info = await client.call(session, "zwrm.cluster.info")
    except CliError:
        return None
    finally:
        await client.close(session)
    url = info.get("registry_url") if isinstance(info, dict) else None
    return url if isinstance(url, str) and url else None


async def _client(reactor, args):
    settings = load_settings(getattr(args, "api_url", None))
    try:
        base = await learn_registry_url(reactor, settings) or registry_url(settings["url"])
    except InvalidArgument as e:
        raise CliError(e.message, EXIT_USAGE) from None
    client = None
    if base.startswith("https:"):
        try:
            client, _ = make_http_client(reactor, settings.get("ca_file"), persistent=False)
        except InvalidArgument as e:
            raise CliError(e.message, EXIT_USAGE) from None
    return RegistryClient(
        reactor, base, (settings["authid"], settings["token"]), http_client=client
    )


def _cli_errors(coro_fn):
    """Run a command; a C{zwrm.errors} failure becomes a one-line L{CliError}."""

    async def run(reactor, args, out=None):
        try:
            return await coro_fn(reactor, args, out or sys.stdout)
        except (AuthenticationFailed, NotAuthorized) as e:
            raise CliError(e.message, EXIT_AUTH) from None
        except Unavailable as e:
            raise CliError(e.message, EXIT_UNREACHABLE) from None
        except InvalidArgument as e:
            raise CliError(e.message, EXIT_USAGE) from None
        except ZwrmError as e:
            raise CliError(e.message, EXIT_REMOTE) from None

    return run


class ProgressBar:
    """
    A progress bar on a terminal stream: C{[#####.....]  52%  520.0/1000.0 MiB  80.5 MiB/s}.

    @param clock: for the rate and to redraw at most every C{interval} seconds.
    """

    def __init__(self, clock, stream, width=30, interval=0.2):
        self._clock = clock
        self._stream = stream
        self._width = width
        self._interval = interval
        self._start = clock.seconds()
        self._last = None
        self._done = False

    def update(self, done, total):
        now = self._clock.seconds()
        if done < total and self._last is not None and now - self._last < self._interval:
            return
        self._last = now
        frac = done / total if total else 1.0
        filled = int(self._width * frac)
        elapsed = max(now - self._start, 1e-6)
        rate = done / elapsed / 2**20
        self._stream.write(
            f"\r[{'#' * filled}{'.' * (self._width - filled)}] {frac * 100:5.1f}%  "
            f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB  {rate:.1f} MiB/s"
        )
        self._stream.flush()

    def finish(self):
        if not self._done and self._last is not None:
            self._stream.write("\n")
            self._stream.flush()
        self._done = True



async def _push(reactor, args, out):
    client = await _client(reactor, args)
    try:
        as_json = getattr(args, "json", False)
        bar = ProgressBar(reactor, sys.stderr) if not (args.quiet or as_json) else None
        try:
            digest = await push_image(
                client,
                args.ref,
                kernel=args.kernel,
                initrd=args.initrd,
                disk=args.disk,
                cmdline=args.cmdline,
                service_port=args.port,
                progress=bar.update if bar else None,
                firmware=args.firmware,
                reactor=reactor,
            )
        finally:
            if bar:
                bar.finish()
        name, tag = image.parse_reference(args.ref)
        if as_json:
            return print_json({"image": f"{name}:{tag}", "digest": digest}, out)
        out.write(f"{name}:{tag} {digest}\n")
        return 0
    finally:
        await client.close()


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


async def _list(reactor, args, out):
    client = await _client(reactor, args)
    try:
        names = [args.name] if args.name else await client.repositories()
        rows, found = [], []
        for name in names:
            for tag in await client.tags(name):
                digest, media, body = await client.get_manifest(name, tag)
                try:
                    info = image.parse_manifest(body)
                    size = sum(info[r]["size"] for r in ("kernel", "initrd", "disk") if info[r])
                    layers = [r for r in ("kernel", "initrd", "disk") if info[r]]
                except InvalidArgument:
                    size, layers = None, []
                found.append({"image": f"{name}:{tag}", "name": name, "tag": tag,
                              "digest": digest, "size": size, "layers": layers})
                rows.append((f"{name}:{tag}", digest[:19], _size(size) if size is not None else "-",
                             "+".join(layers) or "other"))
        if getattr(args, "json", False):
            return print_json(found, out)
        header = ("IMAGE", "DIGEST", "SIZE", "LAYERS")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
        for row in [header, *rows]:
            out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
        return 0
    finally:
        await client.close()


async def _rm(reactor, args, out):
    as_json = getattr(args, "json", False)
    removed = []
    client = await _client(reactor, args)
    try:
        for ref in args.refs:
            name, reference = image.parse_reference(ref)
            if ":" not in ref.split("/")[-1] and "@" not in ref:
                raise InvalidArgument(f"say which tag or digest to remove: {ref}:TAG")
            try:
                await client.delete(name, reference)
            except NotFound:
                raise NotFound(f"no image {ref} in the registry (see zwrm images list)") from None
            gone = f"{name}{'@' if reference.startswith('sha256:') else ':'}{reference}"
            removed.append({"removed": gone})
            if not as_json:
                out.write(f"removed {gone}\n")
        return 0
    finally:
        if as_json and removed:  # those removed before a failure too, as the lines say them
            print_json(removed, out)
        await client.close()


async def _gc(reactor, args, out=None):
    out = out or sys.stdout
    done = await call_once(reactor, args.api_url, "zwrm.image.gc", args.dry_run, args.grace)
    if args.json:
        return print_json(done, out)
    verb = "would remove" if done["dry_run"] else "removed"
    for key, what in (("manifests", "manifest"), ("blobs", "blob")):
        for x in done[key]:
            out.write(f"{verb} {what} {x['name']}@{x['digest']}\n")
    mib = done["bytes"] / (1 << 20)
    out.write(f"{verb} {len(done['manifests'])} manifest(s) and {len(done['blobs'])} blob(s): "
              f"{'at most ' if done['dry_run'] else ''}{mib:.1f} MiB "
              f"{'to free' if done['dry_run'] else 'freed'}\n")
    for name in done["changed"]:
        out.write(f"{name}: changed by a push or a deploy meanwhile; left for the next run\n")


def _port(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, not {value}")
    return value


def register(subparsers):
    """Add C{images} (push, list, rm) to the CLI's sub-commands."""
    p = subparsers.add_parser("images", aliases=["image"], help="push, list and remove VM images")
    sub = p.add_subparsers(dest="images_command", metavar="COMMAND")
    sub.required = True

    push = sub.add_parser("push", help="push a VM image (kernel, initrd, disk) to the registry")
    push.add_argument("ref", metavar="NAME[:TAG]")
    push.add_argument("--kernel", help="the x86 kernel: a bzImage (vmlinuz), a PVH ELF or a Multiboot kernel")
    push.add_argument("--initrd", help="the initrd / initramfs")
    push.add_argument("--disk", help="a disk image, raw or qcow2 (self-contained: no backing file;"
                      " pushed without --kernel it must have a boot sector: MBR or GPT)")
    push.add_argument("--firmware", choices=("bios", "uefi"), default=None,
                      help="how a self-booting disk boots (default bios)")
    push.add_argument("--cmdline", default="", help="the kernel command line")
    push.add_argument("--port", type=_port, default=None, help="the default service port")
    push.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    push.add_argument("--json", action="store_true", help="print JSON (and no progress bar)")
    push.set_defaults(func=_cli_errors(_push))

    ls = sub.add_parser("list", help="list images (all repositories, or one)")
    ls.add_argument("name", nargs="?", metavar="NAME")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_cli_errors(_list))

    rm = sub.add_parser("rm", help="remove a tag (NAME:TAG) or an image (NAME@sha256:...)")
    rm.add_argument("refs", nargs="+", metavar="REF")
    rm.add_argument("--json", action="store_true", help="print JSON")
    rm.set_defaults(func=_cli_errors(_rm))

    gc = sub.add_parser(
        "gc", help="remove what no image needs (untagged manifests, unused blobs)",
        description="Remove what no image needs from the control plane's registry: manifests "
                    "no tag, index or app spec points at (an app deployed by digest, any of "
                    "its spec versions), and blobs no remaining manifest uses, each stored "
                    "longer ago than --grace (a push under way is left alone); then free the "
                    "content no repository links. Removing a tag (zwrm images rm) frees "
                    "nothing by itself: this does.")
    gc.add_argument("--dry-run", action="store_true", help="only say what it would remove")
    gc.add_argument("--grace", type=seconds_arg, default=None, metavar="SECONDS",
                    help="leave what was stored less than this long ago (default 86400: "
                         "a push uploads its blobs before its manifest)")
    gc.add_argument("--json", action="store_true", help="print JSON")
    gc.set_defaults(func=_gc)
    return p
