"""Experiment (kernel notes, v8): ordered_dq.py's five-matmul backward with each dQ share added by an fp32 atomic.

The counterpart that tells v7's two costs apart: the same kernel, the same configs, but no program ever waits for
another; the shares land in an fp32 buffer (zeroed first) in whatever order they arrive, so dQ is not bitwise
repeatable. A sweep beside v7 (`scripts/sweep_seq_len.py --variant ordered=... --variant atomic=...`) says how much
of v7's time is the waiting and how much is the kernel itself (no software pipelining with atomics in the loop).
"""
import torch

from attention import triton as base
from attention.experiments import ordered_dq


class _FlashAttention(base._FlashAttention):
    """attention/triton.py's forward with the atomic-dQ backward (eager only: a timing experiment)."""

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        return ordered_dq.attention_backward(do, q, k, v, o, lse, ordered=False)


def causal_attention(q, k, v):
    base._check(q, k, v)
    return _FlashAttention.apply(q, k, v)
