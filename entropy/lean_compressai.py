"""Import compressai without its point-cloud extras.

compressai's package ``__init__`` imports every subpackage, and its point-cloud datasets and
transforms import torch_geometric (with pandas, matplotlib and a retrieval stack behind it): about
215 MB of resident memory and 2 s of start-up in every process, for classes imfc never uses. The
entropy models, layers and models imfc does use import none of them. So before compressai is first
imported, its three subpackages that pull torch_geometric in are registered as empty modules;
should a compressai release need them after all, the stubs are dropped and compressai is imported
whole, as if this module did not exist.
"""

from __future__ import annotations

import sys
import types

# compressai's subpackages whose import brings in torch_geometric, none of them used here
SKIPPED = ("compressai.datasets", "compressai.transforms", "compressai.registry.transforms")


def _stubs() -> dict[str, types.ModuleType]:
    stubs = {name: types.ModuleType(name, "left out by entropy.lean_compressai") for name in SKIPPED}
    registry = stubs["compressai.registry.transforms"]  # what compressai.registry imports from it
    registry.TRANSFORMS = {}
    registry.register_transform = lambda name: (lambda cls: cls)
    return stubs


def import_compressai() -> None:
    """Import compressai lean, once per process; a no-op once compressai is imported."""
    if "compressai" in sys.modules:
        return
    sys.modules.update(_stubs())
    try:
        import compressai  # noqa: F401
    except Exception:  # a release whose other subpackages need the skipped ones: import it all
        for name in [n for n in sys.modules if n == "compressai" or n.startswith("compressai.")]:
            del sys.modules[name]
        import compressai  # noqa: F401
