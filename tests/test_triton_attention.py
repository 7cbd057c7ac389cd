"""Tests of the Triton FlashAttention-2 backend (attention/triton.py).

On the CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no
CUDA). Every reference is independent of the kernels: naive attention in fp64 on the same (rounded) inputs, or
PyTorch's SDPA. Inputs are the strided views the model makes: a (B, T, 3C) projection, split, viewed, transposed.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import triton

from attention import triton as ta
from conftest import attention_fp64, qkv_views

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.gpu  # tests/conftest.py skips it without a CUDA GPU; `pytest -m gpu` selects these tests

# ‖x − ref‖ / ‖ref‖ and max |x − ref| / max(1, max |ref|) bounds. fp32: exact fp32 arithmetic (ieee dots on the
# GPU); fp16/bf16: the inputs are exact, the error is the rounding of P/dS operands and of the stored outputs.
REL_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
MAX_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def make_inputs(B, H, T, D, dtype, seed, device=DEVICE):
    """The model's strided q, k, v views of a leaf (B, T, 3·H·D) tensor, and an output gradient."""
    qkv, (q, k, v) = qkv_views(B, H, T, D, dtype, seed, device)
    do = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=dtype)
    return qkv, (q, k, v), do


def reference(qkv, do, H):
    """fp64 causal attention and its gradients w.r.t. q, k, v, from the same (rounded) inputs."""
    B, T, _ = qkv.shape
    D = qkv.shape[-1] // (3 * H)
    x = qkv.detach().double().requires_grad_()
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in x.split(H * D, dim=2))
    o = attention_fp64(q, k, v)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do.double())
    return o, dq, dk, dv


def assert_close(name, x, ref, dtype, zero=False):
    x = x.double()
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    err = (x - ref).abs().max().item()
    if zero:  # analytically zero (dQ, dK at T=1): absolute tolerance only
        assert err <= MAX_TOL[dtype] * 1e-2, f"{name}: max |x| = {err:.3g}, expected 0"
        return
    rel = ((x - ref).norm() / ref.norm()).item()
    scale = max(1.0, ref.abs().max().item())
    assert rel <= REL_TOL[dtype] and err <= MAX_TOL[dtype] * scale, \
        f"{name}: rel err {rel:.3g} (tol {REL_TOL[dtype]}), max err {err:.3g} (tol {MAX_TOL[dtype] * scale:.3g})"


def check_kernels(B, H, T, D, dtype, seed, fwd_config=None, dq_config=None, dkdv_config=None):
    """Run the forward and backward kernels directly (explicit configs) and compare with the fp64 reference."""
    qkv, (q, k, v), do = make_inputs(B, H, T, D, dtype, seed)
    q, k, v = q.detach(), k.detach(), v.detach()
    o, lse = ta.attention_forward(q, k, v, fwd_config)
    dq, dk, dv = ta.attention_backward(do, q, k, v, o, lse, dq_config, dkdv_config)
    ro, rdq, rdk, rdv = reference(qkv, do, H)
    assert_close("out", o, ro, dtype)
    assert_close("dq", dq, rdq, dtype, zero=T == 1)
    assert_close("dk", dk, rdk, dtype, zero=T == 1)
    assert_close("dv", dv, rdv, dtype)


# --- every autotune config of every kernel, each on a T that is not a multiple of its blocks ----------------------
MASKED_T = (17, 67, 200)  # none is a multiple of 16, so every block size of every config is partial at the end
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def config_cases(head_dims):
    """(D, fwd, dq, dkdv) so that each config of each kernel's list for D appears at least once (a case runs all
    three kernels; shorter lists wrap around)."""
    cases = []
    for D in head_dims:
        lists = [ta.configs_for(c, D) for c in (ta.FWD_CONFIGS, ta.DQ_CONFIGS, ta.DKDV_CONFIGS)]
        cases += [(D, *(c[i % len(c)] for c in lists)) for i in range(max(map(len, lists)))]
    return cases


CPU_CASES = config_cases((64, 128))


@pytest.mark.parametrize("i", range(len(CPU_CASES)))
def test_every_config(i):
    # Dtype and T rotate across cases; the D <= 64 lists also serve D = 16 and 32, so half their cases use D = 16.
    D, fwd, dq, dkdv = CPU_CASES[i]
    if D == 64 and i % 2:
        D = 16
    check_kernels(2, 3, MASKED_T[i % 3], D, DTYPES[i % 3], seed=i, fwd_config=fwd, dq_config=dq, dkdv_config=dkdv)


# --- the kernels through TMA descriptors (taken on Hopper; forced here, also under the interpreter) ----------------
@pytest.mark.parametrize("T", MASKED_T + (1,))
@pytest.mark.parametrize("D", (128, 16))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_tma_forward_equals_the_pointer_forward(dtype, D, T):
    # The same kernel, reading q, k, v and writing O through descriptors: rows past T must load as zeros and not be
    # stored (B=2, H=3: a row stored past T would land in another head's or batch's output), so the result must be
    # the pointer path's bit for bit, and within rounding of fp64.
    _, (q, k, v), _ = make_inputs(2, 3, T, D, dtype, seed=T)
    q, k, v = q.detach(), k.detach(), v.detach()
    config = ta.FWD_TMA_CONFIGS[128][0]
    o, lse = ta.attention_forward(q, k, v, config, tma=True)
    o_ptr, lse_ptr = ta.attention_forward(q, k, v, config, tma=False)
    assert torch.equal(o, o_ptr) and torch.equal(lse, lse_ptr)
    assert_close("out", o, attention_fp64(q, k, v), dtype)


@pytest.mark.parametrize("T", MASKED_T + (1,))
@pytest.mark.parametrize("D", (128, 64))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_tma_backward_equals_the_pointer_backward(dtype, D, T):
    # The same two kernels, reading q, k, v and dO through descriptors (dO in the (B, T, H, D) memory order the
    # model's gradient arrives in): rows past T must load as zeros, so the gradients must be the pointer path's bit
    # for bit, and within rounding of fp64.
    qkv, (q, k, v), do = make_inputs(2, 3, T, D, dtype, seed=T)
    q, k, v = q.detach(), k.detach(), v.detach()
    do = do.transpose(1, 2).contiguous().transpose(1, 2)
    dq_config, dkdv_config = ta.configs_for(ta.DQ_TMA_CONFIGS, D)[0], ta.configs_for(ta.DKDV_TMA_CONFIGS, D)[0]
    o, lse = ta.attention_forward(q, k, v, tma=False)
    grads = ta.attention_backward(do, q, k, v, o, lse, dq_config, dkdv_config, tma=True)
    grads_ptr = ta.attention_backward(do, q, k, v, o, lse, dq_config, dkdv_config, tma=False)
    assert all(torch.equal(g, g_ptr) for g, g_ptr in zip(grads, grads_ptr))
    for name, g, ref in zip(("dq", "dk", "dv"), grads, reference(qkv, do, 3)[1:]):
        assert_close(name, g, ref, dtype, zero=T == 1 and name != "dv")


def test_tma_needs_16_byte_alignment():
    # TMA takes a 16-byte-aligned base and strides; the model's views have them, other layouts take the pointers.
    _, (q, k, v), _ = make_inputs(1, 2, 8, 64, torch.bfloat16, seed=0)
    assert all(ta._tma_aligned(x) for x in (q, k, v, ta._bthd(q)))
    flat = torch.zeros(1 + 2 * 8 * 64, dtype=torch.bfloat16)
    assert not ta._tma_aligned(flat[1:].view(1, 2, 8, 64))  # the base 2 bytes off
    assert not ta._tma_aligned(torch.zeros(1, 2, 8, 68, dtype=torch.bfloat16)[..., :64])  # rows 136 bytes apart
    # A size-1 dimension's stride is never used, whatever torch says it is: it does not count against alignment.
    odd = torch.as_strided(torch.zeros(2 * 8 * 64, dtype=torch.bfloat16), (1, 2, 8, 64), (3, 512, 64, 1))
    assert ta._descriptor_strides(odd) == [64, 512, 64, 1] and ta._tma_aligned(odd)
    assert not ta._use_tma(ta.FWD_TMA_CONFIGS, q, k, v) or q.is_cuda  # never on the CPU (interpreter) unless forced


def test_tiling_predicates():
    # The causal loops need the diagonal tile to split into whole inner tiles (BLOCK_M % BLOCK_N == 0, etc.).
    cfg = lambda **kw: triton.Config(kw)  # noqa: E731
    assert ta._fwd_ok(cfg(BLOCK_M=128, BLOCK_N=64)) and ta._fwd_ok(cfg(BLOCK_M=64, BLOCK_N=64))
    assert not ta._fwd_ok(cfg(BLOCK_M=32, BLOCK_N=64)) and not ta._fwd_ok(cfg(BLOCK_M=48, BLOCK_N=32))
    assert ta._dq_ok(cfg(BLOCK_M2=64, BLOCK_N2=16)) and not ta._dq_ok(cfg(BLOCK_M2=32, BLOCK_N2=64))
    assert ta._dkdv_ok(cfg(BLOCK_N1=64, BLOCK_M1=32)) and not ta._dkdv_ok(cfg(BLOCK_N1=32, BLOCK_M1=64))
    with pytest.raises(ValueError, match="diagonal tile"):
        ta._configs(("BLOCK_M", "BLOCK_N"), ta._fwd_ok, [(64, 64, 4, 3), (32, 64, 4, 3)])


BAD_TILINGS = [("fwd", dict(BLOCK_M=32, BLOCK_N=64)), ("fwd", dict(BLOCK_M=48, BLOCK_N=32)),
               ("dq", dict(BLOCK_M2=32, BLOCK_N2=64)), ("dkdv", dict(BLOCK_N1=32, BLOCK_M1=64))]


@pytest.mark.parametrize("kernel,config", BAD_TILINGS)
def test_wrong_tiling_is_rejected(kernel, config):
    # BLOCK_M < BLOCK_N broke the official tutorial's causal forward; the kernels must refuse it, not compute it.
    config = triton.Config(config)
    _, (q, k, v), do = make_inputs(1, 1, 70, 16, torch.float32, seed=0)
    q, k, v = q.detach(), k.detach(), v.detach()
    with pytest.raises(Exception, match="diagonal tile"):
        if kernel == "fwd":
            ta.attention_forward(q, k, v, config)
        else:
            o, lse = ta.attention_forward(q, k, v)
            ta.attention_backward(do, q, k, v, o, lse, **{f"{kernel}_config": config})


# --- grid and launch paths --------------------------------------------------------------------------------------
def test_host_cdiv_and_next_power_of_2_are_tritons():
    # The launch path's own copies (Triton 3.6's cost ~2 us a host call): the same integers as Triton's.
    for a in [*range(0, 300), 4095, 4096, 4097, 65535, 65536, 2**31 - 1, 2**31, 2**40 + 3]:
        assert ta._next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in (1, 2, 3, 16, 64, 128, 4096, 65535):
            assert ta._cdiv(a, b) == triton.cdiv(a, b), (a, b)


@pytest.mark.parametrize("BH", [1, 65535, 65536, 70000, 131071, 2**31 // 3])
def test_grid_covers_batch_heads_within_axis_limits(BH):
    tiles, y, z = ta._grid(1000, 64, BH)
    assert tiles == 16 and 1 <= y <= 65535 and 1 <= z <= 65535
    assert BH <= y * z < BH + z  # every batch·head gets a program; fewer than z programs idle


@pytest.mark.parametrize("B,H", [(3, 3), (2, 5)])
def test_folded_grid(monkeypatch, B, H):
    # B·H > MAX_GRID_YZ folds batch·head over grid axes 1 and 2. A real B·H > 65,535 costs minutes in the
    # interpreter (it runs programs one by one; the GPU test does B·H = 70,000), so the limit is lowered instead:
    # B·H = 9 over (3, 3) exactly, and 10 over (4, 3), whose last two programs must do nothing.
    monkeypatch.setattr(ta, "MAX_GRID_YZ", 4)
    assert ta._grid(17, 16, B * H)[1:] == {9: (3, 3), 10: (4, 3)}[B * H]
    check_kernels(B, H, 17, 16, torch.float32, seed=B * H)


def test_a_kept_tma_descriptor_is_one_encoding_anew_would_give(monkeypatch):
    """The direct launch keeps each encoded TMA descriptor (_tma_args) by everything the encoding reads, so that a new
    tensor at a freed address, with another shape, strides, dtype or tile, is encoded afresh, never given a stale
    descriptor (which would read the wrong rows on the GPU, silently)."""
    made = []

    def encode(desc, meta):  # stands in for Triton's C encoder: records what it was given
        made.append((desc.base.data_ptr(), tuple(desc.shape), tuple(desc.strides), tuple(desc.block_shape),
                     desc.base.dtype))
        return [len(made)]
    monkeypatch.setattr(ta, "make_tensordesc_arg", encode, raising=False)
    monkeypatch.setattr(ta, "_TMA_ARGS", {})
    meta = {"swizzle": 3}
    buf = torch.zeros(2 * 64 * 4 * 64)
    x = buf.view(2, 64, 4, 64).transpose(1, 2)  # (B, H, T, D) over (B, T, H, D) memory, as the model's views
    first = ta._tma_args(ta._Desc(x, 16), meta)
    assert ta._tma_args(ta._Desc(x, 16), meta) is first and len(made) == 1  # the same tensor and tile: kept
    others = [ta._Desc(x[:, :, :32], 16),  # same address, fewer rows
              ta._Desc(buf.view(2, 4, 64, 64), 16),  # same address and shape, other strides
              ta._Desc(x, 32),  # another tile
              ta._Desc(buf.view(torch.int32).view(2, 64, 4, 64).transpose(1, 2), 16)]  # another dtype
    for desc in others:
        ta._tma_args(desc, meta)
    assert len(made) == 5 and len(set(made)) == 5
    assert ta._tma_args(ta._Desc(x, 16), {"swizzle": 2}) != first  # another swizzle of the same tile
    before = len(made)
    ta._tma_args(ta._Desc(x, 16), None)  # read through pointers: holds the tensor itself, so never kept
    ta._tma_args(ta._Desc(x, 16), None)
    assert len(made) == before + 2


def test_launch_path_choice():
    # The direct CompiledKernel.run launch needs a compiled kernel, so it cannot run under the CPU interpreter:
    # here the standard launch is the one path (test_gpu_launch_paths_agree compares both on the GPU). This checks
    # that the direct path and the TMA paths are chosen only on Triton 3.6 and that importing the backend needs
    # nothing from 3.4+.
    code = ("import sys, triton\n"
            "triton.__version__ = sys.argv[1]\n"
            "if sys.argv[1] < '3.4':\n"
            "    sys.modules['triton.knobs'] = sys.modules['triton.tools.tensor_descriptor'] = None; del triton.knobs\n"
            "from attention import triton as ta\n"
            "print(ta.DIRECT_LAUNCH, ta.TMA_DESCRIPTORS)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for version, direct in (("3.3.1", False), ("3.5.0", False), ("3.6.0", True), ("3.8.0", False)):
        out = subprocess.run([sys.executable, "-c", code, version], env=env, cwd=root, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [str(direct)] * 2, (version, out.stdout)  # the TMA paths: 3.6 only too


# --- the production path (autograd through the custom op, default/autotuned config) ------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", (16, 64))
@pytest.mark.parametrize("T", (1, 17, 67, 128, 200))
def test_causal_attention_autograd(T, D, dtype):
    H = 2
    qkv, (q, k, v), do = make_inputs(2, H, T, D, dtype, seed=T * D)
    o = ta.causal_attention(q, k, v)
    o.backward(do)
    ro, rdq, rdk, rdv = reference(qkv, do, H)
    assert o.shape == q.shape
    assert_close("out", o, ro, dtype)
    B, _, C3 = qkv.shape
    dq, dk, dv = (g.view(B, T, H, D).transpose(1, 2) for g in qkv.grad.split(C3 // 3, dim=2))
    assert_close("dq", dq, rdq, dtype, zero=T == 1)
    assert_close("dk", dk, rdk, dtype, zero=T == 1)
    assert_close("dv", dv, rdv, dtype)


@pytest.mark.parametrize("D", (32, 128))
def test_other_head_dims(D):
    check_kernels(1, 2, 67, D, torch.float32, seed=D)


def test_backward_accepts_any_output_layout():
    # attention_backward indexes O in the layout attention_forward returns; another layout must not go wrong.
    qkv, (q, k, v), do = make_inputs(2, 2, 37, 16, torch.float32, seed=3)
    q, k, v = q.detach(), k.detach(), v.detach()
    o, lse = ta.attention_forward(q, k, v)
    grads = ta.attention_backward(do, q, k, v, o.contiguous(), lse)
    for name, g, ref in zip(("dq", "dk", "dv"), grads, reference(qkv, do, 2)[1:]):
        assert_close(name, g, ref, torch.float32)


def test_contiguous_inputs_and_batched_heads():
    # Plain contiguous (B, H, T, D) tensors work as well as the model's views.
    B, H, T, D = 3, 2, 45, 32
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(DEVICE) for _ in range(3))
    o = ta.causal_attention(q, k, v)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-5, rtol=1e-5)


# --- torch.compile ----------------------------------------------------------------------------------------------
class TinyAttention(torch.nn.Module):
    def __init__(self, attn, C=32, H=2):
        super().__init__()
        self.qkv = torch.nn.Linear(C, 3 * C)
        self.attn, self.H, self.C = attn, H, C

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.H, C // self.H).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        return self.attn(q, k, v).transpose(1, 2).contiguous().view(B, T, C)


def _compiled_vs_sdpa(x, dtype=torch.float32):
    torch.manual_seed(0)
    model = TinyAttention(ta.causal_attention, C=x.shape[-1]).to(x.device)
    ref = TinyAttention(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), C=x.shape[-1])
    ref.load_state_dict(model.state_dict())
    ref.to(x.device)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, fullgraph=True)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        y = compiled(x)
        y_ref = ref(x)
    y.float().square().sum().backward()
    y_ref.float().square().sum().backward()
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    return y, y_ref, model.qkv.weight.grad, ref.qkv.weight.grad


def test_compile_fullgraph_matches_sdpa():
    x = torch.randn(2, 19, 32, device=DEVICE)
    y, y_ref, g, g_ref = _compiled_vs_sdpa(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


# --- bad input --------------------------------------------------------------------------------------------------
def _qkv(shape, dtype=torch.float32):
    return (torch.randn(shape).to(dtype) for _ in range(3))


@pytest.mark.parametrize("D", (8, 48, 256))
def test_rejects_head_dim(D):
    with pytest.raises(ValueError, match=r"head dims \(16, 32, 64, 128\).*--attention sdpa"):
        ta.causal_attention(*_qkv((1, 2, 8, D)))


@pytest.mark.parametrize("D", (8, 48, 96, 256))
def test_check_head_dim(D):
    # What the trainer calls at config time, before it builds the model.
    with pytest.raises(ValueError, match=r"head dims \(16, 32, 64, 128\), got D=%d.*n_head.*--attention sdpa" % D):
        ta.check_head_dim(D)
    for ok in ta.HEAD_DIMS:
        ta.check_head_dim(ok)


@pytest.mark.parametrize("dtype", (torch.float64, torch.int32), ids=str)
def test_rejects_dtype(dtype):
    with pytest.raises(ValueError, match="float16, bfloat16 and float32.*--attention sdpa"):
        ta.causal_attention(*_qkv((1, 2, 8, 16), dtype))


def test_rejects_mixed_dtypes():
    q, k, v = _qkv((1, 2, 8, 16))
    with pytest.raises(ValueError, match="--attention sdpa"):
        ta.causal_attention(q, k.half(), v)


@pytest.mark.parametrize("kshape", [(1, 2, 9, 16), (1, 3, 8, 16), (2, 2, 8, 16), (1, 2, 8, 32)])
def test_rejects_mismatched_or_cross_attention_shapes(kshape):
    q, _, v = _qkv((1, 2, 8, 16))
    k = torch.randn(kshape)
    with pytest.raises(ValueError, match="causal self-attention.*--attention sdpa"):
        ta.causal_attention(q, k, v)


def test_rejects_non_4d():
    with pytest.raises(ValueError, match=r"\(B, H, T, D\)"):
        ta.causal_attention(*_qkv((2, 8, 16)))


def test_no_cuda_no_interpreter_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    code = ("import torch\nfrom attention import triton as ta\nq = torch.randn(1, 2, 8, 16)\n"
            "try:\n    ta.causal_attention(q, q, q)\nexcept RuntimeError as e:\n    print(e)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "no CUDA GPU" in out.stdout and "--attention sdpa" in out.stdout and "TRITON_INTERPRET=1" in out.stdout


# --- GPU only ---------------------------------------------------------------------------------------------------
def grads_of(qkv, B, H, T, D):
    return [g.view(B, T, H, D).transpose(1, 2) for g in qkv.grad.split(H * D, dim=2)]


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


@gpu_only
# T = 1 at both head dims: on Hopper the forward takes pointers at D = 64 and TMA descriptors at D = 128.
@pytest.mark.parametrize("B,H,T,D", [(16, 12, 1024, 64), (2, 4, 1000, 64), (2, 4, 4097, 64), (4, 6, 1024, 128),
                                     (1, 2, 16384, 64), (3, 2, 1, 64), (3, 2, 1, 128)])
def test_gpu_bf16(B, H, T, D):
    dtype = torch.bfloat16
    qkv, (q, k, v), do = make_inputs(B, H, T, D, dtype, seed=T)
    ref = reference(qkv, do, H)
    for _ in range(2):  # the first call autotunes and compiles, later ones take the direct launch path
        qkv.grad = None
        o = ta.causal_attention(q, k, v)
        o.backward(do)
        for name, x, r in zip(("out", "dq", "dk", "dv"), (o, *grads_of(qkv, B, H, T, D)), ref):
            assert_close(name, x, r, dtype, zero=T == 1 and name in ("dq", "dk"))
    if T == 1:
        return
    # Output and gradients no worse than PyTorch's own kernel (cuDNN here) on the same bf16 inputs; the fp64
    # reference is independent of both.
    ours = (o, *grads_of(qkv, B, H, T, D))
    qkv.grad = None
    o_sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    o_sdpa.backward(do)
    for name, x, y, r in zip(("out", "dq", "dk", "dv"), ours, (o_sdpa, *grads_of(qkv, B, H, T, D)), ref):
        err, err_sdpa = rel_err(x, r), rel_err(y, r)
        assert err <= 1.5 * err_sdpa + 1e-4, f"{name}: rel err {err:.3g}, sdpa's {err_sdpa:.3g}"


@gpu_only
# Each head dim and dtype once, not all four pairs: D = 16 and 32 take the same configs and code, the dtypes differ.
@pytest.mark.parametrize("D,dtype", [(16, torch.float16), (32, torch.float32)], ids=str)
def test_gpu_other_dtypes_and_dims(D, dtype):
    check_kernels(2, 3, 517, D, dtype, seed=D)


@gpu_only
@pytest.mark.parametrize("i", range(len(config_cases((64, 128)))))
def test_gpu_every_config(i):
    # Every config of each head dim's lists must compile and run at that head dim (no OutOfResources).
    D, fwd, dq, dkdv = config_cases((64, 128))[i]
    check_kernels(2, 3, 1000, D, torch.bfloat16, seed=i, fwd_config=fwd, dq_config=dq, dkdv_config=dkdv)


@gpu_only
def test_gpu_long_rows_64bit_offsets():
    # The model's fused qkv views have stride_t = 3·H·D = 12,288 at H=32, D=128: row offsets t·stride_t pass 2^31
    # from t = 174,763 on (int32 offsets read out of bounds there: cudaErrorIllegalAddress). The fp64 reference
    # for a few rows: outputs and dQ of first, middle and last query rows; dK, dV of the last key rows (which only
    # the last query rows see). Explicit configs: autotuning at this size would take minutes.
    B, H, T, D, dtype = 1, 32, 180_000, 128, torch.bfloat16
    qkv, (q, k, v), do = make_inputs(B, H, T, D, dtype, seed=0)
    assert (T - 1) * q.stride(2) > 2**31
    q, k, v = q.detach(), k.detach(), v.detach()
    cfg = lambda c: ta.configs_for(c, D)[0]  # noqa: E731
    o, lse = ta.attention_forward(q, k, v, cfg(ta.FWD_CONFIGS), tma=False)
    if ta._use_tma(ta.FWD_TMA_CONFIGS, q, k, v):  # Hopper: the TMA forward (taken at D = 128) must give the same bits
        o_tma, lse_tma = ta.attention_forward(q, k, v, cfg(ta.FWD_TMA_CONFIGS), tma=True)
        assert torch.equal(o_tma, o) and torch.equal(lse_tma, lse)
    dq, dk, dv = ta.attention_backward(do, q, k, v, o, lse, cfg(ta.DQ_CONFIGS), cfg(ta.DKDV_CONFIGS), tma=False)
    if ta._use_tma(ta.DQ_TMA_CONFIGS, q, k, v, do):  # and the TMA backward the pointer backward's, at its configs
        configs = cfg(ta.DQ_TMA_CONFIGS), cfg(ta.DKDV_TMA_CONFIGS)
        grads_tma = ta.attention_backward(do, q, k, v, o, lse, *configs, tma=True)
        grads_ptr = ta.attention_backward(do, q, k, v, o, lse, *configs, tma=False)
        assert all(torch.equal(a, b) for a, b in zip(grads_tma, grads_ptr))
        del grads_tma, grads_ptr
    results = {"tl": (o, dq, dk, dv)}
    if ta._use_gluon(q, k, v, do):  # sm90: the Gluon kernels at this size too, held to the same fp64 rows
        o_gluon, lse_gluon = ta.attention_forward(q, k, v, gluon=True)
        results["gluon"] = (o_gluon, *ta.attention_backward(do, q, k, v, o_gluon, lse_gluon, gluon=True))
    rows = torch.tensor([0, 1, 2, T // 2, T - 3, T - 2, T - 1], device="cuda")
    last = slice(4, 7)  # rows[last] = the last three
    for h in (0, H - 1):
        qh, kh, vh, doh = (x[0, h].double() for x in (q, k, v, do))
        s = (qh[rows] @ kh.T) * D**-0.5
        s = s.masked_fill(torch.arange(T, device="cuda")[None, :] > rows[:, None], float("-inf"))
        p = s.softmax(-1)
        dp = doh[rows] @ vh.T
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))
        keys = rows[last]  # key j is seen by queries t >= j only: for the last keys, by the last rows alone
        ref = {"out": p @ vh, "dq": ds @ kh * D**-0.5, "dk": ds[last][:, keys].T @ qh[keys] * D**-0.5,
               "dv": p[last][:, keys].T @ doh[keys]}
        for path, (o_, dq_, dk_, dv_) in results.items():
            got = {"out": o_[0, h, rows], "dq": dq_[0, h, rows], "dk": dk_[0, h, keys], "dv": dv_[0, h, keys]}
            for name in ref:
                assert_close(f"{path} head {h} {name}", got[name], ref[name], dtype)
    for path, grads in results.items():
        for name, x in zip(("out", "dq", "dk", "dv"), grads):
            assert torch.isfinite(x).all(), (path, name)


@gpu_only
def test_gpu_many_batch_heads():
    # B·H = 70,000 programs per query tile: more than grid axis 1 holds (65,535), so the grid folds.
    B, H, T, D, dtype = 7000, 10, 5, 64, torch.bfloat16
    qkv, (q, k, v), do = make_inputs(B, H, T, D, dtype, seed=1)
    ref = reference(qkv, do, H)
    for _ in range(2):  # autotuning call, then the direct launch
        qkv.grad = None
        o = ta.causal_attention(q, k, v)
        o.backward(do)
        for name, x, r in zip(("out", "dq", "dk", "dv"), (o, *grads_of(qkv, B, H, T, D)), ref):
            assert_close(name, x, r, dtype)


@gpu_only
def test_gpu_takes_tma_on_hopper():
    # The forward at D = 128, the backward at D = 64 and 128, 16-bit inputs only.
    hopper = torch.cuda.get_device_capability()[0] >= 9
    for D, dtype, fwd, bwd in ((128, torch.bfloat16, hopper, hopper), (64, torch.float16, False, hopper),
                               (32, torch.bfloat16, False, False), (128, torch.float32, False, False)):
        _, (q, k, v), do = make_inputs(2, 768 // D, 64, D, dtype, seed=0)
        assert ta._use_tma(ta.FWD_TMA_CONFIGS, q, k, v) == fwd, (D, dtype)
        assert ta._use_tma(ta.DQ_TMA_CONFIGS, q, k, v, do) == bwd, (D, dtype)
    _, (q, k, v), do = make_inputs(2, 6, 64, 128, torch.bfloat16, seed=0)
    odd = torch.empty(2 * 6 * 64 * 128 + 1, dtype=do.dtype, device=do.device)[1:].view(do.shape)
    assert not ta._use_tma(ta.DQ_TMA_CONFIGS, q, k, v, odd)  # dO's base 2 bytes off: pointers
    for T in (ta.BWD_TMA_MIN_T - 1, ta.BWD_TMA_MIN_T):  # the backward takes TMA from BWD_TMA_MIN_T on
        _, (q, k, v), do = make_inputs(1, 2, T, 64, torch.bfloat16, seed=0)
        assert ta._bwd_uses_tma(q, k, v, do) == (hopper and T >= ta.BWD_TMA_MIN_T), T


@gpu_only
@pytest.mark.parametrize("D", (64, 128))  # at 128 on Hopper the forward's arguments are TMA descriptors
def test_gpu_launch_paths_agree(monkeypatch, D):
    # The standard launch (autotuner[grid](...)) and the direct CompiledKernel.run launch run the same compiled
    # kernels: their results must be bitwise equal.
    B, H, T = 2, 4, 1000
    qkv, (q, k, v), do = make_inputs(B, H, T, D, torch.bfloat16, seed=2)
    monkeypatch.setattr(ta, "_COMPILED", {})
    results = {}
    for direct in (False, True, True):  # the second direct call is the one that skips Triton's launch path
        monkeypatch.setattr(ta, "DIRECT_LAUNCH", direct)
        qkv.grad = None
        o = ta.causal_attention(q, k, v)
        o.backward(do)
        results[direct] = (o.detach().clone(), qkv.grad.clone())
    assert len(ta._COMPILED) == 3  # the direct path cached (and then launched) all three kernels
    for a, b in zip(results[False], results[True]):
        assert torch.equal(a, b)


@gpu_only
def test_gpu_backward_is_deterministic(monkeypatch):
    # The tl backward, which deterministic() asks for (the Gluon backward's dQ is not bitwise repeatable).
    monkeypatch.setattr(ta, "_DETERMINISTIC", True)
    qkv, (q, k, v), do = make_inputs(4, 12, 1024, 64, torch.bfloat16, seed=0)
    first = None
    for _ in range(10):
        qkv.grad = None
        ta.causal_attention(q, k, v).backward(do)
        if first is None:
            first = qkv.grad.clone()
        assert torch.equal(qkv.grad, first)


@gpu_only
# T = 256: the tl kernels; T = 4096 at D = 64 (C = 128, 2 heads): on sm_90 the Gluon backward (GLUON_BWD_MIN_T).
@pytest.mark.parametrize("T", (256, 4096))
def test_gpu_compile_fullgraph_bf16(T):
    x = torch.randn(4, T, 128, device="cuda")
    y, y_ref, g, g_ref = _compiled_vs_sdpa(x, dtype=torch.bfloat16)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(g, g_ref, atol=5e-2, rtol=5e-2)


# --- the Gluon forward (attention/hopper.py, sm_90) ----------------------------------------------------------------
def sm90_only(test):
    """A GPU test (gpu_only) that also needs sm_90 and the Triton release the Gluon forward was written for."""
    return gpu_only(pytest.mark.skipif(not (CUDA and ta.GLUON and torch.cuda.get_device_capability() == (9, 0)),
                                       reason="the Gluon forward runs on sm_90 (H100, H200) with Triton 3.6.0")(test))


@sm90_only
# T against the 128-row tile of two 64-row warpgroups: 1 (Triton specialises T = 1), 17 (the first warpgroup's rows
# partly filled), 64 (the second's empty), 65 (the second's partly filled), 128 (one full tile), 129 (a second tile of
# one row), 1000 and 4097 (the K/V ring wraps). fp16 changes the tiles' element type, not how T is tiled: one T.
@pytest.mark.parametrize("dtype,T", [(torch.bfloat16, T) for T in (1, 17, 64, 65, 128, 129, 1000, 4097)]
                         + [(torch.float16, 1000)], ids=str)
@pytest.mark.parametrize("D", (64, 128))
def test_gpu_gluon_forward(dtype, D, T):
    # Every output element written (poisoned first), O and lse against fp64, and no worse than the tl kernel's O.
    B, H = 2, 3
    qkv, (q, k, v), _ = make_inputs(B, H, T, D, dtype, seed=T + D)
    q, k, v = q.detach(), k.detach(), v.detach()
    o, lse = ta._bthd(q).fill_(float("nan")), torch.full((B, H, T), float("nan"), device="cuda")
    ta._gluon_kernels().forward(q, k, v, o, lse)
    ro = attention_fp64(q, k, v)
    assert_close("out", o, ro, dtype)
    s = (q.double() @ k.double().transpose(-1, -2)) * D**-0.5
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1) / torch.log(torch.tensor(2.0)), atol=1e-4,
                               rtol=0)  # base 2, as the backward reads it
    o_tl, _ = ta.attention_forward(q, k, v, gluon=False)
    assert rel_err(o, ro) <= 1.1 * rel_err(o_tl, ro) + 1e-5
    # The second call takes the direct launch (_Direct, the kept descriptors): the same bits.
    o2, lse2 = ta._bthd(q).fill_(float("nan")), torch.full((B, H, T), float("nan"), device="cuda")
    ta._gluon_kernels().forward(q, k, v, o2, lse2)
    assert torch.equal(o2, o) and torch.equal(lse2, lse)


@sm90_only
@pytest.mark.parametrize("B,H,T,D", [(2, 12, 4096, 64), (4, 6, 2000, 128)])
def test_gpu_default_forward_takes_gluon(B, H, T, D):
    """Where GLUON_MIN_T says so, the backend's own forward is the Gluon kernel's, at training-like shapes (hundreds of
    programs, the K/V ring wrapping many times): O and lse against fp64 and the tl kernel, every element written."""
    _, (q, k, v), _ = make_inputs(B, H, T, D, torch.bfloat16, seed=B * T + D)
    q, k, v = q.detach(), k.detach(), v.detach()
    o, lse = ta._bthd(q).fill_(float("nan")), torch.full((B, H, T), float("nan"), device="cuda")
    ta._gluon_kernels().forward(q, k, v, o, lse)
    ro = attention_fp64(q, k, v)
    assert_close("out", o, ro, torch.bfloat16)
    o_tl, lse_tl = ta.attention_forward(q, k, v, gluon=False)
    assert rel_err(o, ro) <= 1.1 * rel_err(o_tl, ro) + 1e-5
    torch.testing.assert_close(lse, lse_tl, atol=1e-4, rtol=0)
    o_default, lse_default = ta.attention_forward(q, k, v)
    assert ta._prefers_gluon(q, k, v) and torch.equal(o_default, o) and torch.equal(lse_default, lse)


@sm90_only
def test_gpu_takes_gluon_on_sm90():
    for D, dtype, gluon in ((64, torch.bfloat16, True), (128, torch.float16, True), (32, torch.bfloat16, False),
                            (128, torch.float32, False)):
        _, (q, k, v), _ = make_inputs(2, 768 // D, 64, D, dtype, seed=0)
        assert ta._use_gluon(q, k, v) == gluon, (D, dtype)
    _, (q, k, v), _ = make_inputs(2, 6, 64, 128, torch.bfloat16, seed=0)
    odd = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")[1:].view(q.shape)
    assert not ta._use_gluon(odd, k, v)  # 2 bytes off 16-byte alignment: no TMA, the tl kernel


@sm90_only
# T as for the forward, against the backward's 128-key program (two warpgroups of 64 keys) and 64-row query steps:
# 1, 17, 64 (the second warpgroup's keys all past T), 65, 128, 129, 1000, 4097 (the Q/dO ring wraps many times).
@pytest.mark.parametrize("dtype,T", [(torch.bfloat16, T) for T in (1, 17, 64, 65, 128, 129, 1000, 4097)]
                         + [(torch.float16, 1000)], ids=str)
@pytest.mark.parametrize("D", (64, 128))
def test_gpu_gluon_backward(dtype, D, T):
    """dQ, dK, dV of the Gluon backward (every element written: poisoned first) against fp64, and no worse than the
    tl backward's; dK and dV bitwise repeatable (each written by one program), dQ (fp32 adds in any order) close."""
    B, H = 2, 3
    qkv, (q, k, v), do = make_inputs(B, H, T, D, dtype, seed=T + D + 7)
    _, *ref = reference(qkv, do, H)
    q, k, v = q.detach(), k.detach(), v.detach()
    o, lse = ta.attention_forward(q, k, v)
    runs = []
    for _ in range(2):  # the second call takes the direct launches
        grads = [ta._bthd(x).fill_(float("nan")) for x in (q, k, v)]
        ta._gluon_kernels().backward(do, q, k, v, o, lse, *grads)
        runs.append(grads)
    tl_grads = ta.attention_backward(do, q, k, v, o, lse, gluon=False)
    for name, x, r, t in zip(("dq", "dk", "dv"), runs[0], ref, tl_grads):
        assert_close(name, x, r, dtype, zero=T == 1 and name in ("dq", "dk"))
        if T > 1:
            assert rel_err(x, r) <= 1.1 * rel_err(t, r) + 1e-5, name
    assert torch.equal(runs[1][1], runs[0][1]) and torch.equal(runs[1][2], runs[0][2])
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=1e-2, rtol=1e-2)


@sm90_only
@pytest.mark.parametrize("B,H,T,D", [(2, 12, 4096, 64)])
def test_gpu_default_backward_takes_gluon_unless_deterministic(B, H, T, D):
    """Where GLUON_BWD_MIN_T says so, the backend's autograd backward is the Gluon kernel's (against fp64 at a
    training-like shape); with set_deterministic(True) or torch's deterministic mode it is the tl backward, bitwise
    repeatable."""
    qkv, (q, k, v), do = make_inputs(B, H, T, D, torch.bfloat16, seed=B * T + D)
    _, *ref = reference(qkv, do, H)
    assert ta._gluon_bwd_default(q.device, D, T, q.dtype) and ta._use_gluon(q, k, v, do)
    ta.causal_attention(q, k, v).backward(do)
    for name, x, r in zip(("dq", "dk", "dv"), grads_of(qkv, B, H, T, D), ref):
        assert_close(name, x, r, torch.bfloat16)
    o, lse = ta.attention_forward(q.detach(), k.detach(), v.detach())
    gluon = ta.attention_backward(do, q.detach(), k.detach(), v.detach(), o, lse, gluon=True)
    tl_grads = ta.attention_backward(do, q.detach(), k.detach(), v.detach(), o, lse, gluon=False)
    for switch in ("set_deterministic", "torch"):
        ta.set_deterministic(switch == "set_deterministic")
        torch.use_deterministic_algorithms(switch == "torch")
        try:
            assert not ta._gluon_bwd_default(q.device, D, T, q.dtype)
            grads = ta.attention_backward(do, q.detach(), k.detach(), v.detach(), o, lse)
        finally:
            ta.set_deterministic(False)
            torch.use_deterministic_algorithms(False)
        assert all(torch.equal(a, b) for a, b in zip(grads, tl_grads))
    assert not all(torch.equal(a, b) for a, b in zip(gluon, tl_grads))  # the default was not the tl backward
