"""timm's ``Mlp``, imported without the rest of timm.

``from timm.layers import Mlp`` runs timm's package ``__init__``, which imports all of timm's models
and data pipeline and, through them, torchvision: about 190 MB of resident memory and 1.1-1.6 s of
start-up in every process, for a two-layer perceptron (issue 16's 1 GiB budget). ``timm.layers.mlp``
itself needs only two small sibling modules. So ``timm`` and ``timm.layers`` are registered as bare
packages just long enough to import it, then removed again: a later ``import timm`` anywhere runs
timm's own ``__init__`` as usual and finds the same ``timm.layers.mlp`` module already loaded. Should
a timm release make that fail, timm is imported whole, as if this module did not exist.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

_PACKAGES = ("timm", "timm.layers")


def _bare_package(name: str) -> types.ModuleType:
    spec = importlib.util.find_spec(name)
    module = types.ModuleType(name)
    module.__path__ = list(spec.submodule_search_locations)
    module.__spec__ = spec
    module.__package__ = name
    return module


def _import_mlp() -> type:
    if "timm" in sys.modules:  # timm already imported in full
        return importlib.import_module("timm.layers").Mlp
    bare = {}
    try:
        for name in _PACKAGES:  # in order: finding timm.layers imports its parent, the bare timm by then
            sys.modules[name] = bare[name] = _bare_package(name)
        return importlib.import_module("timm.layers.mlp").Mlp
    except Exception:  # a timm release whose mlp module needs more: import timm whole
        for name in [n for n in sys.modules if n == "timm" or n.startswith("timm.")]:
            del sys.modules[name]
        return importlib.import_module("timm.layers").Mlp
    finally:
        for name, module in bare.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


Mlp = _import_mlp()
