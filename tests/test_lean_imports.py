"""Entry points import compressai without torch_geometric (entropy.lean_compressai), timm's Mlp without
the rest of timm (codec.nn.layers.mlp), and nothing that brings in torchvision (issue 16's memory)."""

import subprocess
import sys

HEAVY = ("torch_geometric", "pandas", "matplotlib", "torchvision", "timm.models", "timm.data", "piq")


def imported(code: str) -> list[str]:
    probe = f"{code}; import sys; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_entry_points_import_no_heavy_stack():
    assert imported("import tools.cli, tools.encode, tools.decode, tools.bench, codec.nn.model, train.loop, "
                    "evaluation.rd_eval, rtc.session; from compressai.entropy_models import EntropyBottleneck") == []


def test_timm_imports_whole_after_the_lean_mlp():
    # a later `import timm` (a user's own code beside imfc) gets all of timm and the very same Mlp
    code = ("from codec.nn.layers.mlp import Mlp; import timm; from timm.layers import Mlp as M; "
            "assert M is Mlp and hasattr(timm, 'create_model')")
    assert "timm.models" in imported(code)
