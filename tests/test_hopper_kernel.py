"""attention/hopper.py, the warp-specialised Gluon forward for sm_90, checked without a GPU: the interpreter cannot run
Gluon, so it is compiled for sm_90a with Triton's own ptxas (scripts/kernel_resources.gluon_forward) and its
resources and structure are checked; which inputs take it is checked on the selection logic. Its numerics are
checked on the CPU by an emulator of its Gluon operations (test_hopper_emulated.py) and on the GPU
(tests/test_triton_attention.py, the gpu tests), against fp64."""
import os
import subprocess
import sys
from types import SimpleNamespace

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


COMPILE_BWD = """
import json, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {scripts!r})
import kernel_resources
print(json.dumps({{D: kernel_resources.gluon_backward(D) for D in (64, 128)}}))
"""


@pytest.mark.skipif(not ta.GLUON, reason="Gluon kernel written for Triton 3.6.0; other versions use the tl kernel")
def test_backward_compiles_for_sm90_warp_specialised():
    import json
    out = subprocess.run([sys.executable, "-c", COMPILE_BWD.format(root=ROOT, scripts=os.path.join(ROOT, "scripts"))],
                         env=ENV, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for D, r in json.loads(out).items():
        assert r["shared"] <= SHARED_PER_BLOCK_SM90, (D, r)
        assert r["warps"] == 12 and 240 in r["registers_per_partition"] and 24 in r["registers_per_partition"], r
        # Five matmuls per step (Sᵀ, dPᵀ, dV, dK, dQ), the Q/dO ring loaded by TMA, dQ added by TMA reduce-add.
        assert r["wgmma"] > 0 and r["tma_loads"] > 0 and r["tma_reduce_adds"] > 0, r
    # At D = 64 nothing spills; at D = 128 ptxas spills a few scalars (KERNEL_NOTES.md, v16).
    assert json.loads(out)["64"]["stack"] == 0


def test_selection_on_cpu():
    # Never on the CPU or under the interpreter: those take the portable tl kernel.
    q = k = v = torch.randn(1, 2, 64, 64, dtype=torch.bfloat16)
    assert not ta._use_gluon(q, k, v)
    assert ta.kernels(torch.device("cpu"), 64, 2048).startswith("tl forward")


@pytest.mark.parametrize("D, T, dtype, gluon", [
    (64, 1024, torch.bfloat16, False),   # the GPT-2 shape: the tl forward was faster there
    (64, 4095, torch.bfloat16, False),
    (64, 4096, torch.bfloat16, True),    # from GLUON_MIN_T[64] on
    (128, 512, torch.bfloat16, False),
    (128, 1024, torch.bfloat16, True),   # from GLUON_MIN_T[128] on
    (128, 4096, torch.float16, True),
    (128, 4096, torch.float32, False),   # 16-bit inputs only
    (32, 4096, torch.bfloat16, False),   # head dims 64 and 128 only
])
def test_forward_choice_on_sm90(monkeypatch, D, T, dtype, gluon):
    """The default forward's choice on an H100 (sm_90, Triton 3.6.0), simulated on the CPU: the Gluon kernel where it
    runs and was measured faster (GLUON_MIN_T), the tl kernel elsewhere; what the trainer logs says the same."""
    monkeypatch.setattr(ta, "_INTERPRET", False)
    monkeypatch.setattr(ta, "GLUON", True)
    monkeypatch.setattr(ta, "_sm90", lambda device: True)
    device = torch.device("cuda", 0)
    assert ta.kernels(device, D, T, dtype).startswith("Gluon") == gluon

    x = torch.empty(1, 2, T, D, dtype=dtype)  # the predicates read metadata only: a CPU tensor's, said to be on CUDA
    q = SimpleNamespace(shape=x.shape, dtype=dtype, device=device, is_cuda=True, data_ptr=lambda: 0,
                        stride=x.stride, element_size=x.element_size)
    assert ta._prefers_gluon(q, q, q) == gluon


@pytest.mark.parametrize("D", (64, 128))
def test_backward_choice_on_sm90(monkeypatch, D):
    """The default backward's choice on an H100, simulated on the CPU: the Gluon kernel from GLUON_BWD_MIN_T on (at the
    head dims listed there), the tl kernels below it, in fp32, and whenever bitwise repeatability is asked for: the
    deterministic_attention setting (set_deterministic) or torch.use_deterministic_algorithms."""
    monkeypatch.setattr(ta, "_INTERPRET", False)
    monkeypatch.setattr(ta, "GLUON", True)
    monkeypatch.setattr(ta, "_sm90", lambda device: True)
    device = torch.device("cuda", 0)
    min_t = ta.GLUON_BWD_MIN_T.get(D)
    if min_t is None:  # not measured faster at this head dim: the tl backward at every T
        assert not any(ta._gluon_bwd_default(device, D, T, torch.bfloat16) for T in (1024, 16384, 1 << 20))
        return
    assert ta._gluon_bwd_default(device, D, min_t, torch.bfloat16)
    assert ta._gluon_bwd_default(device, D, 4 * min_t, torch.float16)
    logged = ta.kernels(device, D, min_t)
    assert "Gluon warp-specialised backward" in logged or logged.startswith("Gluon warp-specialised forward and backward")
    assert not ta._gluon_bwd_default(device, D, min_t - 1, torch.bfloat16)
    assert not ta._gluon_bwd_default(device, D, min_t, torch.float32)
    ta.set_deterministic(True)
    try:
        assert not ta._gluon_bwd_default(device, D, min_t, torch.bfloat16)
        assert ta.kernels(device, D, min_t).endswith(("tl backward (attention/hopper.py)", "tl forward and backward"))
    finally:
        ta.set_deterministic(False)
    torch.use_deterministic_algorithms(True)
    try:
        assert not ta._gluon_bwd_default(device, D, min_t, torch.bfloat16)
    finally:
        torch.use_deterministic_algorithms(False)


def test_forward_choice_off_sm90(monkeypatch):
    # Other GPUs and other Triton versions take the tl kernel.
    monkeypatch.setattr(ta, "_INTERPRET", False)
    monkeypatch.setattr(ta, "_sm90", lambda device: False)
    assert ta.kernels(torch.device("cuda", 0), 128, 4096).startswith("tl forward")
    monkeypatch.setattr(ta, "_sm90", lambda device: True)
    monkeypatch.setattr(ta, "GLUON", False)
    assert ta.kernels(torch.device("cuda", 0), 128, 4096).startswith("tl forward")
