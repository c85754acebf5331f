"""
What QEMU's x86 loader boots as a kernel (C{-kernel}), checked before an image is stored.

C{qemu-system-x86_64 -kernel FILE} takes three kinds of file (hw/i386/x86.c,
C{x86_load_linux}):
    - a Linux bzImage: the boot protocol's C{HdrS} at offset 0x202 (every kernel since
      Linux 1.3.73);
    - an ELF kernel with a PVH entry point: the C{Xen} note C{XEN_ELFNOTE_PHYS32_ENTRY}
      (an uncompressed C{vmlinux} built with C{CONFIG_PVH});
    - a Multiboot (version 1) kernel: the magic C{0x1BADB002} with its checksum, 4-byte
      aligned, in the first 8 KiB.
Anything else QEMU loads as a pre-1.3 zImage and jumps into, so a file that is not a kernel
boots into garbage (a machine that never answers, with no error) or fails with "invalid
kernel header". Both are refused here, at the push, with a message naming the file.
"""

import struct

from zwrm.errors import InvalidArgument

#: The formats L{kernel_format} tells apart.
FORMATS = ("bzImage", "elf-pvh", "multiboot")

_HDRS = b"HdrS"
_MULTIBOOT_MAGIC = 0x1BADB002
_MULTIBOOT_SEARCH = 8192
_ELF_MAGIC = b"\x7fELF"
_EM_386, _EM_X86_64 = 3, 62
_PT_NOTE = 4
_XEN_ELFNOTE_PHYS32_ENTRY = 18
#: Bounds on what an ELF kernel's headers may make us read.
_MAX_PHNUM = 256
_MAX_NOTES = 1 << 20


def kernel_format(f):
    """
    Tell what kind of x86 kernel a file is.

    @param f: a binary file open for reading, seekable.
    @return: one of L{FORMATS}, or C{None} if QEMU's x86 loader would not boot it as one.
    """
    f.seek(0)
    head = f.read(_MULTIBOOT_SEARCH + 12)
    if head[0x202:0x206] == _HDRS:
        return "bzImage"
    if head[:4] == _ELF_MAGIC and _elf_has_pvh_note(f, head):
        return "elf-pvh"
    for off in range(0, min(len(head), _MULTIBOOT_SEARCH) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", head, off)
        if magic == _MULTIBOOT_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return "multiboot"
    return None


def _elf_has_pvh_note(f, head):
    if len(head) < 64 or head[5] != 1:  # little-endian only, as x86 is
        return False
    if head[4] == 1:  # ELF32
        machine, = struct.unpack_from("<H", head, 18)
        phoff, = struct.unpack_from("<I", head, 28)
        phentsize, phnum = struct.unpack_from("<HH", head, 42)
        ph_fmt, ph_fields = "<IIIIIIII", (0, 1, 4)  # p_type, p_offset, p_filesz
    elif head[4] == 2:  # ELF64
        machine, = struct.unpack_from("<H", head, 18)
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        ph_fmt, ph_fields = "<IIQQQQQQ", (0, 2, 5)
    else:
        return False
    if machine not in (_EM_386, _EM_X86_64) or phnum > _MAX_PHNUM:
        return False
    if phentsize < struct.calcsize(ph_fmt):
        return False
    f.seek(phoff)
    table = f.read(phentsize * phnum)
    for i in range(phnum):
        if len(table) < (i + 1) * phentsize:
            return False
        fields = struct.unpack_from(ph_fmt, table, i * phentsize)
        p_type, p_offset, p_filesz = (fields[j] for j in ph_fields)
        if p_type != _PT_NOTE or p_filesz > _MAX_NOTES:
            continue
        f.seek(p_offset)
        if _has_xen_entry(f.read(p_filesz)):
            return True
    return False


def _has_xen_entry(notes):
    off = 0
    while off + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from("<III", notes, off)
        name = notes[off + 12:off + 12 + namesz].rstrip(b"\0")
        if name == b"Xen" and kind == _XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        off += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def inspect(path, what):
    """
    Check that a file is a kernel QEMU's x86 loader boots (this reads the file: call it
    from a thread where the reactor's must not wait).

    @param what: how the caller's user knows the file (C{"--kernel vmlinuz"}, C{"kernel
        layer sha256:..."}), for the message.
    @return: its format, one of L{FORMATS}.
    @raise InvalidArgument: if it is not one.
    """
    with open(path, "rb") as f:
        found = kernel_format(f)
    if found is None:
        raise InvalidArgument(
            f"{what} is not an x86 kernel QEMU can boot: a Linux bzImage (vmlinuz), an ELF "
            f"kernel with a PVH entry point or a Multiboot kernel")
    return found
