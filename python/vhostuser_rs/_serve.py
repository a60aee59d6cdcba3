"""``vhostuser-rs serve MODULE:CLASS [ARGS...]``: serve a Python device class with the vhost-user
spec's back-end program conventions (qemu docs/interop/vhost-user.rst, "Backend program
conventions"; capabilities as vhost-user.json's ``VHostUserBackendCapabilities``).

How a class is found and built:

- ``MODULE`` is an importable module name (``mypkg.devices``) or a path to a ``.py`` file
  (loaded under its file name, with its folder on ``sys.path`` as ``python FILE`` would have it);
  ``CLASS`` a ``vu.Device`` or ``vu.NetDevice`` subclass in it (dotted for nested classes).
- If the class defines a classmethod ``from_args(argv, **options)``, ARGS reach it verbatim
  as a list of strings (put ``--`` before the first one that starts with ``-``).
- Otherwise every ARG is ``NAME=VALUE`` and becomes the keyword argument ``NAME`` of the
  constructor; VALUE is read as a Python literal when it is one (``4096``, ``0x1000``, ``True``,
  ``None``, ``'text'``, ``[1, 2]``) and is the string as written otherwise (``1M``, ``/dev/sdb``).
- The options the spec defines for the class's device type (``--read-only`` and
  ``--blk-file PATH`` for ``block``, ``--evdev-path`` / ``--no-grab`` for ``input``,
  ``--render-node`` / ``--virgl`` for ``gpu``) become keyword arguments too (``read_only=True``,
  ``blk_file="PATH"``), in both styles. ``--print-capabilities`` lists those the constructor
  (or ``from_args``) accepts, and the device type is the class's ``device_type``
  (``vu.NetDevice`` subclasses: ``"net"``).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

from .backend import Device
from .net import NetDevice

DeviceClass = Union[type[Device], type[NetDevice]]

#: vhost-user.json's ``VHostUserBackendType``.
BACKEND_TYPES = (
    "9p", "balloon", "block", "caif", "console", "crypto", "gpu", "input", "net", "rng", "rpmsg",
    "rproc-serial", "scsi", "vsock", "fs",
)

#: The command-line options vhost-user.rst defines per device type, with their vhost-user.json
#: feature names (``VHostUserBackendBlockFeature`` ...): feature -> takes a value (else a flag).
SPEC_OPTIONS: dict[str, dict[str, bool]] = {
    "block": {"read-only": False, "blk-file": True},
    "input": {"evdev-path": True, "no-grab": False},
    "gpu": {"render-node": True, "virgl": False},
}


class UsageError(Exception):
    """A wrong command line (exit status 2)."""


class LoadError(Exception):
    """The class could not be imported or built (exit status 1)."""


def _describe(e: BaseException) -> str:
    if isinstance(e, SyntaxError) and e.filename:
        return f"SyntaxError: {e.msg} ({e.filename}, line {e.lineno})"
    return f"{type(e).__name__}: {e}"


def _import(module_name: str) -> Any:
    if module_name.endswith(".py") or os.sep in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise UsageError(f"{module_name}: no such file")
        # Under its file name, unless that would replace a module already imported (a file
        # named json.py must not shadow the standard library's json for the whole process).
        name = path.stem if path.stem not in sys.modules else f"{path.stem}__vhostuser_rs_serve"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise UsageError(f"{module_name}: not a Python module")
        module = importlib.util.module_from_spec(spec)
        # As `python FILE` does: the file's folder first on the path (its sibling modules import).
        sys.path.insert(0, str(path.resolve().parent))
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            raise LoadError(f"importing {module_name} failed: {_describe(e)}") from e
        return module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # The module itself (or a parent package) is missing: a usage error. A module it imports
        # that is missing is the module's own failure.
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise UsageError(f"no module named {module_name!r} (give an importable module or a path to a .py file)") from e
        raise LoadError(f"importing {module_name} failed: {_describe(e)}") from e
    except Exception as e:
        raise LoadError(f"importing {module_name} failed: {_describe(e)}") from e


def load_class(target: str) -> DeviceClass:
    """The device class named by ``MODULE:CLASS``."""
    module_name, sep, qualname = target.rpartition(":")
    if not sep or not module_name or not qualname:
        raise UsageError(f"{target!r}: give MODULE:CLASS (a module name or a .py file, then the class)")
    obj: Any = _import(module_name)
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"{module_name} has no {qualname!r}") from None
    if not (isinstance(obj, type) and issubclass(obj, (Device, NetDevice))):
        raise UsageError(f"{target}: not a vhostuser_rs.Device or vhostuser_rs.NetDevice subclass")
    return obj


def device_type(cls: DeviceClass) -> str | None:
    """The class's vhost-user back-end type (``device_type``)."""
    kind = getattr(cls, "device_type", None)
    return kind if isinstance(kind, str) else None


def _factory(cls: DeviceClass) -> Any:
    from_args = getattr(cls, "from_args", None)
    return from_args if callable(from_args) else cls


def _accepts(factory: Any, keyword: str) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind == p.VAR_KEYWORD or (p.name == keyword and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        for p in params
    )


def capabilities(cls: DeviceClass) -> dict[str, Any]:
    """What ``--print-capabilities`` prints: vhost-user.json's ``VHostUserBackendCapabilities``
    for the class (``type``, and for the types whose schema has them the ``features`` whose
    options the class takes)."""
    kind = device_type(cls)
    if kind is None:
        raise UsageError(
            f"{cls.__qualname__} does not declare its device type: set the class attribute device_type "
            f"to one of vhost-user.json's types ({', '.join(BACKEND_TYPES)})"
        )
    if kind not in BACKEND_TYPES:
        raise UsageError(f"{cls.__qualname__}.device_type {kind!r} is not one of vhost-user.json's types "
                         f"({', '.join(BACKEND_TYPES)})")
    doc: dict[str, Any] = {"type": kind}
    if kind in SPEC_OPTIONS:
        factory = _factory(cls)
        doc["features"] = [f for f in SPEC_OPTIONS[kind] if _accepts(factory, f.replace("-", "_"))]
    return doc


def parse_keyword_args(args: Sequence[str]) -> dict[str, Any]:
    """``NAME=VALUE`` strings as keyword arguments (VALUE a Python literal or a plain string)."""
    kwargs: dict[str, Any] = {}
    for arg in args:
        name, sep, text = arg.partition("=")
        if not sep or not name.isidentifier():
            raise UsageError(f"{arg!r}: ARGS are NAME=VALUE keyword arguments (or the class defines from_args)")
        if name in kwargs:
            raise UsageError(f"{name} given twice")
        try:
            value: Any = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = text
        kwargs[name] = value
    return kwargs


def spec_options(cls: DeviceClass, given: dict[str, Any]) -> dict[str, Any]:
    """The spec options given on the command line (feature name -> value) as keyword
    arguments; refuses those the class does not take."""
    kind = device_type(cls)
    factory = _factory(cls)
    kwargs: dict[str, Any] = {}
    for feature, value in given.items():
        keyword = feature.replace("-", "_")
        if feature not in SPEC_OPTIONS.get(kind or "", {}) or not _accepts(factory, keyword):
            raise UsageError(f"--{feature}: {cls.__qualname__} (type {kind or 'undeclared'}) does not take "
                             f"{keyword} (see --print-capabilities)")
        kwargs[keyword] = value
    return kwargs


def build(cls: DeviceClass, args: Sequence[str], options: dict[str, Any]) -> Device | NetDevice:
    """An instance of `cls` from ARGS and the spec options."""
    from_args = getattr(cls, "from_args", None)
    try:
        if callable(from_args):
            device = from_args(list(args), **options)
        else:
            device = cls(**parse_keyword_args(args), **options)
    except UsageError:
        raise
    except Exception as e:
        raise LoadError(f"{cls.__qualname__}: {_describe(e)}") from e
    if not isinstance(device, (Device, NetDevice)):
        raise LoadError(f"{cls.__qualname__}.from_args returned {type(device).__name__}, not a device")
    return device
