"""Loading a kernel image (``kexec load``): resolve a spec to a Kernel class, or refuse.

A spec is ``package.module:Class``, a path to a ``.py`` file (``path.py`` or ``path.py:Class``),
or a bare module (``kernels.idle``) whose single Kernel subclass is taken. The image is imported
in the host at load time, once, so that every later exec forks from a process that already holds
the code: boot then costs a fork, not an import. Import-time code of a kernel therefore runs in the
host; kernel authors keep work out of module scope (docs/kernels.md).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from dataclasses import dataclass, field
from types import ModuleType

from partition.errors import BadKernelImage
from partition.guest.kernel import Kernel

KIMAGE_TYPE = "multikernel"


@dataclass
class KImage:
    spec: str
    cls: type[Kernel]
    cmdline: str = ""
    source: str = ""
    segments: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.cls.__module__}:{self.cls.__qualname__}"


def _import_path(path: str) -> ModuleType:
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise BadKernelImage(f"kernel file {path!r} does not exist",
                             "give an existing .py file or an importable module:Class")
    modname = "mk_kimage_" + hashlib.sha1(full.encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(modname, full)
    if spec is None or spec.loader is None:
        raise BadKernelImage(f"{path!r} cannot be imported as Python source", "give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(modname, None)
        raise
    return module


def _kernels_in(module: ModuleType) -> list[type[Kernel]]:
    """The kernel classes a module defines, and those it publishes in ``__all__`` (a sample
    image may be another module's kernel under its own name, as ``kernels.echo`` is)."""
    public = set(getattr(module, "__all__", ()))
    return [obj for name, obj in vars(module).items()
            if inspect.isclass(obj) and issubclass(obj, Kernel) and obj is not Kernel
            and (obj.__module__ == module.__name__ or name in public)]


def load_kimage(spec: str, cmdline: str = "") -> KImage:
    if not isinstance(spec, str) or not spec.strip():
        raise BadKernelImage("empty kernel spec",
                             "give module:Class (e.g. kernels.idle:IdleKernel) or a .py path")
    if not isinstance(cmdline, str) or "\x00" in cmdline or len(cmdline) > 4096:
        raise BadKernelImage("cmdline must be text without NUL bytes, at most 4096 characters",
                             "shorten the --cmdline")
    if os.path.isfile(spec.strip()):
        target, clsname = spec.strip(), ""
    else:
        target, _, clsname = spec.strip().rpartition(":") if ":" in spec else (spec.strip(), "", "")
    try:
        if target.endswith(".py") or os.sep in target:
            module = _import_path(target)
        else:
            module = importlib.import_module(target)
    except BadKernelImage:
        raise
    except BaseException as exc:
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        raise BadKernelImage(f"kernel {spec!r} does not import: {last}",
                             "check the module path and that it imports on its own "
                             "(python -c 'import MODULE')") from None
    if clsname:
        obj = getattr(module, clsname, None)
        if obj is None:
            found = ", ".join(c.__name__ for c in _kernels_in(module)) or "none"
            raise BadKernelImage(f"{target!r} has no attribute {clsname!r}",
                                 f"kernel classes found there: {found}")
    else:
        found_classes = _kernels_in(module)
        if len(found_classes) != 1:
            names = ", ".join(c.__name__ for c in found_classes) or "none"
            raise BadKernelImage(f"{target!r} defines {len(found_classes)} kernel classes ({names})",
                                 "name one: MODULE:Class")
        obj = found_classes[0]
    if not (inspect.isclass(obj) and issubclass(obj, Kernel)):
        raise BadKernelImage(f"{spec!r} is not a kernel (not a subclass of partition.Kernel)",
                             "derive the class from partition.Kernel")
    if obj is Kernel:
        raise BadKernelImage(f"{spec!r} is the base class partition.Kernel itself, not a kernel image",
                             "name the subclass that implements the kernel")
    if inspect.isabstract(obj):
        raise BadKernelImage(f"{spec!r} is abstract", "implement its abstract methods")
    source = getattr(module, "__file__", "") or ""
    segments = ["text"] + (["cmdline"] if cmdline else [])
    return KImage(spec=spec.strip(), cls=obj, cmdline=cmdline, source=source, segments=segments)
