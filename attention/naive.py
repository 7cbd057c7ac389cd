"""Hand-written attention, as in the original GPT-2 code and nanoGPT's fallback path.

It materializes the full T×T score matrix in GPU memory (and, for the backward pass, keeps the T×T softmax
output): O(T²) memory traffic per head. This is the baseline that flash attention removes.
"""
import torch
import torch.nn.functional as F


def causal_attention(q, k, v):
    T, D = q.size(-2), q.size(-1)
    att = (q @ k.transpose(-2, -1)) * D**-0.5  # (B, H, T, T)
    # Built per call rather than kept as a buffer: the function stays stateless, and the T×T bool mask is
    # tiny next to the (B, H, T, T) scores it masks.
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~causal, float("-inf"))
    att = F.softmax(att, dim=-1)
    return att @ v
