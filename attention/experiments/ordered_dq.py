"""Experiment (kernel notes, v7): the triton backend with a five-matmul backward whose dQ is still deterministic.

Not a backend: `scripts/sweep_seq_len.py --variant ordered=attention/experiments/ordered_dq.py` (or
bench_attention.py, same flag) times it beside attention/triton.py. If it measures faster, its kernel replaces that
file's dQ and dK/dV kernels (whose structure _attn_bwd_ordered repeats, plus the dQ share) and this file goes; if
not, it goes. Tested on the CPU (Triton's interpreter) and compiled for sm_90 there (scripts/kernel_resources.py);
not yet run on a GPU.

Why. attention/triton.py's backward is two kernels that each rebuild S = QKᵀ and dP = dO·Vᵀ (seven matmuls), so that
no program ever adds into another's output. cuDNN's issues five; per issued FLOP ours is as fast, so the extra two
are the whole gap at long T (KERNEL_NOTES.md). Here one kernel, one program per BLOCK_N1 key rows as in the dK/dV
kernel, also computes each query tile's share of dQ = dS K (the fifth matmul) and adds it into an fp32 buffer in a
fixed order, which keeps the result bitwise repeatable (atomics would not).

The order. Query tile i (BLOCK_M1 rows) gets a share from every key block j = 0..J(i), J(i) the block holding its
last row's diagonal. The shares are added in descending j: block J(i) stores its share, each next one loads the
partial sum, adds, stores, and block 0, the last, writes dQ itself (scaled, in the input dtype) and resets the
tile's counter to 0, so the counter buffer is clean for the next call without a fill. A block waits on the tile's
counter until it equals J(i) - j. Blocks walk their query tiles upwards from the diagonal, so block j + 1 reaches
tile i one tile before block j does: blocks that run side by side do not wait on each other. Programs are launched
highest block first, so a program only ever waits on one launched before it (no program can hold an SM while the
one it waits for is not yet resident); the interpreter runs programs in launch order, so its waits end at once.

Memory traffic per (batch, head), on top of the dK/dV kernel's: each tile visit but the first and last reads and
writes a BLOCK_M1 × D fp32 dQ partial (mostly in L2, since neighbouring key blocks visit it one after the other),
and a small kernel computes delta = rowsum(dO ∘ O) first (the dQ kernel did that in attention/triton.py).
"""
import torch
import triton
import triton.language as tl

from attention import triton as base
from attention.triton import (_NOT_SPECIALIZED, _batch_head, _bthd, _bthd_offset, _configs, _dkdv_ok, _key_block,
                              _launch, _rows)


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _attn_bwd_delta(O, DO, DELTA, stride_dob, stride_doh, stride_dot, H, T, BH, T_BUCKET,
                    HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr,
                    PRECISION: tl.constexpr):
    """delta = rowsum(dO ∘ O) for BLOCK rows of one batch·head."""
    off_bh = _batch_head()
    if off_bh >= BH:
        return
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    do = tl.load(_rows(DO + off_b * stride_dob + off_h * stride_doh, offs_m, stride_dot, offs_d),
                 mask=row_ok[:, None], other=0.0)
    o = tl.load(O + _bthd_offset(off_b, off_h, offs_m, offs_d, H, T, HEAD_DIM), mask=row_ok[:, None], other=0.0)
    tl.store(DELTA + off_bh.to(tl.int64) * T + offs_m, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), mask=row_ok)


@triton.jit
def _add_dq_share(dq_share, DQ, DQ_ACC, locks, j, j_last, bthd, row_ok, SM_SCALE: tl.constexpr):
    """Add this key block's share of a query tile's dQ in the tile's order (blocks j_last, ..., 1, 0)."""
    turn = j_last - j  # shares added before this one
    if turn > 0:
        while tl.atomic_add(locks, 0, sem="acquire") != turn:
            pass
        # .cg: read the partial sum from L2, never from this SM's L1, which another block's store does not update
        dq_share += tl.load(DQ_ACC + bthd, mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
    if j == 0:  # the last share: dQ itself; the counter goes back to 0 for the next call
        tl.store(DQ + bthd, (dq_share * SM_SCALE).to(DQ.dtype.element_ty), mask=row_ok[:, None])
        if turn > 0:
            tl.atomic_xchg(locks, 0)
    else:
        tl.store(DQ_ACC + bthd, dq_share, mask=row_ok[:, None])
        tl.debug_barrier()  # every thread's part of the tile is stored before the release below
        tl.atomic_xchg(locks, turn + 1, sem="release")


@triton.jit
def _query_tile(q_base, do_base, lse_base, delta_base, start_m, stride_t, stride_dot, offs_d, T,
                BLOCK_M1: tl.constexpr, COMPUTE: tl.constexpr):
    """The q, dO rows, lse and delta of the query tile at start_m (rows >= T masked)."""
    offs_m = start_m + tl.arange(0, BLOCK_M1)
    row_ok = offs_m < T
    q = tl.load(_rows(q_base, offs_m, stride_t, offs_d), mask=row_ok[:, None], other=0.0).to(COMPUTE)
    do = tl.load(_rows(do_base, offs_m, stride_dot, offs_d), mask=row_ok[:, None], other=0.0).to(COMPUTE)
    lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))  # +inf: P = 0 on padded rows
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    return q, do, lse, delta


@triton.jit
def _ordered_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, DQ, DQ_ACC, LOCKS, stride_t, stride_dot,
                   offs_n, offs_d, off_b, off_h, j, n_blocks, lo, hi, H, T, qk_scale,
                   HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M1: tl.constexpr,
                   MASKED: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr, ORDERED: tl.constexpr):
    # attention/triton.py's _dkdv_inner plus the dQ share of each query tile. Triton does not software-pipeline a
    # loop that holds an atomic (seen in its sm_90 output: no async copies), so the next tile's loads are issued by
    # hand before this tile's dots, and arrive while they run.
    q, do, lse, delta = _query_tile(q_base, do_base, lse_base, delta_base, lo, stride_t, stride_dot, offs_d, T,
                                    BLOCK_M1, COMPUTE)
    for start_m in range(lo, hi, BLOCK_M1):
        start_m = tl.multiple_of(start_m, BLOCK_M1)
        offs_m = start_m + tl.arange(0, BLOCK_M1)
        next_q, next_do, next_lse, next_delta = _query_tile(q_base, do_base, lse_base, delta_base, start_m + BLOCK_M1,
                                                            stride_t, stride_dot, offs_d, T, BLOCK_M1, COMPUTE)
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        if MASKED:
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        dv = tl.dot(pT.to(COMPUTE), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = (pT * (dpT - delta[None, :])).to(COMPUTE)
        dk = tl.dot(dsT, q, dk, input_precision=PRECISION)
        dq_share = tl.dot(tl.trans(dsT), k, input_precision=PRECISION)
        bthd = _bthd_offset(off_b, off_h, offs_m, offs_d, H, T, HEAD_DIM)
        if ORDERED:
            j_last = tl.minimum((start_m + BLOCK_M1 - 1) // BLOCK_N1, n_blocks - 1)  # the tile's diagonal block
            locks = LOCKS + (off_b * H + off_h) * tl.cdiv(T, BLOCK_M1) + start_m // BLOCK_M1
            _add_dq_share(dq_share, DQ, DQ_ACC, locks, j, j_last, bthd, offs_m < T, SM_SCALE)
        else:  # atomics: the adds land in any order (fp32 sums not bitwise repeatable)
            tl.atomic_add(DQ_ACC + bthd, dq_share, mask=(offs_m < T)[:, None], sem="relaxed")
        q, do, lse, delta = next_q, next_do, next_lse, next_delta
    return dk, dv


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _attn_bwd_ordered(Q, K, V, DO, DQ, DQ_ACC, DK, DV, LSE, DELTA, LOCKS, stride_b, stride_h, stride_t, stride_dob,
                      stride_doh, stride_dot, ORDERED: tl.constexpr, H, T, BH, T_BUCKET,
                      HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M1: tl.constexpr,
                      COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    tl.static_assert(BLOCK_N1 % BLOCK_M1 == 0, "the diagonal tile must split into whole BLOCK_M1 tiles")
    off_bh = _batch_head()
    if off_bh >= BH:
        return
    n_blocks = tl.num_programs(0)
    j = n_blocks - 1 - tl.program_id(0)  # highest key block first: see the module docstring
    start_n = j * BLOCK_N1
    off_b, off_h, offs_n, offs_d, col_ok, k, v, q_base, do_base, lse_base, delta_base = _key_block(
        Q, K, V, DO, LSE, DELTA, off_bh, start_n, stride_b, stride_h, stride_t, stride_dob, stride_doh, H, T,
        HEAD_DIM, BLOCK_N1, COMPUTE)
    qk_scale = SM_SCALE * 1.4426950408889634

    dk = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
    diag_end = tl.minimum(start_n + BLOCK_N1, T)
    dk, dv = _ordered_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, DQ, DQ_ACC, LOCKS, stride_t,
                            stride_dot, offs_n, offs_d, off_b, off_h, j, n_blocks, start_n, diag_end, H, T, qk_scale,
                            HEAD_DIM, SM_SCALE, BLOCK_N1, BLOCK_M1, True, COMPUTE, PRECISION, ORDERED)
    dk, dv = _ordered_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, DQ, DQ_ACC, LOCKS, stride_t,
                            stride_dot, offs_n, offs_d, off_b, off_h, j, n_blocks, diag_end, T, H, T, qk_scale,
                            HEAD_DIM, SM_SCALE, BLOCK_N1, BLOCK_M1, False, COMPUTE, PRECISION, ORDERED)
    dk *= SM_SCALE
    bthd = _bthd_offset(off_b, off_h, offs_n, offs_d, H, T, HEAD_DIM)
    tl.store(DK + bthd, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + bthd, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


DELTA_CONFIGS = {d: [triton.Config({"BLOCK": 64}, num_warps=4, num_stages=1)] for d in (64, 128)}
# The fifth matmul's BLOCK_M1 × D accumulator and the prefetched tile cost registers: of the candidates compiled for
# sm_90 (scripts/kernel_resources.py, no GPU needed), these use no local memory. The dK/dV kernel's configs spill here.
ORDERED_CONFIGS = {
    64: _configs(("BLOCK_N1", "BLOCK_M1"), _dkdv_ok, [(64, 32, 4, 3), (128, 32, 8, 3), (128, 16, 8, 3)]),
    128: _configs(("BLOCK_N1", "BLOCK_M1"), _dkdv_ok, [(64, 16, 8, 3), (128, 16, 8, 3), (32, 32, 4, 3)]),
}
MIN_BLOCK_M1 = 16  # the smallest query tile of any config: the counter buffer is sized for it

# device -> int32 counters, all 0 between calls (each call's last share resets its tile's). One buffer per device:
# two backward calls running at once on two streams would share it, so this backward is for one stream at a time.
_LOCKS = {}


def _locks(device, n):
    if device not in _LOCKS or _LOCKS[device].numel() < n:
        _LOCKS[device] = torch.zeros(n, dtype=torch.int32, device=device)  # grows only for a larger B·H·T
    return _LOCKS[device]


def attention_backward(do, q, k, v, o, lse, config=None, ordered=True):
    """Returns (dq, dk, dv), as attention/triton.py's attention_backward. ordered=False: dQ shares added by atomics."""
    B, H, T, D = q.shape
    q, k, v = base._unit_stride(q, k, v)
    if do.stride(-1) != 1:
        do = do.contiguous()
    if o.stride() != base._bthd_strides(o):
        o = _bthd(o).copy_(o)
    dq, dk, dv = _bthd(q), _bthd(k), _bthd(v)
    dq_acc = (torch.empty_like if ordered else torch.zeros_like)(dq, dtype=torch.float32)
    delta = torch.empty_like(lse)
    locks = _locks(q.device, B * H * triton.cdiv(T, MIN_BLOCK_M1))
    _launch(_attn_bwd_delta, DELTA_CONFIGS, None, "BLOCK", B, H, T, (o, do, delta, *do.stride()[:3], H, T), q.dtype, D)
    _launch(_attn_bwd_ordered, ORDERED_CONFIGS, config, "BLOCK_N1", B, H, T,
            (q, k, v, do, dq, dq_acc, dk, dv, lse, delta, locks, *q.stride()[:3], *do.stride()[:3], int(ordered), H, T),
            q.dtype, D)
    if not ordered:
        dq = (dq_acc * D**-0.5).to(q.dtype)
    return dq, dk, dv


@torch.library.custom_op("gpt2_attention_ordered_dq::triton_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(do, q, k, v, o, lse)


@_bwd_op.register_fake
def _(do, q, k, v, o, lse):
    return _bthd(q), _bthd(k), _bthd(v)


class _FlashAttention(base._FlashAttention):
    """attention/triton.py's forward with this backward."""

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        if torch.compiler.is_compiling():
            return _bwd_op(do, q, k, v, o, lse)
        return attention_backward(do, q, k, v, o, lse)


def causal_attention(q, k, v):
    base._check(q, k, v)
    return _FlashAttention.apply(q, k, v)
