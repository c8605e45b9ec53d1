"""A loaded kernel image (``kexec load``), as the host knows it: the spec, the cmdline, and what
the instance's loader reported after importing it there (guest/loader.py). The host itself
never imports a kernel image: a module's import-time code is the kernel's code, and runs
contained, in the instance's own process, like the rest of it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from partition.errors import BadKernelImage

KIMAGE_TYPE = "multikernel"
MAX_CMDLINE = 4096


@dataclass
class KImage:
    spec: str
    cmdline: str = ""
    label: str = ""               # module:Class, as the loader found it
    source: str = ""              # the file it came from
    segments: list[str] = field(default_factory=list)
    #: the checked image the loader imports (signing.py), instead of reading the spec's file
    #: again: b"" for an unsigned Python file or a module
    image: bytes = field(default=b"", repr=False)
    #: what its signature said: "" (none), "verified: <subject>" or "unverified: <why>"
    signature: str = ""
    #: the file ``image`` was checked from, as read (signing.Checked.file): what the state
    #: file keeps, for a new host to check again
    file: bytes = field(default=b"", repr=False)


def check_spec(spec: object, cmdline: object) -> KImage:
    """Refuse what cannot be an image before anything is started for it."""
    if not isinstance(spec, str) or not spec.strip() or "\x00" in spec or len(spec) > 4096:
        raise BadKernelImage("empty kernel spec" if not (isinstance(spec, str) and spec.strip())
                             else "kernel spec must be text without NUL bytes, at most 4096 "
                                  "characters",
                             "give module:Class (e.g. kernels.idle:IdleKernel) or a .py path")
    if not isinstance(cmdline, str) or "\x00" in cmdline or len(cmdline) > MAX_CMDLINE:
        raise BadKernelImage(f"cmdline must be text without NUL bytes, at most {MAX_CMDLINE} "
                             "characters", "shorten the --cmdline")
    return KImage(spec=spec.strip(), cmdline=cmdline,
                  segments=["text"] + (["cmdline"] if cmdline else []))


# -- the ELF image -------------------------------------------------------------------------------
#: a real kernel image is an ELF vmlinux, and ``kerf sign`` signs nothing else: an emulated
#: kernel can travel as one, its Python source in this section (``mkctl pack``)
ELF_MAGIC = b"\x7fELF"
SOURCE_SECTION = b".mkpy"
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")


def pack_elf(source: bytes) -> bytes:
    """An ELF64 (x86-64, relocatable) file holding ``source`` in its ``.mkpy`` section: what
    ``kerf sign`` can sign and ``kerf load`` can load into the emulator."""
    strtab = b"\0" + SOURCE_SECTION + b"\0.shstrtab\0"
    data_at = _EHDR.size
    str_at = data_at + len(source)
    sh_at = (str_at + len(strtab) + 7) & ~7
    ident = ELF_MAGIC + bytes([2, 1, 1]) + bytes(9)
    head = _EHDR.pack(ident, 1, 62, 1, 0, 0, sh_at, 0, _EHDR.size, 0, 0, _SHDR.size, 3, 2)
    sections = (_SHDR.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
                + _SHDR.pack(1, 1, 0, 0, data_at, len(source), 0, 0, 1, 0)
                + _SHDR.pack(1 + len(SOURCE_SECTION) + 1, 3, 0, 0, str_at, len(strtab), 0, 0,
                             1, 0))
    body = head + source + strtab
    return body + bytes(sh_at - len(body)) + sections


def unpack_elf(data: bytes) -> bytes:
    """The Python source of an ELF image; BadKernelImage (ENOEXEC) for an ELF file that holds
    none (a real vmlinux), as the loader says of what it cannot run. Every offset is checked
    against the file: the image is the caller's input."""
    bad = BadKernelImage("the ELF image holds no emulated kernel (no .mkpy section): a real "
                         "vmlinux cannot run on the emulator",
                         "pack a Python kernel with mkctl pack KERNEL.py -o IMAGE")
    if len(data) < _EHDR.size or data[4:6] != b"\x02\x01":
        raise bad
    f = _EHDR.unpack_from(data)
    shoff, shentsize, shnum, shstrndx = f[6], f[11], f[12], f[13]
    if shentsize != _SHDR.size or not 0 < shnum <= 64 or shstrndx >= shnum \
            or shoff + shnum * _SHDR.size > len(data):
        raise bad
    shdrs = [_SHDR.unpack_from(data, shoff + i * _SHDR.size) for i in range(shnum)]
    stroff, strsize = shdrs[shstrndx][4], shdrs[shstrndx][5]
    if stroff + strsize > len(data):
        raise bad
    names = data[stroff:stroff + strsize]
    for sh in shdrs:
        name_at, off, size = sh[0], sh[4], sh[5]
        if name_at < len(names) and names[name_at:].split(b"\0", 1)[0] == SOURCE_SECTION:
            if off + size > len(data):
                raise bad
            return data[off:off + size]
    raise bad
