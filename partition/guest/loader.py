"""The kernel image's import, inside the instance's own process and never in the host: the
trampoline calls ``resolve`` after the process is contained (guest/containment.py), so code a
kernel module runs at import time is as contained as the kernel itself; the result goes back
to the host as a short report (``kexec load`` succeeded, or why not).

A spec is ``package.module:Class``, a path to a ``.py`` file (``path.py`` or ``path.py:Class``),
or a bare module (``kernels.idle``) whose single Kernel subclass is taken (a module may publish
another module's kernel in ``__all__``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from types import ModuleType

from partition.errors import BadKernelImage
from partition.guest.kernel import Kernel


def split_spec(spec: str) -> tuple[str, str]:
    """(module or path, class name or "") of a spec; no code runs."""
    spec = spec.strip()
    if os.path.isfile(spec):
        return spec, ""
    if ":" in spec:
        target, _, clsname = spec.rpartition(":")
        return target, clsname
    return spec, ""


def _import_path(path: str, image: bytes = b"") -> ModuleType:
    full = os.path.abspath(path)
    if image:
        return _import_image(full, image)
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


_IMPORTLIB = os.path.dirname(importlib.__file__) + os.sep


def _where(exc: BaseException) -> str:
    """`` at FILE:LINE: the line`` that made an import fail: for a SyntaxError the line the
    compiler stopped at, else the innermost frame (the kernel's own code, not importlib's).
    Without it a new user reads "invalid syntax" and has to guess where."""
    if isinstance(exc, SyntaxError):
        if not exc.filename or not exc.lineno:
            return ""
        text = (exc.text or "").strip()
        return f" at {exc.filename}:{exc.lineno}" + (f": {text[:120]}" if text else "")
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(("<frozen", _IMPORTLIB)) and f.filename != __file__]
    if not frames:                      # the import machinery's own: no line of the kernel's
        return ""
    f = frames[-1]
    line = (f.line or "").strip()
    return f" at {f.filename}:{f.lineno}" + (f": {line[:120]}" if line else "")


def _import_image(full: str, image: bytes) -> ModuleType:
    """The module of an image the host read and checked (a signed or ELF image: host/
    signing.py), compiled from those bytes, never from the file again: what was checked is
    what runs."""
    modname = "mk_kimage_" + hashlib.sha1(full.encode()).hexdigest()[:12]
    module = ModuleType(modname)
    module.__file__ = full
    sys.modules[modname] = module
    try:
        exec(compile(image, full, "exec"), module.__dict__)
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


def resolve(spec: str, image: bytes = b"") -> tuple[type[Kernel], str, str]:
    """(the kernel class, its label ``module:Class``, the file it came from) of ``spec``;
    BadKernelImage, with the reason and a fix, for anything that is not a kernel image.
    ``image``: the file's checked content, imported instead of the file."""
    target, clsname = split_spec(spec)
    try:
        if image or target.endswith(".py") or os.sep in target:
            module = _import_path(target, image)
        else:
            module = importlib.import_module(target)
    except BadKernelImage:
        raise
    except BaseException as exc:
        where = _where(exc)
        if isinstance(exc, SyntaxError):
            raise BadKernelImage(f"kernel {spec!r} does not import: {type(exc).__name__}: "
                                 f"{exc.msg}{where}", f"correct line {exc.lineno} of "
                                 f"{exc.filename}") from None
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        raise BadKernelImage(f"kernel {spec!r} does not import: {last}{where}",
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
            first = found_classes[0].__name__ if found_classes else "Class"
            raise BadKernelImage(f"{target!r} defines {len(found_classes)} kernel classes ({names})",
                                 f"name one: {target}:{first}")
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
    return obj, f"{obj.__module__}:{obj.__qualname__}", source
