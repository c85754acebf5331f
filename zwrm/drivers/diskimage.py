"""
Checking disk images before anything opens them: C{qemu-img info --output=json}, run as a
process (never on the reactor thread), decides the format and whether the image refers to
anything outside itself.

A qcow2 file can name a backing file (C{../../../host.json}, an absolute path, a
C{json:} or network URL) or an external data file; QEMU would open those with the agent's
rights, so an image author could read host secrets into a guest. Such an image is refused
here, at push (L{zwrm.registry.client.push_image}), in the registry (a manifest that names
a qcow2 layer) and again on the agent before QEMU sees it (L{zwrm.drivers.qemu}). The
magic bytes of a file are never trusted: C{qemu-img} with an explicit format decides.

Formats zwrm boots: C{raw} and C{qcow2}.

A disk pushed alone (no kernel) is booted by the firmware, so it must have a boot sector:
an MBR's boot signature or a GPT (L{boot_sectors}, L{bootable}); a root file system pushed
without its kernel boots nothing (SeaBIOS: "No bootable device", a machine that never
answers).
"""

import json
import os
import shutil
import tempfile

from twisted.internet import threads, utils

from zwrm.errors import InvalidArgument, Unavailable

FORMATS = ("raw", "qcow2")

#: Keys of C{qemu-img info} output that mean "refers to another file".
_REFERENCES = ("backing-filename", "full-backing-filename", "backing-filename-format")


def qemu_img():
    """The C{qemu-img} program (its path, or the bare name if it is not on PATH)."""
    return shutil.which("qemu-img") or "qemu-img"


def check_info(info, what, fmt=None):
    """
    Check the parsed C{qemu-img info --output=json} of an image.

    @param what: how to name the image in errors (e.g. C{"disk layer sha256:..."}).
    @param fmt: the format the image was declared as (C{None}: whatever qemu-img saw).
    @return: C{{"format", "virtual_size", "actual_size"}}.
    @raise InvalidArgument: for a format other than raw/qcow2, or any reference outside
        the file (backing file, external data file).
    """
    if not isinstance(info, dict):
        raise InvalidArgument(f"{what}: qemu-img could not describe it")
    seen = info.get("format")
    if seen not in FORMATS:
        raise InvalidArgument(f"{what}: format {seen!r} is not supported (use raw or qcow2)")
    if fmt is not None and seen != fmt:
        raise InvalidArgument(f"{what}: declared {fmt} but it is {seen}")
    for key in _REFERENCES:
        if info.get(key):
            raise InvalidArgument(
                f"{what}: refused: the qcow2 image has a backing file {info[key]!r}; "
                "an image must be self-contained (qemu-img convert -O qcow2 it first)"
            )
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("data-file") or data.get("data-file-raw"):
        raise InvalidArgument(
            f"{what}: refused: the qcow2 image has an external data file "
            f"{data.get('data-file')!r}; an image must be self-contained"
        )
    size = info.get("virtual-size")
    if not isinstance(size, int) or size <= 0:
        raise InvalidArgument(f"{what}: qemu-img reports no size")
    return {"format": seen, "virtual_size": size, "actual_size": info.get("actual-size")}


async def inspect(reactor, path, fmt=None, what=None, program=None):
    """
    Run C{qemu-img info --output=json} on C{path} (as C{fmt} if given) and check it with
    L{check_info}. The image's backing chain is never opened (qemu-img info does not
    follow it; we refuse images that have one).

    @param reactor: provides C{IReactorProcess}.
    @raise InvalidArgument: a refused or unreadable image (the message names C{what}).
    @raise Unavailable: qemu-img could not be run.
    """
    what = what or path
    path = os.path.abspath(path)
    if fmt is not None and fmt not in FORMATS:
        raise InvalidArgument(f"{what}: format {fmt!r} is not supported (use raw or qcow2)")
    argv = ["info", "--output=json"]
    if fmt is not None:
        argv += ["-f", fmt]
    argv.append(path)
    try:
        out, err, code = await utils.getProcessOutputAndValue(
            program or qemu_img(), argv, env={"LC_ALL": "C", "PATH": os.environ.get("PATH", "")},
            reactor=reactor,
        )
    except OSError as e:
        raise Unavailable(f"qemu-img could not be run: {e}") from None
    if code != 0:
        msg = err.decode("utf-8", "replace").strip().splitlines()
        raise InvalidArgument(
            f"{what}: not a valid {fmt or 'disk'} image: {msg[-1] if msg else 'qemu-img failed'}"
        )
    try:
        info = json.loads(out)
    except ValueError:
        raise InvalidArgument(f"{what}: qemu-img could not describe it") from None
    return check_info(info, what, fmt)


def bootable(head):
    """
    Whether the first 1 KiB a guest sees of a disk (L{boot_sectors}) holds what a firmware
    boots from: an MBR's boot signature (C{55 AA} at offset 510: SeaBIOS; a GPT disk's
    protective MBR has it too) or a GPT header (C{EFI PART} at 512: OVMF).
    """
    return head[510:512] == b"\x55\xaa" or head[512:520] == b"EFI PART"


async def boot_sectors(reactor, path, fmt, program=None):
    """
    The first 1 KiB a guest sees of the disk image C{path} of format C{fmt} (C{qemu-img dd}
    to raw: a qcow2's guest view, never its file's bytes), read off the reactor thread.

    @raise InvalidArgument: qemu-img could not read it. @raise Unavailable: qemu-img could
        not be run.
    """
    pool = reactor.getThreadPool()
    tmp = await threads.deferToThreadPool(reactor, pool, tempfile.mkdtemp,
                                          "", "zwrm-boot-")
    try:
        out = os.path.join(tmp, "head.raw")
        try:
            _, err, code = await utils.getProcessOutputAndValue(
                program or qemu_img(),
                ["dd", "-f", fmt, "-O", "raw", "bs=512", "count=2", f"if={path}", f"of={out}"],
                env={"LC_ALL": "C", "PATH": os.environ.get("PATH", "")}, reactor=reactor)
        except OSError as e:
            raise Unavailable(f"qemu-img could not be run: {e}") from None
        if code != 0:
            msg = err.decode("utf-8", "replace").strip().splitlines()
            raise InvalidArgument(f"{path}: cannot read its first sectors: "
                                  f"{msg[-1] if msg else 'qemu-img failed'}")

        def read():
            with open(out, "rb") as f:
                return f.read(1024)

        return await threads.deferToThreadPool(reactor, pool, read)
    finally:
        await threads.deferToThreadPool(reactor, pool, shutil.rmtree, tmp, True)
