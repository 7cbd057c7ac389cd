"""attention/hopper.py's Gluon kernels run on the CPU, by tests/gluon_emulator.py (Triton's interpreter cannot run
Gluon): the forward and the backward, with the tl kernels around the backward in the interpreter, against fp64 at
both head dims, at T that cut the tiles and wrap the TMA rings, every output element written (poisoned first).
Each case runs under three orders of the partitions and the TMA engine, and the emulator fails a test on a race, a
missing fence or a deadlock. The sm_90 compile tests (test_hopper_kernel.py) check what it does not model: layouts,
registers, spills; the GPU tests (test_triton_attention.py) judge the compiled kernels."""
import os

import pytest
import torch

from attention import triton as ta
from test_triton_attention import assert_close, make_inputs, reference

pytestmark = [
    pytest.mark.skipif(not ta.GLUON, reason="Gluon kernels written for Triton 3.6.0"),
    # The tl kernels around the Gluon backward run in Triton's interpreter, which tests/conftest.py turns on without a
    # GPU; on a GPU the Gluon kernels themselves run (the gpu tests of test_triton_attention.py).
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="emulation runs where Triton interprets"),
]

# (schedule, TMA timing): random turns; each partition's every window exploited by the others, with TMA operations
# completing as late as possible (a missing wait reads memory still in flight) or at once (a slot released too early
# is overwritten while still read).
ORDERS = [("random", "random"), ("others-first", "lazy"), ("others-first", "eager")]
# 1 and 17 (the first warpgroup's rows partly filled), 65 (the second's), 129 (a second tile of one row): B=2, H=2;
# 600 (the forward's K/V ring of 3 slots and the backward's Q/dO ring wrap): B=1, H=2.
SHAPES = [(2, 2, 1), (2, 2, 17), (2, 2, 65), (2, 2, 129), (1, 2, 600)]


@pytest.fixture(params=ORDERS, ids=lambda order: "-".join(order))
def emulated(request, monkeypatch):
    """hopper.py's launches of Gluon kernels go to the emulator, its tl kernels to Triton's interpreter."""
    from gluon_emulator import Emulator, tma_reduce_add
    from triton.experimental.gluon._runtime import GluonJITFunction
    from attention import hopper

    schedule, tma = request.param
    emulator = Emulator(seed=0, schedule=schedule, tma=tma, overrides={"_tma_reduce_add": tma_reduce_add})

    def run(kernel, grid, args, constexprs, device):
        if isinstance(kernel, GluonJITFunction):
            emulator.launch(kernel, grid, ta._made(args), constexprs)
        else:
            kernel[grid](*ta._made(args), **constexprs)

    monkeypatch.setattr(hopper, "_run", run)
    return hopper


@pytest.mark.parametrize("D", (64, 128))
def test_forward_and_backward_match_fp64(emulated, D):
    for i, (B, H, T) in enumerate(SHAPES):
        dtype = torch.float16 if i == 2 else torch.bfloat16
        qkv, (q, k, v), do = make_inputs(B, H, T, D, dtype, seed=T + D)
        q, k, v = q.detach(), k.detach(), v.detach()
        o, lse = ta._bthd(q).fill_(float("nan")), torch.full((B, H, T), float("nan"))
        emulated.forward(q, k, v, o, lse)
        ro, *grads = reference(qkv, do, H)
        assert_close(f"out (T={T})", o, ro, dtype)
        s = (q.double() @ k.double().transpose(-1, -2)) * D**-0.5
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1) / torch.log(torch.tensor(2.0)), atol=1e-4,
                                   rtol=0)
        dq, dk, dv = (ta._bthd(x).fill_(float("nan")) for x in (q, k, v))
        emulated.backward(do, q, k, v, o, lse, dq, dk, dv)
        for name, x, r in zip(("dq", "dk", "dv"), (dq, dk, dv), grads):
            assert_close(f"{name} (T={T})", x, r, dtype, zero=T == 1 and name != "dv")
