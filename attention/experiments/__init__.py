"""Kernel experiments: variants of a backend that scripts/bench_attention.py and scripts/sweep_seq_len.py time beside
it (--variant NAME=PATH) until a measurement decides whether they replace it. Not backends."""
