"""Causal flash attention for Hopper (sm_90), written in Gluon: warp-specialised, FlashAttention-3's design.

Forward, one program per (BLOCK_M query rows, batch·head), heaviest query tiles first:

* a producer partition (one warp, few registers) issues TMA copies: the Q tile once, then the K and V tiles from the
  diagonal leftwards into a ring of STAGES shared-memory slots, each slot guarded by mbarriers (k_ready / v_ready
  filled by the TMA engine's byte count; k_empty and v_empty released by the consumers, K_j as soon as S_j is
  computed);
* the consumer partition (two warpgroups, 64 query rows each, most of the registers) runs the online softmax. Its
  wgmmas are asynchronous: S_j = Q K_jᵀ is issued, then P_{j-1} V_{j-1}; once S_j is done, its softmax (running max
  m_i, running sum l_i, P_j kept in registers as the next wgmma's A operand) runs, and acc is rescaled by
  alpha = exp2(m_old - m_new) once P_{j-1} V_{j-1} is done. The wait for P_{j-1} V_{j-1} is written after the softmax,
  but ptxas moves it ahead of the exponentials (KERNEL_NOTES.md, v15), so a softmax overlaps the other warpgroup's
  matmuls (the turns), not its own warpgroup's. Exponentials are exp2 with
  log2(e)·D^-½ folded into one constant. The diagonal tile (BLOCK_N = BLOCK_M) is the first one visited and the only
  one masked; tiles above the diagonal are never loaded.

It writes O = acc / l_i through TMA and the base-2 row logsumexp lse = m_i + log2(l_i), the same outputs as the
portable kernel in attention/triton.py.

Memory traffic per (batch, head): Q read once, K and V read once per query tile (T/BLOCK_M times, mostly from L2),
O and lse written once. The inputs are the model's strided (B, H, T, D) views of its fused qkv projection, read
through 4-D TMA descriptors: rows past T load as zeros and are not stored, so any T works.

Backward (FlashAttention-3's layout), with delta = rowsum(dO ∘ O) and dS = P ∘ (dP - delta): one program per
BLOCK_N = 128 keys of one (batch, head), key tile 0 (which meets every query tile) first:

* the producer warp loads the program's K and V once and streams Q_i and dO_i, BLOCK_M query rows at a time from the
  diagonal down, through a ring of STAGES slots;
* two consumer warpgroups own 64 keys each and hold their dK and dV in registers. Per query tile they compute
  transposed tiles (keys along rows), so that P and dS need no transpose: Sᵀ = K Qᵀ and dPᵀ = V dOᵀ,
  Pᵀ = exp2(Sᵀ - lse), dV += Pᵀ dO, dSᵀ = Pᵀ ∘ (dPᵀ - delta), dK += dSᵀ Q, and their share of dQ = dS K over their
  own 64 keys (through dSᵀ in shared memory), which they add to an fp32 dQ in global memory with the TMA engine's
  reduce-add.

Five matmuls per tile (the tl backward's dQ kernel recomputes Sᵀ and dPᵀ: seven). Two small tl kernels around it
compute delta (zeroing the fp32 dQ) and cast dQ. Memory traffic per (batch, head): K, V, dK, dV once; Q, dO, lse,
delta once per key tile (mostly from L2); the fp32 dQ read-modify-written in L2 twice per key tile (once per
warpgroup). dK and dV are written by one program each, bitwise repeatable; dQ's fp32 additions arrive in any order,
so it is not.

Gluon (triton.experimental.gluon) is experimental and its API changes between Triton releases: attention/triton.py uses
this file on the Triton version it was tested with (its GLUON flag), on sm_90, and the portable kernels everywhere
else.
"""
import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
import triton.language as tl
from triton._C.libtriton import ir
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, \
    warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from attention import triton as base

LOG2E = 1.4426950408889634

# Per head dim: STAGES of the forward's K/V ring. Each consumer warpgroup owns WG_ROWS query rows, so a program
# covers BLOCK_M = CONSUMERS·WG_ROWS rows; BLOCK_N = BLOCK_M, so that the diagonal is one tile. Shared memory:
# Q/O rows + STAGES·2 K/V tiles, (BLOCK_M + 2·STAGES·BLOCK_N)·D·2 bytes.
WG_ROWS = 64
CONSUMERS = 2
FWD_CONFIGS = {64: 3, 128: 2}


@gluon.jit
def _ring_load(desc, coord, smem, ready, empty, slot, free):
    """One TMA tile into `slot` of a ring once every consumer has released the slot's last use (`free`: the phase of
    its empty barrier to wait for; the first pass waits on the phase before the first, which counts as complete)."""
    mbarrier.wait(empty.index(slot), free)
    mbarrier.expect(ready.index(slot), desc.block_type.nbytes)
    tma.async_copy_global_to_shared(desc, coord, ready.index(slot), smem.index(slot))


@gluon.jit
def _fwd_producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                  off_b, off_h, start_m, n_tiles, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                  CONSUMERS: gl.constexpr, WG_ROWS: gl.constexpr):
    """TMA loads: each consumer's Q rows once, then K_j and V_j for j = diagonal, diagonal-1, ..., 0 into slot
    j % STAGES of the K ring and of the V ring."""
    mbarrier.expect(q_bar, CONSUMERS * q_desc.block_type.nbytes)
    for c in gl.static_range(CONSUMERS):
        tma.async_copy_global_to_shared(q_desc, [off_b, off_h, start_m + c * WG_ROWS, 0], q_bar, q_smem.index(c))
    for i in range(n_tiles):
        s = i % STAGES
        # A slot is free once every consumer released its previous use: K_j once S_j is computed, V_j once P_j V_j
        # is, so K_{j+STAGES} loads while P_j V_j is still on the tensor cores.
        free = ((i // STAGES) & 1) ^ 1
        start_n = start_m - i * BLOCK_N
        _ring_load(k_desc, [off_b, off_h, start_n, 0], k_smem, k_ready, k_empty, s, free)
        _ring_load(v_desc, [off_b, off_h, start_n, 0], v_smem, v_ready, v_empty, s, free)


@gluon.jit
def _fwd_consumer(C: gl.constexpr, o_desc, LSE, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
                  turn, off_b, off_h, bh, start_m, n_tiles, T, QK_SCALE: gl.constexpr, BLOCK_N: gl.constexpr,
                  HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, CONSUMERS: gl.constexpr, WG_ROWS: gl.constexpr):
    """Consumer warpgroup C: the online softmax over its WG_ROWS query rows. The consumers take turns issuing their
    wgmmas (turn barriers, FlashAttention-3's ping-pong), so that one's softmax runs while another's matmuls use
    the tensor cores."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    dtype: gl.constexpr = q_smem.dtype
    q_tile = q_smem.index(C)
    q = q_tile.reshape([WG_ROWS, HEAD_DIM])
    zero_s = gl.zeros([WG_ROWS, BLOCK_N], gl.float32, s_layout)
    next_turn = turn.index((C + 1) % CONSUMERS)
    my_turn = turn.index(C)
    FIRST: gl.constexpr = 1 if C == 0 else 0  # consumer 0 goes first: its first wait is on the phase before the first

    # The diagonal tile, first and alone in being masked: each row's own key is in it, so m_i is finite after it.
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_ready.index(0), 0)
    k = k_smem.index(0).reshape([BLOCK_N, HEAD_DIM])
    mbarrier.wait(my_turn, FIRST)
    s_tok = warpgroup_mma(q, k.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    mbarrier.arrive(next_turn)
    s = warpgroup_mma_wait(0, deps=[s_tok, q, k])[0]
    mbarrier.arrive(k_empty.index(0))
    offs_m = start_m + C * WG_ROWS + gl.arange(0, WG_ROWS, row_s)
    offs_n = start_m + gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
    s = gl.where(offs_m[:, None] >= offs_n[None, :], s * QK_SCALE, float("-inf"))
    m_i = gl.max(s, 1)
    p = gl.exp2(s - m_i[:, None])
    l_i = gl.sum(p, 1)
    acc = gl.zeros([WG_ROWS, HEAD_DIM], gl.float32, o_layout)

    for i in range(1, n_tiles):
        slot = i % STAGES
        prev = (i - 1) % STAGES
        # S_j = Q K_jᵀ first, then P_{j-1} V_{j-1}: waiting until one group is outstanding then means S_j is done
        # while the tensor cores may still work on P_{j-1} V_{j-1}.
        mbarrier.wait(k_ready.index(slot), (i // STAGES) & 1)
        mbarrier.wait(v_ready.index(prev), ((i - 1) // STAGES) & 1)
        k = k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM])
        v = v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM])
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        mbarrier.wait(my_turn, (i & 1) ^ FIRST)
        s_tok = warpgroup_mma(q, k.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        acc_tok = warpgroup_mma(p_op, v, acc, is_async=True)
        mbarrier.arrive(next_turn)
        s = warpgroup_mma_wait(1, deps=[s_tok, q, k])[0]
        mbarrier.arrive(k_empty.index(slot))
        # m_i is kept in scaled units; the max is taken on the raw scores, so each score costs one FMA and one exp2.
        m_new = gl.maximum(m_i, gl.max(s, 1) * QK_SCALE)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * QK_SCALE - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc = warpgroup_mma_wait(0, deps=[acc_tok, p_op, v])[0]
        mbarrier.arrive(v_empty.index(prev))
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]

    last = (n_tiles - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // STAGES) & 1)
    v = v_smem.index(last).reshape([BLOCK_N, HEAD_DIM])
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    acc_tok = warpgroup_mma(p_op, v, acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=[acc_tok, p_op, v])[0]

    acc = acc / gl.convert_layout(l_i, row_o)[:, None]
    # The Q rows are free now: O goes out through them.
    q.store(acc.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [off_b, off_h, start_m + C * WG_ROWS, 0], q_tile)
    lse = m_i + gl.log2(l_i)
    gl.store(LSE + bh * T + offs_m, lse, mask=offs_m < T)
    tma.store_wait(0)


@gluon.jit
def _ring_barriers(STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
    """The barriers of one ring of STAGES shared-memory slots: per slot, `ready` (completed by the TMA engine's byte
    count, after the producer's expect) and `empty` (completed when each of the CONSUMERS has released the slot)."""
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=CONSUMERS)
    return ready, empty


@gluon.jit
def _attn_fwd_ws(q_desc, k_desc, v_desc, o_desc, LSE, H, T, BH, QK_SCALE: gl.constexpr, HEAD_DIM: gl.constexpr,
                 STAGES: gl.constexpr, CONSUMERS: gl.constexpr, WG_ROWS: gl.constexpr):
    BLOCK_N: gl.constexpr = CONSUMERS * WG_ROWS
    gl.static_assert(k_desc.block_type.shape[2] == BLOCK_N)
    # Heaviest query tiles first: program 0 takes the last tile, which visits the most key tiles.
    tile = gl.num_programs(0) - 1 - gl.program_id(0)
    bh = gl.program_id(2) * gl.num_programs(1) + gl.program_id(1)
    if bh >= BH:  # the grid folds batch·head over two axes and may run a few programs past the end
        return
    off_b = bh // H
    off_h = bh % H
    start_m = tile * BLOCK_N
    n_tiles = tile + 1

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready, k_empty = _ring_barriers(STAGES, CONSUMERS)
    v_ready, v_empty = _ring_barriers(STAGES, CONSUMERS)
    turn = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for c in gl.static_range(CONSUMERS):
        mbarrier.init(turn.index(c), count=1)

    # The consumers are the default partition (consumer 0) and CONSUMERS - 1 workers of 4 warps at 240 registers a
    # thread; the producer is one warp at 24 (FlashAttention-3's budgets).
    if CONSUMERS == 2:
        gl.warp_specialize([
            (_fwd_consumer, (0, o_desc, LSE, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, turn,
                             off_b, off_h, bh, start_m, n_tiles, T, QK_SCALE, BLOCK_N, HEAD_DIM, STAGES, CONSUMERS, WG_ROWS)),
            (_fwd_consumer, (1, o_desc, LSE, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, turn,
                             off_b, off_h, bh, start_m, n_tiles, T, QK_SCALE, BLOCK_N, HEAD_DIM, STAGES, CONSUMERS, WG_ROWS)),
            (_fwd_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty,
                             v_empty, off_b, off_h, start_m, n_tiles, BLOCK_N, STAGES, CONSUMERS, WG_ROWS)),
        ], [4, 1], [240, 24])


_GL_DTYPE = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}


@functools.lru_cache(maxsize=None)
def _tile_layout(rows, cols, dtype):
    """The shared-memory layout of a (1, 1, rows, cols) TMA tile: the widest swizzle its rows allow."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, cols], _GL_DTYPE[dtype])


def _run(kernel, grid, args, constexprs, device):
    """Launches a kernel of this file (4 warps: one warpgroup, or the default partition): through Triton's own launch
    the first time, then directly (attention/triton.py's _keep)."""
    key = (kernel, device, *map(base._specialization, args), *constexprs.values())
    entry = base._COMPILED.get(key)
    if entry is not None:
        entry[0](grid, device, args)
        return
    compiled = kernel[grid](*base._made(args), **constexprs, num_warps=4)
    base._keep(key, kernel, compiled, constexprs, None, len(args))


def forward(q, k, v, o, lse):
    """Launches the forward on (B, H, T, D) q, k, v (one set of strides, unit stride along D, TMA-aligned) into o
    (ours, (B, T, H, D) memory order) and lse (B, H, T), through attention/triton.py's launch path."""
    B, H, T, D = q.shape
    block_n = CONSUMERS * WG_ROWS
    descs = [base._Desc(x, rows, TensorDescriptor, _tile_layout(rows, D, x.dtype))
             for x, rows in ((q, WG_ROWS), (k, block_n), (v, block_n), (o, WG_ROWS))]
    constexprs = dict(QK_SCALE=D**-0.5 * LOG2E, HEAD_DIM=D, STAGES=FWD_CONFIGS[D], CONSUMERS=CONSUMERS,
                      WG_ROWS=WG_ROWS)
    _run(_attn_fwd_ws, base._grid(T, block_n, B * H), (*descs, lse, H, T, B * H), constexprs, q.device)


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------
# Per head dim: BLOCK_M query rows per step, STAGES of the Q/dO ring, EARLY_DV (see _bwd_step). A program owns
# BLOCK_N = CONSUMERS·WG_ROWS keys.
BWD_CONFIGS = {64: dict(BLOCK_M=64, STAGES=2, EARLY_DV=True), 128: dict(BLOCK_M=64, STAGES=2, EARLY_DV=False)}


@builtin
def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """global[coord...] += src, element-wise in fp32, by the TMA engine (cp.reduce.async.bulk.tensor.add): Gluon 3.6
    has the operation but no Python name for it. Completes like a TMA store (tma.store_wait)."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


@gluon.jit
def _bwd_producer(k_desc, v_desc, q_desc, do_desc, k_smem, v_smem, q_smem, do_smem, kv_bar, q_ready, do_ready,
                  q_empty, do_empty, off_b, off_h, start_n, n_steps, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                  CONSUMERS: gl.constexpr, WG_ROWS: gl.constexpr):
    """TMA loads: each consumer's K and V rows once, then Q_i and dO_i for the query tiles i from the diagonal down
    into slot i % STAGES of the Q ring and of the dO ring."""
    mbarrier.expect(kv_bar, CONSUMERS * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
    for c in gl.static_range(CONSUMERS):
        tma.async_copy_global_to_shared(k_desc, [off_b, off_h, start_n + c * WG_ROWS, 0], kv_bar, k_smem.index(c))
        tma.async_copy_global_to_shared(v_desc, [off_b, off_h, start_n + c * WG_ROWS, 0], kv_bar, v_smem.index(c))
    for i in range(n_steps):
        s = i % STAGES
        free = ((i // STAGES) & 1) ^ 1
        start_m = start_n + i * BLOCK_M
        _ring_load(q_desc, [off_b, off_h, start_m, 0], q_smem, q_ready, q_empty, s, free)
        _ring_load(do_desc, [off_b, off_h, start_m, 0], do_smem, do_ready, do_empty, s, free)


@gluon.jit
def _bwd_step(i, dk, dv, k, v, q_smem, do_smem, ds_tile, dq_tile, dq_desc, q_ready, do_ready, q_empty, do_empty,
              LSE, DELTA, off_b, off_h, bh, start_n, offs_n, T, QK_SCALE: gl.constexpr, BLOCK_M: gl.constexpr,
              HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, WG_ROWS: gl.constexpr, MASKED: gl.constexpr,
              EARLY_DV: gl.constexpr, DQ_COLS: gl.constexpr = 64):
    """One query tile against this warpgroup's WG_ROWS keys, transposed (keys along rows): Sᵀ = K Qᵀ and dPᵀ = V dOᵀ,
    Pᵀ = exp2(Sᵀ - lse), dV += Pᵀ dO, dSᵀ = Pᵀ ∘ (dPᵀ - delta), dK += dSᵀ Q, and this warpgroup's share of
    dQ = dS K, added to the fp32 dQ in global memory by TMA."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    d_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=d_layout, k_width=2)
    dtype: gl.constexpr = q_smem.dtype
    slot = i % STAGES
    phase = (i // STAGES) & 1
    start_m = start_n + i * BLOCK_M
    offs_m = start_m + gl.arange(0, BLOCK_M, gl.SliceLayout(0, s_layout))
    # Rows past T: lse = +inf makes their P exactly 0.
    lse = gl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=float("inf"))
    delta = gl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
    zero_s = gl.zeros([WG_ROWS, BLOCK_M], gl.float32, s_layout)

    mbarrier.wait(q_ready.index(slot), phase)
    q = q_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
    st_tok = warpgroup_mma(k, q.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    mbarrier.wait(do_ready.index(slot), phase)
    do = do_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
    dpt_tok = warpgroup_mma(v, do.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    if EARLY_DV:  # dV's matmul overlaps dPᵀ's wait
        st = warpgroup_mma_wait(1, deps=[st_tok, k, q])[0]
        pt = gl.exp2(st * QK_SCALE - lse[None, :])
        if MASKED:
            pt = gl.where(offs_m[None, :] >= offs_n[:, None], pt, 0.0)
        pt_op = gl.convert_layout(pt.to(dtype), op_layout)
        dv_tok = warpgroup_mma(pt_op, do, dv, is_async=True)
        dpt = warpgroup_mma_wait(1, deps=[dpt_tok, v, do])[0]
        dst = (pt * (dpt - delta[None, :])).to(dtype)
    else:  # fewer registers live at once: Sᵀ and dPᵀ become Pᵀ and dSᵀ in place, then bf16
        st, dpt = warpgroup_mma_wait(0, deps=[st_tok, dpt_tok, k, q, v, do])[:2]
        pt = gl.exp2(st * QK_SCALE - lse[None, :])
        if MASKED:
            pt = gl.where(offs_m[None, :] >= offs_n[:, None], pt, 0.0)
        dst = (pt * (dpt - delta[None, :])).to(dtype)
        pt_op = gl.convert_layout(pt.to(dtype), op_layout)
        dv_tok = warpgroup_mma(pt_op, do, dv, is_async=True)
    ds_tile.store(dst)
    dst_op = gl.convert_layout(dst, op_layout)
    dk_tok = warpgroup_mma(dst_op, q, dk, is_async=True)
    fence_async_shared()
    # dQ = dS K in column blocks of DQ_COLS: at D = 128 a whole (BLOCK_M, D) fp32 tile on top of dK and dV does not fit
    # the registers.
    q_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, DQ_COLS, 16])
    dq_rows = dq_tile.reshape([BLOCK_M, HEAD_DIM])
    tma.store_wait(0)  # the previous step's dQ has left dq_tile
    for c in gl.static_range(HEAD_DIM // DQ_COLS):
        k_cols = k.slice(c * DQ_COLS, DQ_COLS, dim=1)
        dq_tok = warpgroup_mma(ds_tile.permute((1, 0)), k_cols, gl.zeros([BLOCK_M, DQ_COLS], gl.float32, q_layout),
                               use_acc=False, is_async=True)
        dq = warpgroup_mma_wait(0, deps=[dq_tok, ds_tile, k_cols])[0]
        dq_rows.slice(c * DQ_COLS, DQ_COLS, dim=1).store(dq)
    dv, dk = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, pt_op, dst_op, q, do])[:2]
    mbarrier.arrive(q_empty.index(slot))
    mbarrier.arrive(do_empty.index(slot))
    fence_async_shared()
    _tma_reduce_add(dq_desc, [off_b, off_h, start_m, 0], dq_tile)
    return dk, dv


@gluon.jit
def _bwd_consumer(C: gl.constexpr, dq_desc, dk_desc, dv_desc, LSE, DELTA, k_smem, v_smem, q_smem, do_smem, ds_smem,
                  dq_smem, kv_bar, q_ready, do_ready, q_empty, do_empty, off_b, off_h, bh, start_n, n_steps, T,
                  QK_SCALE: gl.constexpr, SM_SCALE: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                  STAGES: gl.constexpr, CONSUMERS: gl.constexpr, WG_ROWS: gl.constexpr, EARLY_DV: gl.constexpr):
    """Consumer warpgroup C: dK and dV of its WG_ROWS keys, accumulated in registers over the query tiles."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    d_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    dtype: gl.constexpr = q_smem.dtype
    k_tile = k_smem.index(C)
    v_tile = v_smem.index(C)
    k = k_tile.reshape([WG_ROWS, HEAD_DIM])
    v = v_tile.reshape([WG_ROWS, HEAD_DIM])
    ds_tile = ds_smem.index(C)
    dq_tile = dq_smem.index(C)
    offs_n = start_n + C * WG_ROWS + gl.arange(0, WG_ROWS, gl.SliceLayout(1, s_layout))
    dk = gl.zeros([WG_ROWS, HEAD_DIM], gl.float32, d_layout)
    dv = gl.zeros([WG_ROWS, HEAD_DIM], gl.float32, d_layout)
    mbarrier.wait(kv_bar, 0)
    # The query tiles that meet the program's diagonal block are masked; every later one is wholly below it.
    n_masked = gl.minimum(n_steps, CONSUMERS * WG_ROWS // BLOCK_M)
    for i in range(n_masked):
        dk, dv = _bwd_step(i, dk, dv, k, v, q_smem, do_smem, ds_tile, dq_tile, dq_desc, q_ready, do_ready, q_empty,
                           do_empty, LSE, DELTA, off_b, off_h, bh, start_n, offs_n, T, QK_SCALE, BLOCK_M, HEAD_DIM,
                           STAGES, WG_ROWS, True, EARLY_DV)
    for i in range(n_masked, n_steps):
        dk, dv = _bwd_step(i, dk, dv, k, v, q_smem, do_smem, ds_tile, dq_tile, dq_desc, q_ready, do_ready, q_empty,
                           do_empty, LSE, DELTA, off_b, off_h, bh, start_n, offs_n, T, QK_SCALE, BLOCK_M, HEAD_DIM,
                           STAGES, WG_ROWS, False, EARLY_DV)
    # dS is the gradient of the scaled scores: dK = scale · dSᵀ Q. K and V's rows are free now: dK and dV leave
    # through them.
    k.store((dk * SM_SCALE).to(dtype))
    v.store(dv.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dk_desc, [off_b, off_h, start_n + C * WG_ROWS, 0], k_tile)
    tma.async_copy_shared_to_global(dv_desc, [off_b, off_h, start_n + C * WG_ROWS, 0], v_tile)
    tma.store_wait(0)


@gluon.jit
def _attn_bwd_ws(q_desc, k_desc, v_desc, do_desc, dq_desc, dk_desc, dv_desc, LSE, DELTA, H, T, BH,
                 QK_SCALE: gl.constexpr, SM_SCALE: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                 STAGES: gl.constexpr, CONSUMERS: gl.constexpr, WG_ROWS: gl.constexpr, EARLY_DV: gl.constexpr):
    BLOCK_N: gl.constexpr = CONSUMERS * WG_ROWS
    gl.static_assert(BLOCK_N % BLOCK_M == 0)
    tile = gl.program_id(0)  # key tile 0 meets every query tile: the heaviest come first
    bh = gl.program_id(2) * gl.num_programs(1) + gl.program_id(1)
    if bh >= BH:
        return
    off_b = bh // H
    off_h = bh % H
    start_n = tile * BLOCK_N
    n_steps = gl.cdiv(T - start_n, BLOCK_M)

    dtype: gl.constexpr = q_desc.dtype
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([WG_ROWS, BLOCK_M], dtype)
    k_smem = gl.allocate_shared_memory(dtype, [CONSUMERS] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [CONSUMERS] + v_desc.block_type.shape, v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    ds_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, WG_ROWS, BLOCK_M], ds_layout)
    dq_smem = gl.allocate_shared_memory(gl.float32, [CONSUMERS] + dq_desc.block_type.shape, dq_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready, q_empty = _ring_barriers(STAGES, CONSUMERS)
    do_ready, do_empty = _ring_barriers(STAGES, CONSUMERS)
    mbarrier.init(kv_bar, count=1)

    if CONSUMERS == 2:
        gl.warp_specialize([
            (_bwd_consumer, (0, dq_desc, dk_desc, dv_desc, LSE, DELTA, k_smem, v_smem, q_smem, do_smem, ds_smem,
                             dq_smem, kv_bar, q_ready, do_ready, q_empty, do_empty, off_b, off_h, bh, start_n, n_steps,
                             T, QK_SCALE, SM_SCALE, BLOCK_M, HEAD_DIM, STAGES, CONSUMERS, WG_ROWS, EARLY_DV)),
            (_bwd_consumer, (1, dq_desc, dk_desc, dv_desc, LSE, DELTA, k_smem, v_smem, q_smem, do_smem, ds_smem,
                             dq_smem, kv_bar, q_ready, do_ready, q_empty, do_empty, off_b, off_h, bh, start_n, n_steps,
                             T, QK_SCALE, SM_SCALE, BLOCK_M, HEAD_DIM, STAGES, CONSUMERS, WG_ROWS, EARLY_DV)),
            (_bwd_producer, (k_desc, v_desc, q_desc, do_desc, k_smem, v_smem, q_smem, do_smem, kv_bar, q_ready,
                             do_ready, q_empty, do_empty, off_b, off_h, start_n, n_steps, BLOCK_M, STAGES, CONSUMERS,
                             WG_ROWS)),
        ], [4, 1], [240, 24])


@triton.jit
def _bwd_prep(O, DO, DELTA, DQ_ACC, stride_dob, stride_doh, stride_dot, H, T, BH, HEAD_DIM: tl.constexpr,
              BLOCK: tl.constexpr):
    """delta = rowsum(dO ∘ O) for BLOCK rows of one batch·head, and those rows of the fp32 dQ zeroed."""
    bh = base._batch_head()
    if bh >= BH:
        return
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    bthd = base._bthd_offset(off_b, off_h, offs_m, offs_d, H, T, HEAD_DIM)
    o = tl.load(O + bthd, mask=row_ok[:, None], other=0.0)
    do = tl.load(base._rows(DO + off_b * stride_dob + off_h * stride_doh, offs_m, stride_dot, offs_d),
                 mask=row_ok[:, None], other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), mask=row_ok)
    tl.store(DQ_ACC + bthd, tl.zeros([BLOCK, HEAD_DIM], tl.float32), mask=row_ok[:, None])


@triton.jit
def _bwd_dq_cast(DQ_ACC, DQ, N, SM_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """dQ = scale · (the fp32 sum of dS K), cast to the input dtype; both in (B, T, H, D) order, so element-wise."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    tl.store(DQ + offs, (tl.load(DQ_ACC + offs, mask=ok) * SM_SCALE).to(DQ.dtype.element_ty), mask=ok)


PREP_ROWS = 64
CAST_BLOCK = 4096




def backward(do, q, k, v, o, lse, dq, dk, dv):
    """dq, dk, dv (ours, (B, T, H, D) memory order) from dO and the forward's o (ours) and lse, for (B, H, T, D) q, k,
    v and dO with unit stride along D, TMA-aligned. Three launches: delta (and the fp32 dQ zeroed), the warp-specialised
    kernel, the cast of dQ."""
    B, H, T, D = q.shape
    config = BWD_CONFIGS[D]
    block_m = config["BLOCK_M"]
    block_n = CONSUMERS * WG_ROWS
    delta = torch.empty_like(lse)
    dq_acc = torch.empty((B, T, H, D), dtype=torch.float32, device=q.device)
    dq_acc_bhtd = dq_acc.transpose(1, 2)
    _run(_bwd_prep, base._grid(T, PREP_ROWS, B * H), (o, do, delta, dq_acc, *do.stride()[:3], H, T, B * H),
         dict(HEAD_DIM=D, BLOCK=PREP_ROWS), q.device)
    descs = [base._Desc(x, rows, TensorDescriptor, _tile_layout(rows, D, x.dtype))
             for x, rows in ((q, block_m), (k, WG_ROWS), (v, WG_ROWS), (do, block_m), (dq_acc_bhtd, block_m),
                             (dk, WG_ROWS), (dv, WG_ROWS))]
    constexprs = dict(QK_SCALE=D**-0.5 * LOG2E, SM_SCALE=D**-0.5, HEAD_DIM=D, **config, CONSUMERS=CONSUMERS,
                      WG_ROWS=WG_ROWS)
    _run(_attn_bwd_ws, base._grid(T, block_n, B * H), (*descs, lse, delta, H, T, B * H), constexprs, q.device)
    n = dq_acc.numel()
    _run(_bwd_dq_cast, (base._cdiv(n, CAST_BLOCK), 1, 1), (dq_acc, dq, n), dict(SM_SCALE=D**-0.5, BLOCK=CAST_BLOCK),
         q.device)
