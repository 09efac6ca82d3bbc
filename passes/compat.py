"""Old import paths, kept working for one release with a ``DeprecationWarning``.

fx_sparsity 0.1.0 kept its modules in two flat folders; they now live in subpackages by
stage. Three things keep the old paths alive:

* :class:`MovedModules`, a finder on ``sys.meta_path``, answers an import of a module that
  moved (``passes.lower_sparse``, ``fx_sparsity.masks``) with a stand-in whose attributes are
  looked up in the module's new homes, so old imports and the pickles and state dicts that
  name old module paths (``passes.capture._new_captured``, ``passes.lstm_masks.masked_lstm``,
  ``fx_sparsity.sparsifier.wanda.WandaSparsifier``) still resolve;
* :func:`keep_attributes` stops such an import from replacing a package attribute of the
  same name (importing the old module ``fx_sparsity.lower`` must leave the function
  ``fx_sparsity.lower`` in place);
* :func:`moved_names` gives a package a ``__getattr__`` for names that left it (the names
  of ``fx_sparsity.__all__`` and ``passes.__all__`` that now live in a namespace).

Every use warns once per place with the new path; the old paths go in the release after next.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["MovedModules", "install_moved_modules", "keep_attributes", "moved_names", "resolve_qualified_name"]

_REMOVAL = "it will be removed in the release after next"


def _warn(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{old} is deprecated: use {new} ({_REMOVAL})", DeprecationWarning, stacklevel=stacklevel)


class _MovedModule(types.ModuleType):
    """Stands in for a module that moved: each attribute comes from the first new home that has it, or from
    ``renamed`` (old name -> ``"module:name"``)."""

    def __init__(self, name: str, homes: Sequence[str], renamed: Mapping[str, str]) -> None:
        super().__init__(name, f"Deprecated: {name} moved to {', '.join(homes)}.")
        self.__dict__["_homes"] = tuple(homes)
        self.__dict__["_renamed"] = dict(renamed)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        if attr in self._renamed:
            module, _, name = self._renamed[attr].partition(":")
            _warn(f"{self.__name__}.{attr}", f"{module}.{name}")
            return getattr(importlib.import_module(module), name)
        for home in self._homes:
            module = importlib.import_module(home)
            if attr in vars(module):
                _warn(f"{self.__name__}.{attr}", f"{home}.{attr}")
                return vars(module)[attr]
        raise AttributeError(f"module {self.__name__!r} (now {', '.join(self._homes)}) has no attribute {attr!r}")

    def __dir__(self) -> list[str]:
        names = set(self._renamed)
        for home in self._homes:
            names |= {n for n in vars(importlib.import_module(home)) if not n.startswith("__")}
        return sorted(names)


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A finder (placed last on ``sys.meta_path``, so real modules always win) that imports each old module path
    of ``moved`` (``{old: (new homes...)}``) as a stand-in reading from its new homes."""

    def __init__(self, moved: Mapping[str, Sequence[str]], renamed: Mapping[str, Mapping[str, str]]) -> None:
        self.moved = {old: tuple(new) for old, new in moved.items()}
        self.renamed = {old: dict(names) for old, names in renamed.items()}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.moved:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        _warn(f"the module {spec.name}", " or ".join(self.moved[spec.name]), stacklevel=4)
        return _MovedModule(spec.name, self.moved[spec.name], self.renamed.get(spec.name, {}))

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install_moved_modules(
    moved: Mapping[str, Sequence[str]], renamed: Mapping[str, Mapping[str, str]] | None = None
) -> MovedModules:
    """Answer imports of the old module paths in ``moved`` from now on (once per process and table)."""
    for finder in sys.meta_path:
        if isinstance(finder, MovedModules) and finder.moved.keys() >= moved.keys():
            return finder
    finder = MovedModules(moved, renamed or {})
    sys.meta_path.append(finder)
    return finder


class _KeepsAttributes(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # The import system sets each imported submodule on its package; a stand-in must not hide a function.
        if isinstance(value, _MovedModule) and name in self.__dict__:
            return
        super().__setattr__(name, value)


def keep_attributes(package: str) -> None:
    """Keep ``package``'s attributes when an old module path of the same name is imported."""
    sys.modules[package].__class__ = _KeepsAttributes


def moved_names(package: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: each name of ``moved`` (``{name: new home}``, or
    ``{name: "home:new_name"}`` when it was renamed) comes from its new home, with a ``DeprecationWarning``."""

    def __getattr__(name: str) -> Any:
        home = moved.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, new_name = home.partition(":")
        new_name = new_name or name
        _warn(f"{package}.{name}", f"{module}.{new_name}")
        return getattr(importlib.import_module(module), new_name)

    return __getattr__


def resolve_qualified_name(name: str) -> Any:
    """The object a ``"package.module.Name"`` string names (old module paths included), or ``None``."""
    module, _, attr = name.rpartition(".")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        return None
