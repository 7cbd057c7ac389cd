"""Causal self-attention as our own FlashAttention-2 kernels in Triton (forward and backward).

Algorithm (Dao 2023, "FlashAttention-2"). Per (batch, head), with S = Q Kᵀ·D^-½ causally masked and P = softmax(S):

* Forward, one program per BLOCK_M query rows. It walks the key/value tiles left of the diagonal, keeping the
  running row max m_i, the running row sum l_i of exp(S - m_i) and the unnormalised output acc; when m_i grows,
  l_i and acc are rescaled by exp(m_old - m_new). Exponentials are exp2 with log2(e) folded into the scale, so
  every score costs one FMA and one exp2. Tiles wholly above the diagonal are never visited and only the
  BLOCK_M/BLOCK_N tiles that straddle it pay for the mask (a separate, second loop). It writes O = acc / l_i and
  the row logsumexp lse = m_i + log2(l_i) (base 2), which lets the backward rebuild P without a max/sum pass.
* Backward, with delta = rowsum(dO ∘ O) (= rowsum(P ∘ dP)) and dS = P ∘ (dP - delta), two kernels and no atomics:
  - the dQ kernel, one program per BLOCK_M2 query rows, first computes delta for its rows from the O and dO tiles
    it loads anyway (the FA-2 "preprocess" kernel, fused: one launch and one read of dO fewer), stores it, then
    walks the key tiles left of the diagonal accumulating dQ = dS K;
  - the dK/dV kernel, one program per BLOCK_N1 key rows, keeps its K and V tiles in registers and walks the query
    tiles below the diagonal in BLOCK_M1 chunks accumulating dV = Pᵀ dO and dK = dSᵀ Q.
  Every output element is written by exactly one program, so the backward is deterministic (bitwise repeatable).

Memory traffic per (batch, head), N = T·D elements: forward reads Q once and K, V once per query tile (T/BLOCK_M
times, mostly from L2) and writes O and lse; the dQ kernel reads Q, dO, O once and K, V once per query tile; the
dK/dV kernel reads K, V once and Q, dO, lse, delta once per key tile. Nothing of size T×T touches memory.

Layout: the kernels index q, k, v through one shared set of (batch, head, time) strides with unit stride along D,
which is what the model's non-contiguous views of its fused (B, T, 3C) qkv projection have (no copies); other
layouts are copied first. dO may have any strides with unit stride along D. O and dQ/dK/dV are allocated in
(B, T, H, D) memory order and returned as (B, H, T, D) views, so the model's `transpose(1, 2).contiguous()` after
attention is free and their strides need not be passed. Row offsets into the strided inputs are int64 (T·stride_t
passes 2^31 at long T); the grid folds B·H over two axes, so any batch·head count launches.

Hopper: on sm_90+ the forward at D = 128 reads q, k, v and writes O, and the backward at D = 64 and 128 from T = 1024
reads q, k, v and dO, through host-side TMA tensor descriptors (4-D, over the (B, H, T, D) views; rows past T load
as zeros and are not stored), the same kernels with TMA=True; elsewhere, and always under the interpreter unless a
test asks, through pointers (_use_tma and _bwd_uses_tma say why). attention/hopper.py holds a warp-specialised forward
and backward for sm_90 in Gluon with the same outputs, which the backend takes where they were measured faster
(GLUON_MIN_T, GLUON_BWD_MIN_T), the backward unless bitwise-repeatable gradients are asked for (deterministic()).

Launches: Triton's generic launch path costs more host time than these kernels take on the GPU at the GPT-2 shape,
so after the first (autotuning) call the compiled kernels are launched directly, on the Triton version where that
was verified (see DIRECT_LAUNCH and _launch); elsewhere through Triton's standard launch.

Precision: loads, dots and stores use the input dtype with fp32 accumulation. fp32 inputs use
`input_precision="ieee"` dots (true fp32, slow; bf16/fp16 is the fast path), so every dtype matches an fp64
reference to its own rounding. Under TRITON_INTERPRET=1 (CPU tests) bf16 tiles are computed in fp32, because the
interpreter computes bf16 on raw bit patterns.

Integration: forward and backward are opaque `torch.library.custom_op`s with `register_fake`, tied together by a
`torch.autograd.Function`; that compiles with `torch.compile(fullgraph=True)` both on the GPU and on the CPU under
the interpreter (Dynamo never traces into Triton). Eager calls skip the dispatcher (see _FlashAttention).
"""
import functools
import inspect
import os

import torch
import triton
import triton.language as tl
from triton.runtime import driver

# Must match how triton itself decides (it reads the variable when a kernel is launched; conftest sets it early).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The direct launch (see _launch) relies on CompiledKernel.run's calling convention and on triton.knobs (3.4+),
# checked on the GPU with Triton 3.6 only. Other versions take Triton's standard launch: same kernels, same
# results, more host time per call.
_VERIFIED = triton.__version__.split(".")[:2] == ["3", "6"]
DIRECT_LAUNCH = not _INTERPRET and _VERIFIED
if DIRECT_LAUNCH:
    from triton import knobs
    from triton.backends.nvidia.driver import make_tensordesc_arg
# The kernels through host-side TMA descriptors (see _use_tma) likewise: Triton 3.6 only, where they ran on the GPU
# (the interpreter runs them too, where a test asks). Elsewhere the pointer path.
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None
TMA_DESCRIPTORS = _VERIFIED and TensorDescriptor is not None
# The warp-specialised Gluon forward (attention/hopper.py) runs only with the Triton release it was written and tested
# against (fp64-checked on the H100).
GLUON = triton.__version__ == "3.6.0"
# Per head dim, the T from which the forward takes the Gluon kernel: below it the tl kernel was faster on the H100
# (KERNEL_NOTES.md, v15: at D=64 T=1024, 0.1039 ms against 0.0918; the thresholds are the lowest T measured faster).
GLUON_MIN_T = {64: 4096, 128: 1024}
# Likewise for the backward (attention/hopper.py's five-matmul backward, dQ added up in fp32 by TMA reduce-add: not
# bitwise repeatable, so never while deterministic() holds). On the H100 it was 8-13% faster than the tl backward at
# D = 64 from T = 4096 and slower below; at D = 128 slower at every T, so D = 128 is absent (KERNEL_NOTES.md, v16).
GLUON_BWD_MIN_T = {64: 4096}
# Grid axes 1 and 2 hold at most 65,535 programs each; batch·head is folded over both (see _grid).
MAX_GRID_YZ = 65535
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# ----------------------------------------------------------------------------------------------------------------
# Autotune configurations, per head dim (D <= 64 and D = 128). Each kernel's causal tiling requires its diagonal
# tile to split evenly into the inner tiles of the loop over the other axis (the forward and dQ kernels stop their
# unmasked loop at a multiple of BLOCK_M, the dK/dV kernel starts its unmasked loop at a multiple of BLOCK_N1). A
# config that breaks this is an error here, at import, and a static assertion in the kernel.
# ----------------------------------------------------------------------------------------------------------------
def _fwd_ok(c):
    return c.kwargs["BLOCK_M"] % c.kwargs["BLOCK_N"] == 0


def _dq_ok(c):
    return c.kwargs["BLOCK_M2"] % c.kwargs["BLOCK_N2"] == 0


def _dkdv_ok(c):
    return c.kwargs["BLOCK_N1"] % c.kwargs["BLOCK_M1"] == 0


def _configs(names, ok, shapes):
    configs = [triton.Config(dict(zip(names, blocks)), num_warps=w, num_stages=s) for *blocks, w, s in shapes]
    bad = [c for c in configs if not ok(c)]
    if bad:
        raise ValueError(f"configs whose diagonal tile does not split into whole inner tiles: {bad}")
    return configs


# Chosen from the H100 survey (results/attention_configs_h100.json: every candidate of scripts/bench_attention.py
# at T = 512..16384 with B·T = 16384): per kernel and head dim two configs, between them within 1% of the best
# candidate at every T (small tiles at short T, large at long T). Two keep a first call's autotuning short.
FWD_CONFIGS = {
    64: _configs(("BLOCK_M", "BLOCK_N"), _fwd_ok, [(64, 64, 4, 3), (128, 64, 8, 3)]),
    128: _configs(("BLOCK_M", "BLOCK_N"), _fwd_ok, [(64, 64, 4, 3), (128, 128, 8, 3)]),
}
# The forward through TMA descriptors (Hopper, D = 128 only: see _use_tma), five candidate configs surveyed on the
# H200 (KERNEL_NOTES.md, v9): 64x64 w4 s3 was the best at every T. One config, so that the descriptors' block shapes
# (fixed when they are made, before the launch) are always the kernel's.
FWD_TMA_CONFIGS = {128: _configs(("BLOCK_M", "BLOCK_N"), _fwd_ok, [(64, 64, 4, 3)])}
DQ_CONFIGS = {
    64: _configs(("BLOCK_M2", "BLOCK_N2"), _dq_ok, [(64, 32, 4, 3), (64, 64, 4, 3)]),
    128: _configs(("BLOCK_M2", "BLOCK_N2"), _dq_ok, [(64, 32, 4, 3), (128, 64, 8, 3)]),
}
DKDV_CONFIGS = {
    64: _configs(("BLOCK_N1", "BLOCK_M1"), _dkdv_ok, [(64, 32, 4, 3), (128, 32, 4, 3)]),
    128: _configs(("BLOCK_N1", "BLOCK_M1"), _dkdv_ok, [(64, 32, 4, 3), (64, 64, 4, 2)]),
}
# The backward through TMA descriptors (Hopper, D = 64 and 128), from the H200 survey of every candidate through TMA
# and through pointers in one call (results/attention_configs_tma_h200.json, T = 1024, 4096, 16384): per kernel and
# head dim the one config within 4% of the best TMA candidate at every T (KERNEL_NOTES.md, v11).
DQ_TMA_CONFIGS = {64: _configs(("BLOCK_M2", "BLOCK_N2"), _dq_ok, [(64, 64, 4, 3)]),
                  128: _configs(("BLOCK_M2", "BLOCK_N2"), _dq_ok, [(128, 64, 8, 3)])}
DKDV_TMA_CONFIGS = {64: _configs(("BLOCK_N1", "BLOCK_M1"), _dkdv_ok, [(64, 32, 4, 3)]),
                    128: _configs(("BLOCK_N1", "BLOCK_M1"), _dkdv_ok, [(64, 64, 4, 2)])}
BWD_TMA_MIN_T = 1024  # below it the TMA backward lost at D = 64 (4% at T = 512) and gained 1% at D = 128
if any(len(c) != 1 for configs in (FWD_TMA_CONFIGS, DQ_TMA_CONFIGS, DKDV_TMA_CONFIGS) for c in configs.values()):
    raise ValueError("the TMA config lists hold one config per head dim: the descriptors take its block shapes")
if DQ_TMA_CONFIGS.keys() != DKDV_TMA_CONFIGS.keys():  # _bwd_uses_tma asks one list for both backward kernels
    raise ValueError("DQ_TMA_CONFIGS and DKDV_TMA_CONFIGS must cover the same head dims")


def configs_for(configs, head_dim):
    """The list of a kernel's configs (one of the dicts above) that applies to a head dim."""
    return configs[64 if head_dim <= 64 else 128]


# Under the interpreter there is nothing to tune (and autotune would need a do_bench callable): production calls
# use the first config of each list, tests run every config explicitly.


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------
# Triton compiles a variant per integer argument divisible by 16 or not. B·H and T_BUCKET take no part in addressing
# or tiling, so they are kept out of that: otherwise B·H = 24 and 192 compile (and autotune) every config twice.
_NOT_SPECIALIZED = ["BH", "T_BUCKET"]

@triton.jit
def _batch_head():
    """This program's batch·head index: the grid is (tiles, Y, Z) with batch·head = z·Y + y (see _grid)."""
    return tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)


@triton.jit
def _rows(base, offs_t, stride_t, offs_d):
    """Pointers to a (rows, HEAD_DIM) tile of a strided q/k/v/dO. The row offsets are int64: with the model's fused
    qkv views (stride_t = 3C) T·stride_t passes 2^31 at long T (H=32, D=128: T = 175,000)."""
    return base + offs_t.to(tl.int64)[:, None] * stride_t + offs_d[None, :]


@triton.jit
def _key_tile(ptrs, offs_n, T, MASKED: tl.constexpr, COMPUTE: tl.constexpr):
    """Load a K or V tile. Only the diagonal tiles (MASKED) may run past T: left of the diagonal every key index is
    < T, and those loads go unmasked."""
    if MASKED:
        tile = tl.load(ptrs, mask=offs_n[:, None] < T, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile.to(COMPUTE)


@triton.jit
def _bthd_offset(off_b, off_h, offs_t, offs_d, H, T, HEAD_DIM: tl.constexpr):
    """Offsets of a (rows, HEAD_DIM) tile of the (B, T, H, D)-ordered buffers we allocate (O, dQ, dK, dV): their
    strides follow from the shape, so they are not passed as arguments (fewer arguments, cheaper launches)."""
    return (off_b * T + offs_t[:, None]) * (H * HEAD_DIM) + off_h * HEAD_DIM + offs_d[None, :]  # off_b is int64


@triton.jit
def _desc_tile(X, off_b, off_h, start, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, COMPUTE: tl.constexpr):
    """A (ROWS, HEAD_DIM) tile of a (B, H, T, D) TMA descriptor at rows start.. of one batch·head; rows past T come back
    as zeros (the loads need no mask). Coordinates are int32 per dimension; TMA applies the 64-bit strides."""
    return X.load([off_b.to(tl.int32), off_h.to(tl.int32), start, 0]).reshape(ROWS, HEAD_DIM).to(COMPUTE)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, kv_offset, off_b, off_h, stride_t, offs_m, offs_d, lo, hi, T, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, COMPUTE: tl.constexpr,
               PRECISION: tl.constexpr, TMA: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if TMA:
            k = _desc_tile(K, off_b, off_h, start_n, BLOCK_N, HEAD_DIM, COMPUTE)
        else:
            k_ptrs = _rows(K + kv_offset, offs_n, stride_t, offs_d)
            v_ptrs = _rows(V + kv_offset, offs_n, stride_t, offs_d)
            k = _key_tile(k_ptrs, offs_n, T, MASKED, COMPUTE)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED:
            # -inf, not a large negative bias, so bf16/fp16 rounding cannot leak weight through. Keys >= T are
            # masked by causality for every real row (row < T); padded rows are never stored.
            qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
        # m_ij is finite: each row's first visited tile holds key 0, which no row masks.
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:
            v = _desc_tile(V, off_b, off_h, start_n, BLOCK_N, HEAD_DIM, COMPUTE)
        else:
            v = _key_tile(v_ptrs, offs_n, T, MASKED, COMPUTE)
        acc = tl.dot(p.to(COMPUTE), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _attn_fwd(Q, K, V, O, LSE, stride_b, stride_h, stride_t, H, T, BH, T_BUCKET,
              HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              COMPUTE: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr = False):
    """With TMA, Q, K, V and O are host-side descriptors over the (B, H, T, D) views (see attention_forward) and the
    strides go unused: TMA forms addresses from per-dimension coordinates with 64-bit strides."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "the diagonal tile must split into whole BLOCK_N tiles")
    off_bh = _batch_head()
    if off_bh >= BH:  # past the end of a folded grid
        return
    # Heaviest query tiles (most keys) first, so the short ones fill the tail of the grid.
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T

    qkv_offset = off_b * stride_b + off_h * stride_h
    if TMA:
        q = _desc_tile(Q, off_b, off_h, start_m * BLOCK_M, BLOCK_M, HEAD_DIM, COMPUTE)
    else:
        q = tl.load(_rows(Q + qkv_offset, offs_m, stride_t, offs_d), mask=row_ok[:, None], other=0.0).to(COMPUTE)
    qk_scale = SM_SCALE * 1.4426950408889634  # log2(e) folded in: exp(x * SM_SCALE) = exp2(x * qk_scale)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    diag = start_m * BLOCK_M
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, qkv_offset, off_b, off_h, stride_t, offs_m, offs_d,
                               0, diag, T, qk_scale, HEAD_DIM, BLOCK_N, False, COMPUTE, PRECISION, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, qkv_offset, off_b, off_h, stride_t, offs_m, offs_d,
                               diag, tl.minimum(diag + BLOCK_M, T), T, qk_scale, HEAD_DIM, BLOCK_N, True, COMPUTE,
                               PRECISION, TMA)

    o = acc / l_i[:, None]
    if TMA:  # the store clips at T
        O.store([off_b.to(tl.int32), off_h.to(tl.int32), start_m * BLOCK_M, 0],
                o.to(O.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM))
    else:
        o_ptrs = O + _bthd_offset(off_b, off_h, offs_m, offs_d, H, T, HEAD_DIM)
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + off_bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


# ----------------------------------------------------------------------------------------------------------------
# Backward: dQ (with the delta preprocess fused in), then dK/dV
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, off_b, off_h, stride_t, offs_m, offs_d, lo, hi, T, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N2: tl.constexpr, MASKED: tl.constexpr, COMPUTE: tl.constexpr,
              PRECISION: tl.constexpr, TMA: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N2):
        start_n = tl.multiple_of(start_n, BLOCK_N2)
        offs_n = start_n + tl.arange(0, BLOCK_N2)
        if TMA:
            k = _desc_tile(k_base, off_b, off_h, start_n, BLOCK_N2, HEAD_DIM, COMPUTE)
            v = _desc_tile(v_base, off_b, off_h, start_n, BLOCK_N2, HEAD_DIM, COMPUTE)
        else:
            k_ptrs = _rows(k_base, offs_n, stride_t, offs_d)
            v_ptrs = _rows(v_base, offs_n, stride_t, offs_d)
            k = _key_tile(k_ptrs, offs_n, T, MASKED, COMPUTE)
            v = _key_tile(v_ptrs, offs_n, T, MASKED, COMPUTE)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])  # P rebuilt from the stored logsumexp, no max/sum pass
        if MASKED:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(COMPUTE), k, dq, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _attn_bwd_dq(Q, K, V, O, DO, DQ, LSE, DELTA, stride_b, stride_h, stride_t, stride_dob, stride_doh, stride_dot, H, T,
                 BH, T_BUCKET,
                 HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
                 COMPUTE: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr = False):
    """With TMA, Q, K, V and DO are descriptors (see attention_backward) and their strides go unused."""
    tl.static_assert(BLOCK_M2 % BLOCK_N2 == 0, "the diagonal tile must split into whole BLOCK_N2 tiles")
    off_bh = _batch_head()
    if off_bh >= BH:  # past the end of a folded grid
        return
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest first, as in the forward
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M2 + tl.arange(0, BLOCK_M2)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    qk_scale = SM_SCALE * 1.4426950408889634

    qkv_offset = off_b * stride_b + off_h * stride_h
    bthd = _bthd_offset(off_b, off_h, offs_m, offs_d, H, T, HEAD_DIM)
    if TMA:
        q = _desc_tile(Q, off_b, off_h, start_m * BLOCK_M2, BLOCK_M2, HEAD_DIM, COMPUTE)
        do = _desc_tile(DO, off_b, off_h, start_m * BLOCK_M2, BLOCK_M2, HEAD_DIM, DO.dtype)  # as stored, for delta
    else:
        q = tl.load(_rows(Q + qkv_offset, offs_m, stride_t, offs_d), mask=row_ok[:, None], other=0.0).to(COMPUTE)
        do = tl.load(_rows(DO + off_b * stride_dob + off_h * stride_doh, offs_m, stride_dot, offs_d),
                     mask=row_ok[:, None], other=0.0)
    o = tl.load(O + bthd, mask=row_ok[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + off_bh.to(tl.int64) * T + offs_m, delta, mask=row_ok)
    # Padded rows get lse = +inf, so their P is exactly 0 and they contribute nothing.
    lse = tl.load(LSE + off_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=float("inf"))
    do = do.to(COMPUTE)

    dq = tl.zeros([BLOCK_M2, HEAD_DIM], dtype=tl.float32)
    diag = start_m * BLOCK_M2
    if TMA:  # descriptors: the tiles are addressed by (batch, head, row) coordinates
        k_base, v_base = K, V
    else:
        k_base, v_base = K + qkv_offset, V + qkv_offset
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, off_b, off_h, stride_t, offs_m, offs_d, 0, diag, T,
                   qk_scale, HEAD_DIM, BLOCK_N2, False, COMPUTE, PRECISION, TMA)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, off_b, off_h, stride_t, offs_m, offs_d, diag,
                   tl.minimum(diag + BLOCK_M2, T), T, qk_scale, HEAD_DIM, BLOCK_N2, True, COMPUTE, PRECISION, TMA)
    dq *= SM_SCALE  # dS is d(loss)/d(S) of the scaled scores: dQ = scale · dS K
    tl.store(DQ + bthd, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, off_b, off_h, lse_base, delta_base, stride_t, stride_dot,
                offs_n, offs_d, lo, hi, T, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M1: tl.constexpr,
                MASKED: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    # Works on transposed tiles (keys along rows) so that dK and dV accumulate as plain row-major dots.
    for start_m in range(lo, hi, BLOCK_M1):
        start_m = tl.multiple_of(start_m, BLOCK_M1)
        offs_m = start_m + tl.arange(0, BLOCK_M1)
        row_ok = offs_m < T  # the last query tile may run past T, in either stage
        if TMA:
            q = _desc_tile(q_base, off_b, off_h, start_m, BLOCK_M1, HEAD_DIM, COMPUTE)
            do = _desc_tile(do_base, off_b, off_h, start_m, BLOCK_M1, HEAD_DIM, COMPUTE)
        else:
            q = tl.load(_rows(q_base, offs_m, stride_t, offs_d), mask=row_ok[:, None], other=0.0).to(COMPUTE)
            do = tl.load(_rows(do_base, offs_m, stride_dot, offs_d), mask=row_ok[:, None], other=0.0).to(COMPUTE)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))  # +inf: P = 0 on padded rows
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        if MASKED:
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        dv = tl.dot(pT.to(COMPUTE), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(COMPUTE), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, stride_b, stride_h, stride_t, stride_dob, stride_doh, stride_dot,
                   H, T, BH, T_BUCKET,
                   HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M1: tl.constexpr,
                   COMPUTE: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr = False):
    """With TMA, Q, K, V and DO are descriptors (see attention_backward) and their strides go unused."""
    tl.static_assert(BLOCK_N1 % BLOCK_M1 == 0, "the diagonal tile must split into whole BLOCK_M1 tiles")
    off_bh = _batch_head()
    if off_bh >= BH:  # past the end of a folded grid
        return
    start_n = tl.program_id(0) * BLOCK_N1  # low key tiles see the most queries and are launched first anyway
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N1)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < T
    qk_scale = SM_SCALE * 1.4426950408889634

    qkv_offset = off_b * stride_b + off_h * stride_h
    if TMA:  # descriptors: the tiles are addressed by (batch, head, row) coordinates
        k = _desc_tile(K, off_b, off_h, start_n, BLOCK_N1, HEAD_DIM, COMPUTE)
        v = _desc_tile(V, off_b, off_h, start_n, BLOCK_N1, HEAD_DIM, COMPUTE)
        q_base, do_base = Q, DO
    else:
        k = tl.load(_rows(K + qkv_offset, offs_n, stride_t, offs_d), mask=col_ok[:, None], other=0.0).to(COMPUTE)
        v = tl.load(_rows(V + qkv_offset, offs_n, stride_t, offs_d), mask=col_ok[:, None], other=0.0).to(COMPUTE)
        q_base = Q + qkv_offset
        do_base = DO + off_b * stride_dob + off_h * stride_doh
    lse_base = LSE + off_bh.to(tl.int64) * T
    delta_base = DELTA + off_bh.to(tl.int64) * T

    dk = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
    diag_end = tl.minimum(start_n + BLOCK_N1, T)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, off_b, off_h, lse_base, delta_base, stride_t, stride_dot,
                         offs_n, offs_d, start_n, diag_end, T, qk_scale, HEAD_DIM, BLOCK_M1, True, COMPUTE, PRECISION,
                         TMA)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, off_b, off_h, lse_base, delta_base, stride_t, stride_dot,
                         offs_n, offs_d, diag_end, T, T, qk_scale, HEAD_DIM, BLOCK_M1, False, COMPUTE, PRECISION, TMA)
    dk *= SM_SCALE
    bthd = _bthd_offset(off_b, off_h, offs_n, offs_d, H, T, HEAD_DIM)
    tl.store(DK + bthd, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + bthd, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


# ----------------------------------------------------------------------------------------------------------------
# Launchers. `config=None` runs the autotuned kernels (production); tests pass an explicit triton.Config.
# ----------------------------------------------------------------------------------------------------------------
# Autotuning results are kept on disk (Triton's cache directory) where this Triton can, so a new process does not
# re-tune a shape it has tuned before.
_CACHE_RESULTS = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


_TUNED = {}  # (kernel, configs) -> its autotuner, whose .cache holds the winners (scripts/bench_attention.py)


def _tuned(kernel, configs):
    """The autotuned kernel over a config list. Tuned per dtype, head dim and power-of-two bucket of T: T_BUCKET
    is a kernel argument only to be this key (keyed on T itself, sampling with a growing sequence would re-tune at
    every length). It is a plain integer, not a constexpr, so the buckets share compiled kernels."""
    if (kernel, configs) not in _TUNED:
        _TUNED[kernel, configs] = triton.autotune(list(configs), key=["T_BUCKET", "HEAD_DIM"], **_CACHE_RESULTS)(kernel)
    return _TUNED[kernel, configs]


@functools.lru_cache(maxsize=None)
def _meta(dtype, head_dim):
    """The constexpr arguments (other than the block sizes)."""
    compute = tl.float32 if _INTERPRET else _TL_DTYPE[dtype]
    # The scale is a constexpr: a runtime float would arrive as fp64 from Inductor and fp64 breaks the loop-carried m_i.
    return dict(HEAD_DIM=head_dim, SM_SCALE=head_dim**-0.5, COMPUTE=compute,
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _cdiv(a, b):
    """triton.cdiv, for the host: Triton 3.6 makes cdiv and next_power_of_2 constexpr functions, whose wrapper costs
    about 2 us a call outside a kernel, and every launch needs a few."""
    return -(-a // b)


def _next_power_of_2(n):
    """triton.next_power_of_2, for the host (see _cdiv)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _grid(T, rows, BH):
    """(tiles along T, Y, Z) with Y·Z >= B·H programs over batch·head (the kernels read batch·head = z·Y + y and
    skip the Y·Z - B·H < Z programs past the end): axes 1 and 2 hold at most MAX_GRID_YZ programs each."""
    z = _cdiv(BH, MAX_GRID_YZ)
    return _cdiv(T, rows), _cdiv(BH, z), z


# (kernel, its specialisation-relevant arguments) -> (_Direct, rows per program)
_COMPILED = {}


def _launch(kernel, configs, config, block, B, H, T, args, dtype, D, device, **constexprs):
    """Launches `kernel` over (tiles of `block` rows, batch·head) with `args` followed by (B·H, T_BUCKET)."""
    BH = B * H
    args = (*args, BH, _next_power_of_2(T))
    key = (kernel, device, D, *map(_specialization, args))
    if DIRECT_LAUNCH and config is None:
        entry = _COMPILED.get(key)
        if entry is not None:
            direct, rows = entry
            direct(_grid(T, rows, BH), device, args)
            return
    meta = {**_meta(dtype, D), **constexprs}
    if _INTERPRET or config is not None:
        config = config or configs_for(configs, D)[0]
        kernel[_grid(T, config.kwargs[block], BH)](*_made(args), **meta, **config.kwargs, num_warps=config.num_warps,
                                                   num_stages=config.num_stages)
        return
    tuned = _tuned(kernel, tuple(configs_for(configs, D)))
    compiled = tuned[lambda c: _grid(T, c[block], BH)](*_made(args), **meta)
    # The autotuner has picked and compiled the kernel: later calls launch it directly.
    _keep(key, kernel, compiled, {**meta, **tuned.best_config.kwargs}, tuned.best_config.kwargs[block], len(args))


def _keep(key, kernel, compiled, constexprs, rows, n_args):
    """Once Triton's own launch has compiled `kernel`, later calls under `key` (see _launch) launch it directly."""
    if DIRECT_LAUNCH:
        _COMPILED[key] = (_Direct(compiled, [constexprs[name] for name in kernel.arg_names[n_args:]]), rows)


class _Direct:
    """A compiled kernel launched straight through Triton's C launcher. Triton's generic launch path (autotuner key,
    argument binding, specialisation, cache lookup, and a TMA descriptor encoded afresh for every descriptor argument
    of every call) costs more host time than our kernels take on the GPU at the GPT-2 shape. The caller keys this
    object on everything Triton specialises on (_specialization of every argument, the constexprs and the device);
    a call then only flattens the arguments, descriptors from _tma_args. Relies on Triton 3.6's launcher (see
    DIRECT_LAUNCH); while a profiler's launch hooks are set, it takes Triton's own path."""

    def __init__(self, compiled, constexprs):
        self.compiled, self.constexprs = compiled, constexprs
        launcher = compiled.run
        launch = launcher.launch  # wrapped, when the kernel takes descriptors, by a closure that encodes them
        cells = dict(zip(launch.__code__.co_freevars, (c.cell_contents for c in launch.__closure__))) \
            if hasattr(launch, "__code__") else {}
        self.raw = cells.get("launcher", launch)
        self.metas = getattr(compiled.metadata, "tensordesc_meta", None) or []
        self.head = (compiled.function, launcher.launch_cooperative_grid, launcher.launch_pdl, None, None,
                     compiled.packed_metadata, None, None, None)
        self.own_path = compiled.metadata.global_scratch_size > 0 or compiled.metadata.profile_scratch_size > 0

    def __call__(self, grid, device, args):
        stream = driver.active.get_current_stream(device.index)
        # Triton 3.6's launch_enter_hook is a HookChain, never None: so far this always takes Triton's path, and the
        # raw launch below has not run (KERNEL_NOTES.md, v16; its fix awaits a GPU check on branch gluon-bwd-v2).
        if self.own_path or knobs.runtime.launch_enter_hook is not None:
            c, args = self.compiled, (*_made(args), *self.constexprs)
            c.run(*grid, stream, c.function, c.packed_metadata, c.launch_metadata(grid, stream, *args),
                  knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *args)
            return
        flat, metas = [], iter(self.metas)
        for arg in args:
            if type(arg) is _Desc:
                flat += _tma_args(arg, next(metas, None))
            else:
                flat.append(arg)
        self.raw(*grid, stream, *self.head, *flat, *self.constexprs)


class _Desc:
    """A TMA descriptor argument before it is made: the (B, H, T, D) tensor, the (1, 1, rows, D) tile it moves, and
    the descriptor class with its extra arguments (Gluon's takes the tile's shared-memory layout). Triton's own launch
    path gets the descriptor (_made); the direct launch its encoded form (_tma_args)."""
    __slots__ = ("x", "block", "cls", "extra")

    def __init__(self, x, rows, cls=None, *extra):
        self.x, self.block, self.cls, self.extra = x, (1, 1, rows, x.shape[-1]), cls or TensorDescriptor, extra

    def make(self):
        x = self.x
        return self.cls(x, list(x.shape), _descriptor_strides(x), list(self.block), *self.extra)


def _made(args):
    return [arg.make() if type(arg) is _Desc else arg for arg in args]


_TMA_ARGS = {}  # (address, shape, strides, tile, dtype, swizzle) -> a descriptor's launcher arguments


def _tma_args(desc, meta):
    """A descriptor argument as Triton's C launcher takes it (the encoded CUtensorMap, then shape and strides), kept
    per address, shape, strides and tile: everything the encoding reads, so a hit is exactly what encoding anew
    would give. A descriptor the kernel reads through pointers (meta None) holds the tensor itself: never kept."""
    if meta is None:
        return make_tensordesc_arg(desc.make(), None)
    x = desc.x
    key = (x.data_ptr(), x.shape, x.stride(), desc.block, x.dtype, meta["swizzle"])
    args = _TMA_ARGS.get(key)
    if args is None:
        if len(_TMA_ARGS) >= 1024:  # a bound, for a process that sees many shapes and addresses
            _TMA_ARGS.clear()
        args = _TMA_ARGS[key] = make_tensordesc_arg(desc.make(), meta)
    return args


def _specialization(arg):
    """What Triton specialises a kernel on for one argument: an integer's value (we key on all of it), a tensor's dtype
    and 16-byte alignment, a descriptor's dtype, tile and layout (its address is aligned: _use_tma checks)."""
    if type(arg) is int:
        return arg
    if type(arg) is _Desc:
        return arg.x.dtype, arg.block, arg.extra
    return arg.dtype, arg.data_ptr() % 16 == 0


@functools.lru_cache(maxsize=None)
def _hopper(device):
    return torch.cuda.get_device_capability(device)[0] >= 9


def _use_tma(configs, q, k, v, *others):
    """The kernel whose TMA configs are `configs` reads q, k, v (and writes O) through TMA descriptors on Hopper
    (sm_90+) at the head dims those configs list. The forward at D = 128: 11-13% off its GPU time up to T = 4096 on
    the H200 (less beyond), at ~80 us more host time per call for the four descriptors; at D = 64 it lost 1-3%
    (KERNEL_NOTES.md, v9). TMA needs 16-bit elements here (the only ones measured), and a 16-byte-aligned base and
    strides, which the model's views have (and our O, allocated here); `others` (dO) are checked too."""
    return (TMA_DESCRIPTORS and not _INTERPRET and q.is_cuda and q.shape[-1] in configs
            and q.dtype in (torch.float16, torch.bfloat16) and _hopper(q.device) and _tma_aligned(q)
            and k.data_ptr() % 16 == 0 and v.data_ptr() % 16 == 0  # k, v have q's strides; O is ours (aligned)
            and all(_tma_aligned(x) for x in others))


@functools.lru_cache(maxsize=None)
def _gluon_kernels():
    """attention/hopper.py, imported on first use: Gluon is experimental, and only sm_90 with the GLUON version runs it."""
    from attention import hopper
    return hopper


@functools.lru_cache(maxsize=None)
def _sm90(device):
    return torch.cuda.get_device_capability(device) == (9, 0)


def _gluon_runs(device, head_dim, dtype):
    """Whether attention/hopper.py's warp-specialised Gluon kernels run on this device, head dim and dtype: sm_90
    (H100, H200) with the Triton version it was tested with, head dims 64 and 128 in 16-bit floats."""
    return (GLUON and not _INTERPRET and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and head_dim in GLUON_MIN_T and _sm90(device))


def _gluon_default(device, head_dim, seq_len, dtype):
    """Whether the forward's default at this shape is the Gluon kernel: where it runs and was the faster one
    (GLUON_MIN_T). The inputs' alignment is checked on top (_prefers_gluon)."""
    return seq_len >= GLUON_MIN_T.get(head_dim, 0) and _gluon_runs(device, head_dim, dtype)


def _gluon_aligned(q, k, v, *others):
    """The Gluon kernels read q, k, v (and dO: `others`) through TMA descriptors: 16-byte-aligned bases and strides."""
    return (_tma_aligned(q) and k.data_ptr() % 16 == 0 and v.data_ptr() % 16 == 0
            and all(_tma_aligned(x) for x in others))


def _use_gluon(q, k, v, *others):
    """Whether the Gluon kernels can run these inputs (`others`: dO, for the backward)."""
    return _gluon_runs(q.device, q.shape[-1], q.dtype) and _gluon_aligned(q, k, v, *others)


def _prefers_gluon(q, k, v):
    """The forward's default for these inputs: the Gluon kernel (_gluon_default), else the tl kernel."""
    return _gluon_default(q.device, q.shape[-1], q.shape[2], q.dtype) and _gluon_aligned(q, k, v)


_DETERMINISTIC = False


def set_deterministic(enabled):
    """Bitwise-repeatable gradients (the tl backward) even where the Gluon backward is faster; so does
    torch.use_deterministic_algorithms(True). The trainer's `deterministic_attention` setting calls this."""
    global _DETERMINISTIC
    _DETERMINISTIC = bool(enabled)


def deterministic():
    return _DETERMINISTIC or torch.are_deterministic_algorithms_enabled()


def _gluon_bwd_default(device, head_dim, seq_len, dtype):
    """Whether the backward's default at this shape is the Gluon kernel: where it runs, was the faster one
    (GLUON_BWD_MIN_T) and bitwise repeatability was not asked for."""
    return (seq_len >= GLUON_BWD_MIN_T.get(head_dim, float("inf")) and not deterministic()
            and _gluon_runs(device, head_dim, dtype))


def kernels(device, head_dim, seq_len, dtype=torch.bfloat16):
    """Which kernels run a (head_dim, seq_len) causal attention on `device`, in words, for the trainer's log."""
    fwd = "Gluon warp-specialised" if _gluon_default(device, head_dim, seq_len, dtype) else "tl"
    bwd = "Gluon warp-specialised" if _gluon_bwd_default(device, head_dim, seq_len, dtype) else "tl"
    if fwd == bwd == "tl":
        return "tl forward and backward" + (" (Triton's CPU interpreter)" if _INTERPRET else "")
    if fwd == bwd:
        return f"{fwd} forward and backward (attention/hopper.py)"
    return f"{fwd} forward, {bwd} backward (attention/hopper.py)"


def _bwd_uses_tma(q, k, v, do):
    """The backward through TMA descriptors: on the H200 its GPU time fell 1.5% at T = 1024 and 3-7% beyond at D = 64,
    5-8% from T = 1024 at D = 128, for 30-130 us more host time per call, mostly spent building the eight descriptors
    (KERNEL_NOTES.md, v11)."""
    return q.shape[2] >= BWD_TMA_MIN_T and _use_tma(DQ_TMA_CONFIGS, q, k, v, do)


def _tma_aligned(x):
    return x.data_ptr() % 16 == 0 and all(st * x.element_size() % 16 == 0 for st in _descriptor_strides(x)[:-1])


def _descriptor_strides(x):
    """x's strides, with those of size-1 dimensions (never used, but any value torch gives them, and checked for
    16-byte alignment by TMA) replaced by D."""
    return [st if n > 1 else x.shape[-1] for n, st in zip(x.shape[:-1], x.stride()[:-1])] + [x.stride(-1)]


# Each kernel's descriptor arguments (with TMA=True), in order, and the block size that is their tiles' row count.
TMA_TILES = {_attn_fwd: {"Q": "BLOCK_M", "K": "BLOCK_N", "V": "BLOCK_N", "O": "BLOCK_M"},
             _attn_bwd_dq: {"Q": "BLOCK_M2", "K": "BLOCK_N2", "V": "BLOCK_N2", "DO": "BLOCK_M2"},
             _attn_bwd_dkdv: {"Q": "BLOCK_M1", "K": "BLOCK_N1", "V": "BLOCK_N1", "DO": "BLOCK_M1"}}


def _descriptors(kernel, config, tensors):
    """Host-side TMA descriptor arguments over (B, H, T, D) views for the descriptor arguments of `kernel` run with
    `config`, each loading or storing (rows, D) tiles."""
    return [_Desc(x, config.kwargs[block]) for x, block in zip(tensors, TMA_TILES[kernel].values())]


def _bthd_strides(x):
    B, H, T, D = x.shape
    return (T * H * D, D, H * D, 1)


def _bthd(x):
    """An empty (B, H, T, D) tensor laid out in (B, T, H, D) memory order."""
    return torch.empty_strided(x.shape, _bthd_strides(x), dtype=x.dtype, device=x.device)


def _unit_stride(q, k, v):
    """The kernels take one set of (b, h, t) strides for q, k, v and a unit stride along D. The model's views of
    its qkv projection (and any contiguous tensors of one shape) already qualify; anything else is copied."""
    if q.stride() == k.stride() == v.stride() and q.stride(-1) == 1:
        return q, k, v
    return q.contiguous(), k.contiguous(), v.contiguous()


def attention_forward(q, k, v, config=None, tma=None, gluon=None):
    """Returns (o, lse); lse is the base-2 row logsumexp of the scaled scores, fp32, shape (B, H, T). gluon: True
    runs the warp-specialised Hopper kernel (attention/hopper.py; the caller checks _use_gluon), False the portable
    kernel with `config` (None: autotuned), through TMA descriptors or pointers (tma; None chooses, _use_tma); None
    chooses (_prefers_gluon), unless a config or tma asks for the portable kernel."""
    B, H, T, D = q.shape
    q, k, v = _unit_stride(q, k, v)
    o = _bthd(q)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if gluon is None:
        gluon = config is None and tma is None and _prefers_gluon(q, k, v)
    if gluon:
        _gluon_kernels().forward(q, k, v, o, lse)
        return o, lse
    tma = _use_tma(FWD_TMA_CONFIGS, q, k, v) if tma is None else tma
    configs = FWD_TMA_CONFIGS if tma else FWD_CONFIGS
    tensors = (q, k, v, o)
    if tma:
        tensors = _descriptors(_attn_fwd, config or configs_for(configs, D)[0], tensors)
    _launch(_attn_fwd, configs, config, "BLOCK_M", B, H, T, (*tensors, lse, *q.stride()[:3], H, T), q.dtype, D,
            q.device, TMA=tma)
    return o, lse


def attention_backward(do, q, k, v, o, lse, dq_config=None, dkdv_config=None, tma=None, gluon=None):
    """Returns (dq, dk, dv). gluon: True runs the warp-specialised Hopper backward (attention/hopper.py; the caller
    checks _use_gluon(q, k, v, do)), False the tl kernels; None chooses (_gluon_bwd_default), unless a config or tma
    asks for the tl kernels. Of those the dQ kernel runs first: it also computes delta, which the dK/dV kernel reads.
    tma: q, k, v and dO through TMA descriptors or pointers; None chooses (_bwd_uses_tma), tests force either."""
    B, H, T, D = q.shape
    q, k, v = _unit_stride(q, k, v)
    if do.stride(-1) != 1:
        do = do.contiguous()
    if o.stride() != _bthd_strides(o):  # the kernels index O in the layout attention_forward gives it
        o = _bthd(o).copy_(o)
    dq, dk, dv = _bthd(q), _bthd(k), _bthd(v)
    if gluon is None:
        gluon = (dq_config is None and dkdv_config is None and tma is None
                 and _gluon_bwd_default(q.device, D, T, q.dtype) and _gluon_aligned(q, k, v, do))
    if gluon:
        _gluon_kernels().backward(do, q, k, v, o, lse, dq, dk, dv)
        return dq, dk, dv
    delta = torch.empty_like(lse)
    strides = (*q.stride()[:3], *do.stride()[:3], H, T)
    tma = _bwd_uses_tma(q, k, v, do) if tma is None else tma
    dq_configs, dkdv_configs = (DQ_TMA_CONFIGS, DKDV_TMA_CONFIGS) if tma else (DQ_CONFIGS, DKDV_CONFIGS)
    dq_in = dkdv_in = (q, k, v, do)
    if tma:  # each kernel's descriptors carry its own tile shapes
        dq_in = _descriptors(_attn_bwd_dq, dq_config or configs_for(dq_configs, D)[0], dq_in)
        dkdv_in = _descriptors(_attn_bwd_dkdv, dkdv_config or configs_for(dkdv_configs, D)[0], dkdv_in)
    q_in, k_in, v_in, do_in = dq_in
    _launch(_attn_bwd_dq, dq_configs, dq_config, "BLOCK_M2", B, H, T,
            (q_in, k_in, v_in, o, do_in, dq, lse, delta, *strides), q.dtype, D, q.device, TMA=tma)
    _launch(_attn_bwd_dkdv, dkdv_configs, dkdv_config, "BLOCK_N1", B, H, T, (*dkdv_in, dk, dv, lse, delta, *strides),
            q.dtype, D, q.device, TMA=tma)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------
# torch integration
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("gpt2_attention::triton_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v)


@_fwd_op.register_fake
def _(q, k, v):
    B, H, T, _ = q.shape
    return _bthd(q), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("gpt2_attention::triton_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(do, q, k, v, o, lse)


@_bwd_op.register_fake
def _(do, q, k, v, o, lse):
    return _bthd(q), _bthd(k), _bthd(v)


class _FlashAttention(torch.autograd.Function):
    """Autograd for the two ops. Under torch.compile the ops stay opaque custom ops (the one path that compiles with
    fullgraph=True on the GPU and under the CPU interpreter alike); in eager mode the launchers are called directly,
    skipping the dispatcher. The custom-op `register_autograd` wrapper cost 80 us more host time per
    forward+backward (measured on the CPU with the launch stubbed out); on the H100 machine, whose host is the
    bottleneck at the GPT-2 shape, eager backward went from 0.383 to 0.280 ms (see KERNEL_NOTES.md)."""

    @staticmethod
    def forward(ctx, q, k, v, gluon=None):
        """gluon: force the Gluon kernels (True) or the tl ones (False), forward and backward, for
        scripts/bench_attention.py's rows; the compiled ops always choose."""
        o, lse = _fwd_op(q, k, v) if torch.compiler.is_compiling() else attention_forward(q, k, v, gluon=gluon)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.gluon = gluon
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        if torch.compiler.is_compiling():
            return *_bwd_op(do, q, k, v, o, lse), None
        return *attention_backward(do, q, k, v, o, lse, gluon=ctx.gluon), None


def _check(q, k, v):
    """Cheap checks (metadata only, no host sync) with an error that names the limits; never a silent fallback."""
    hint = "use `--attention sdpa` for other inputs"
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"triton attention computes causal self-attention: q, k, v must all be (B, H, T, D) of "
                         f"one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}; {hint}")
    check_head_dim(q.shape[-1])
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"triton attention supports float16, bfloat16 and float32 (all three alike), got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}; {hint}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    check_device(q.device)


def check_head_dim(head_dim):
    """Fail, naming the fix, for a head dim the kernels do not support: the trainer calls this at config time."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"triton attention supports head dims {HEAD_DIMS}, got D={head_dim} (n_embd / n_head); "
                         f"choose n_embd and n_head to give one of them, or use `--attention sdpa`")


def check_device(device):
    """Fail, naming the fix, where these kernels cannot run: the trainer calls this before it builds anything."""
    if device.type != "cuda" and not _INTERPRET:
        where = "this machine has no CUDA GPU" if not torch.cuda.is_available() else f"the inputs are on {device}"
        raise RuntimeError(f"triton attention needs CUDA tensors and {where}; use `--attention sdpa`, or set "
                           f"TRITON_INTERPRET=1 before importing it to run the kernels in Triton's CPU interpreter "
                           f"(tests only, slow)")


def causal_attention(q, k, v):
    _check(q, k, v)
    return _FlashAttention.apply(q, k, v)
