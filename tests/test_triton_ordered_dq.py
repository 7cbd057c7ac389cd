"""The ordered-dQ backward experiment (attention/experiments/ordered_dq.py) against fp64 gradients and against the
backend's own two-kernel backward, under Triton's interpreter on the CPU (or on a GPU where there is one)."""
import pytest
import torch

from attention import triton as ta
from attention.experiments import ordered_dq as od
from test_triton_attention import assert_close, gpu_only, grads_of, make_inputs, reference, rel_err

CONFIGS = [(D, c) for D in (64, 128) for c in od.ORDERED_CONFIGS[D]]


# T not a multiple of any block, T below one block, and T = 1 (dQ and dK analytically zero), for every config;
# several key blocks per query tile and several query tiles per key block in each case with T >= 130.
@pytest.mark.parametrize("D,config", CONFIGS, ids=[f"D{D}-{c.kwargs}" for D, c in CONFIGS])
@pytest.mark.parametrize("T", [1, 37, 203])
def test_gradients_match_fp64_for_every_config(D, config, T):
    dtype = torch.float32
    qkv, (q, k, v), do = make_inputs(2, 2, T, D, dtype, seed=T)
    o, lse = ta.attention_forward(q.detach(), k.detach(), v.detach())
    dq, dk, dv = od.attention_backward(do, q.detach(), k.detach(), v.detach(), o, lse, config)
    _, *refs = reference(qkv, do, 2)
    for name, x, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), refs):
        assert_close(f"{name} T={T}", x, ref, dtype, zero=(T == 1 and name != "dv"))
    assert od._LOCKS[q.device][: 2 * 2 * -(-T // od.MIN_BLOCK_M1)].eq(0).all()  # every counter back to 0


def test_same_gradients_as_the_backend_and_bitwise_repeatable():
    """Another order of the same sums as attention/triton.py's backward, so equal to fp32 rounding; and the fixed
    order makes two calls identical to the bit."""
    qkv, (q, k, v), do = make_inputs(1, 3, 150, 64, torch.float32, seed=7)
    q, k, v = q.detach(), k.detach(), v.detach()
    o, lse = ta.attention_forward(q, k, v)
    ours = od.attention_backward(do, q, k, v, o, lse)
    again = od.attention_backward(do, q, k, v, o, lse)
    theirs = ta.attention_backward(do, q, k, v, o, lse)
    for a, b, c in zip(ours, again, theirs):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_autograd_through_the_module_matches_the_backend():
    qkv, (q, k, v), do = make_inputs(2, 2, 70, 32, torch.float32, seed=3)
    (grad,) = torch.autograd.grad(od.causal_attention(q, k, v), qkv, do)
    (expected,) = torch.autograd.grad(ta.causal_attention(q, k, v), qkv, do)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)


# --- GPU only: programs run side by side, so the counters' waits are real (the interpreter runs one at a time) ----
@gpu_only
@pytest.mark.parametrize("B,H,T,D", [(16, 12, 1024, 64), (2, 4, 4097, 64), (1, 2, 16384, 64), (4, 6, 1024, 128),
                                     (1, 2, 16384, 128)])  # the fp64 reference holds B·H·T² values
def test_gpu_bf16_no_worse_than_sdpa_and_bitwise_repeatable(B, H, T, D):
    qkv, (q, k, v), do = make_inputs(B, H, T, D, torch.bfloat16, seed=T)
    ref = reference(qkv, do, H)
    first = None
    for _ in range(5):  # autotuning, then the direct launch; every call must give the same bits
        qkv.grad = None
        od.causal_attention(q, k, v).backward(do)
        first = qkv.grad.clone() if first is None else first
        assert torch.equal(qkv.grad, first)
    ours = grads_of(qkv, B, H, T, D)
    qkv.grad = None
    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)
    for name, x, y, r in zip(("dq", "dk", "dv"), ours, grads_of(qkv, B, H, T, D), ref[1:]):
        err, err_sdpa = rel_err(x, r), rel_err(y, r)
        assert err <= 1.5 * err_sdpa + 1e-4, f"{name}: rel err {err:.3g}, sdpa's {err_sdpa:.3g}"
