"""attention/hopper.py, the warp-specialised Gluon forward for sm_90, checked without a GPU: the interpreter cannot run
Gluon, so it is compiled for sm_90a with Triton's own ptxas (scripts/kernel_resources.gluon_forward) and its
resources and structure are checked; which inputs take it is checked on the selection logic. Its numerics are
checked on the GPU (tests/test_triton_attention.py, the gpu_only tests), against fp64."""
import os
import subprocess
import sys

import pytest
import torch

from attention import triton as ta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
SHARED_PER_BLOCK_SM90 = 227 * 1024

COMPILE = """
import json, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {scripts!r})
import kernel_resources
print(json.dumps({{D: kernel_resources.gluon_forward(D, dtype={dtype!r}) for D in (64, 128)}}))
"""


@pytest.mark.skipif(not ta.GLUON, reason="Gluon kernel written for Triton 3.6.0; other versions use the tl kernel")
@pytest.mark.parametrize("dtype", ("bf16", "fp16"))
def test_compiles_for_sm90_warp_specialised_without_spills(dtype):
    import json
    out = subprocess.run([sys.executable, "-c", COMPILE.format(root=ROOT, scripts=os.path.join(ROOT, "scripts"),
                                                                 dtype=dtype)],
                         env=ENV, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for D, r in json.loads(out).items():
        assert r["stack"] == 0, (D, r)  # no spills
        assert r["shared"] <= SHARED_PER_BLOCK_SM90, (D, r)
        # Two consumer warpgroups and a producer warp (padded to a warpgroup), with FA3's register budgets.
        assert r["warps"] == 12 and 240 in r["registers_per_partition"] and 24 in r["registers_per_partition"], r
        assert r["wgmma"] > 0 and r["tma_loads"] > 0, r
        assert r["overlapped_waits"] > 0, r  # S_j waited for while P_{j-1} V_{j-1} is still in flight


def test_selection_on_cpu():
    # Never on the CPU or under the interpreter: those take the portable tl kernel.
    q = k = v = torch.randn(1, 2, 64, 64, dtype=torch.bfloat16)
    assert not ta._use_gluon(q, k, v)
