"""Every entry point imports compressai without torch_geometric (entropy.lean_compressai)."""

import subprocess
import sys


def test_no_point_cloud_stack_is_imported():
    code = ("import sys, tools.cli, tools.encode, codec.nn.model, train.loop, evaluation.rd_eval, rtc.session; "
            "from compressai.entropy_models import EntropyBottleneck; "
            "print(sorted(m for m in ('torch_geometric', 'pandas', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
