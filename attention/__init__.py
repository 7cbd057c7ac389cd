"""Causal self-attention backends.

Every backend is a module in this package that defines one function with one signature:

    causal_attention(q, k, v) -> out      # q, k, v, out: (B, H, T, D); scale D**-0.5; causal mask

The model looks the function up by name, so swapping `--attention naive` for `--attention sdpa` or
`--attention triton` changes exactly one thing: how attention is computed.
"""
import importlib

BACKENDS = ("naive", "sdpa", "triton")


def get_attention(name):
    """Return the `causal_attention` function of backend `name`."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    # Imported on demand: the triton backend needs triton (and a GPU or TRITON_INTERPRET=1), the others do not.
    return importlib.import_module(f"attention.{name}").causal_attention
