"""A loaded kernel image (``kexec load``), as the host knows it: the spec, the cmdline, and what
the instance's loader reported after importing it there (guest/loader.py). The host itself
never imports a kernel image: a module's import-time code is the kernel's code, and runs
contained, in the instance's own process, like the rest of it.
"""

from __future__ import annotations

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
