"""Griffe extension of the API reference (mkdocs.yml, mkdocstrings' ``extensions``).

- The native module's stubs (``_native.pyi``) declare signatures; the descriptions are the Rust
  doc comments, which PyO3 exposes as ``__doc__`` on the built module. Objects the stub leaves
  without a docstring take the runtime one, so the reference shows what the code documents
  without copying it into the stubs. This imports ``vhostuser_rs._native`` (the package must be
  installed where MkDocs runs, as for the protocol coverage page).
- A method that overrides a documented one without a docstring of its own (``BuiltinHandler``'s
  answers to back-end requests) shows the overridden method's docstring, as ``help()`` does.
- The docstrings are written for Sphinx (``:class:`X```, ``Example::``); MkDocs renders
  Markdown, so roles become code spans and a trailing ``::`` a colon.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`~?([^`]+)`")
LITERAL_INTRO = re.compile(r"(\S)::$", re.M)


def _markdown(text: str) -> str:
    text = ROLE.sub(lambda m: f"`{m.group(1)}`", text)
    return LITERAL_INTRO.sub(r"\1:", text)


def _fill(obj: griffe.Object, runtime: Any) -> None:
    """Give `obj` and its members the runtime docstrings the stub lacks."""
    for name, member in obj.members.items():
        if isinstance(member, griffe.Alias) or name.startswith("__"):
            continue
        value = getattr(runtime, name, None)
        if value is None:
            continue
        doc = getattr(value, "__doc__", None)
        if member.docstring is None and isinstance(doc, str) and doc.strip() and not isinstance(value, (int, str, dict)):
            member.docstring = griffe.Docstring(doc.strip(), parent=member)
        if isinstance(member, griffe.Class):
            _fill(member, value)


class NativeDocstrings(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != "vhostuser_rs":
            return
        native = importlib.import_module("vhostuser_rs._native")
        _fill(pkg["_native"], native)
        self._inherit(pkg)
        self._convert(pkg)

    def _inherit(self, obj: griffe.Object) -> None:
        for member in obj.members.values():
            if isinstance(member, griffe.Alias):
                continue
            if isinstance(member, griffe.Class):
                for name, method in member.members.items():
                    if not isinstance(method, griffe.Function) or method.docstring is not None:
                        continue
                    for base in member.mro():
                        inherited = base.members.get(name)
                        if inherited is not None and inherited.docstring is not None:
                            method.docstring = griffe.Docstring(inherited.docstring.value, parent=method)
                            break
            if isinstance(member, (griffe.Module, griffe.Class)):
                self._inherit(member)

    def _convert(self, obj: griffe.Object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _markdown(obj.docstring.value)
        for member in obj.members.values():
            if not isinstance(member, griffe.Alias):
                self._convert(member)
