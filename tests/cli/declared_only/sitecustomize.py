"""Imported at start-up by a Python whose PYTHONPATH starts with this directory: hides every
top-level module that lives in site-packages but is not in ANYQUANT_ALLOWED_MODULES (a JSON list),
as a virtual environment holding only the declared dependencies would. Hidden means not found:
`import x` raises the usual ModuleNotFoundError and `importlib.util.find_spec("x")` is None, so
code probing for optional modules behaves as it would there. The standard library and the
source tree on PYTHONPATH import as usual."""

from __future__ import annotations

import json
import os
import site
import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import PathFinder

_ALLOWED = frozenset(json.loads(os.environ["ANYQUANT_ALLOWED_MODULES"]))
_SITE = tuple(os.path.realpath(p) + os.sep for p in [*site.getsitepackages(), site.getusersitepackages()])


class _DeclaredOnlyPathFinder(MetaPathFinder):
    """The ordinary path finder, minus undeclared top-level modules from site-packages."""

    def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        spec = PathFinder.find_spec(fullname, path, target)
        if spec is None or "." in fullname or fullname in _ALLOWED:
            return spec  # submodules of a hidden module are never reached
        where = spec.origin or next(iter(spec.submodule_search_locations or ()), "")
        return None if os.path.realpath(where).startswith(_SITE) else spec

    def invalidate_caches(self) -> None:
        PathFinder.invalidate_caches()


sys.meta_path[:] = [_DeclaredOnlyPathFinder() if f is PathFinder else f for f in sys.meta_path]
