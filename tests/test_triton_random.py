"""A randomized search for wrong results in the triton backend: random shapes (B, H, T including 1 and primes, D)
and dtypes, forward and backward through the autograd path the model uses, against fp64 naive attention.

CI runs a fixed list of seeds under the CPU interpreter. For a longer search (on a GPU, where it is fast):
    TRITON_RANDOM_CASES=2000 python -m pytest -q tests/test_triton_random.py
"""
import os
import random

import pytest
import torch

from attention import triton as ta
from test_triton_attention import CUDA, assert_close, make_inputs, reference

PRIMES = [2, 3, 5, 7, 13, 31, 61, 97, 127, 131, 257, 509, 1021, 2053]
N_CASES = int(os.environ.get("TRITON_RANDOM_CASES", "40"))


def draw(seed):
    rng = random.Random(seed)
    max_t = 4096 if CUDA else 160  # the interpreter costs seconds per launch at a few hundred tokens
    T = rng.choice([1, rng.randint(2, max_t)] + [p for p in PRIMES if p <= max_t])
    D = rng.choice(ta.HEAD_DIMS if CUDA else [d for d in ta.HEAD_DIMS if d <= 64])
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    return dict(B=rng.randint(1, 3), H=rng.randint(1, 4), T=T, D=D, dtype=dtype)


@pytest.mark.parametrize("seed", range(N_CASES))
def test_random_shapes_against_fp64(seed):
    case = draw(seed)
    B, H, T, D, dtype = case.values()
    qkv, (q, k, v), do = make_inputs(B, H, T, D, dtype, seed)
    ro, rdq, rdk, rdv = reference(qkv, do, H)
    o = ta.causal_attention(q, k, v)
    o.backward(do)
    grads = [g.view(B, T, H, D).transpose(1, 2) for g in qkv.grad.split(H * D, dim=2)]
    for name, x, ref in zip(("out", "dq", "dk", "dv"), (o, *grads), (ro, rdq, rdk, rdv)):
        assert_close(f"{case} {name}", x, ref, dtype, zero=T == 1 and name in ("dq", "dk"))
