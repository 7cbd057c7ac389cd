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

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# ‖x − ref‖ / ‖ref‖ and max |x − ref| / max(1, max |ref|) bounds. fp32: exact fp32 arithmetic (ieee dots on the
# GPU); fp16/bf16: the inputs are exact, the error is the rounding of P/dS operands and of the stored outputs.
REL_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
MAX_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def make_inputs(B, H, T, D, dtype, seed, device=DEVICE):
    """A leaf (B, T, 3·H·D) tensor and q, k, v as the model's non-contiguous (B, H, T, D) views of it."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(B, T, 3 * H * D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
    do = torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype)
    return qkv, (q, k, v), do


def reference(qkv, do, H):
    """fp64 naive causal attention and its gradients w.r.t. q, k, v, from the same inputs."""
    B, T, _ = qkv.shape
    D = qkv.shape[-1] // (3 * H)
    x = qkv.detach().double().requires_grad_()
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in x.split(H * D, dim=2))
    s = (q @ k.transpose(-2, -1)) * D**-0.5
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), float("-inf"))
    o = s.softmax(-1) @ v
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


# --- every autotune config, each on a T that is not a multiple of its blocks -----------------------------------
N_CASES = max(len(ta.FWD_CONFIGS), len(ta.DQ_CONFIGS), len(ta.DKDV_CONFIGS))
MASKED_T = (17, 67, 200)  # none is a multiple of 16, so every block size of every config is partial at the end
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("i", range(N_CASES))
def test_every_config(i, dtype):
    # Config i of each kernel (the shorter lists wrap around), in every dtype, with T and D varying across cases.
    fwd, dq, dkdv = (c[i % len(c)] for c in (ta.FWD_CONFIGS, ta.DQ_CONFIGS, ta.DKDV_CONFIGS))
    j = i + DTYPES.index(dtype)
    check_kernels(2, 3, MASKED_T[j % 3], (16, 64)[j % 2], dtype, seed=j, fwd_config=fwd, dq_config=dq,
                  dkdv_config=dkdv)


def test_config_lists_cover_and_obey_invariants():
    assert N_CASES == max(map(len, (ta.FWD_CONFIGS, ta.DQ_CONFIGS, ta.DKDV_CONFIGS)))
    for cfgs, ok in ((ta.FWD_CONFIGS, ta._fwd_ok), (ta.DQ_CONFIGS, ta._dq_ok), (ta.DKDV_CONFIGS, ta._dkdv_ok)):
        assert cfgs and all(ok(c) for c in cfgs)
    assert not ta._fwd_ok(triton.Config(dict(BLOCK_M=32, BLOCK_N=64)))
    assert not ta._dkdv_ok(triton.Config(dict(BLOCK_N1=32, BLOCK_M1=64)))


@pytest.mark.parametrize("config", [triton.Config(dict(BLOCK_M=32, BLOCK_N=64)),
                                    triton.Config(dict(BLOCK_M=48, BLOCK_N=32))])
def test_wrong_tiling_is_rejected(config):
    # BLOCK_M < BLOCK_N broke the official tutorial's causal forward; the kernel must refuse it, not compute it.
    _, (q, k, v), _ = make_inputs(1, 1, 70, 16, torch.float32, seed=0)
    with pytest.raises(Exception, match="diagonal tile"):
        ta.attention_forward(q.detach(), k.detach(), v.detach(), config)


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
@gpu_only
@pytest.mark.parametrize("B,H,T,D", [(16, 12, 1024, 64), (2, 4, 1000, 64), (2, 4, 4097, 64), (4, 6, 1024, 128),
                                     (1, 2, 16384, 64), (3, 2, 1, 64)])
def test_gpu_bf16(B, H, T, D):
    dtype = torch.bfloat16
    qkv, (q, k, v), do = make_inputs(B, H, T, D, dtype, seed=T)
    ro, rdq, rdk, rdv = reference(qkv, do, H)
    for _ in range(2):  # the first call autotunes and compiles, later ones take the direct launch path
        qkv.grad = None
        o = ta.causal_attention(q, k, v)
        o.backward(do)
        grads = [g.view(B, T, H, D).transpose(1, 2) for g in qkv.grad.split(H * D, dim=2)]
        for name, x, ref in zip(("out", "dq", "dk", "dv"), (o, *grads), (ro, rdq, rdk, rdv)):
            assert_close(name, x, ref, dtype, zero=T == 1 and name in ("dq", "dk"))
    # No worse than PyTorch's own kernel on the same bf16 inputs (the reference is independent of both).
    qkv.grad = None
    o_sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if T > 1:
        err, err_sdpa = ((o.double() - ro).norm() / ro.norm()).item(), ((o_sdpa.double() - ro).norm() / ro.norm()).item()
        assert err <= 1.5 * err_sdpa + 1e-4, (err, err_sdpa)


@gpu_only
@pytest.mark.parametrize("dtype", (torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("D", (16, 32))
def test_gpu_other_dtypes_and_dims(D, dtype):
    check_kernels(2, 3, 517, D, dtype, seed=D)


@gpu_only
@pytest.mark.parametrize("i", range(N_CASES))
def test_gpu_every_config(i):
    fwd, dq, dkdv = (c[i % len(c)] for c in (ta.FWD_CONFIGS, ta.DQ_CONFIGS, ta.DKDV_CONFIGS))
    for D in (64, 128):
        try:
            check_kernels(2, 3, 1000, D, torch.bfloat16, seed=i, fwd_config=fwd, dq_config=dq, dkdv_config=dkdv)
        except triton.runtime.errors.OutOfResources:  # too much shared memory at this D: the autotuner skips it too
            pass


@gpu_only
def test_gpu_backward_is_deterministic():
    qkv, (q, k, v), do = make_inputs(4, 12, 1024, 64, torch.bfloat16, seed=0)
    first = None
    for _ in range(10):
        qkv.grad = None
        ta.causal_attention(q, k, v).backward(do)
        if first is None:
            first = qkv.grad.clone()
        assert torch.equal(qkv.grad, first)


@gpu_only
def test_gpu_compile_fullgraph_bf16():
    x = torch.randn(4, 256, 128, device="cuda")
    y, y_ref, g, g_ref = _compiled_vs_sdpa(x, dtype=torch.bfloat16)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(g, g_ref, atol=5e-2, rtol=5e-2)
