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
portable kernel in attention/triton.py, whose backward consumes them.

Memory traffic per (batch, head): Q read once, K and V read once per query tile (T/BLOCK_M times, mostly from L2),
O and lse written once. The inputs are the model's strided (B, H, T, D) views of its fused qkv projection, read
through 4-D TMA descriptors: rows past T load as zeros and are not stored, so any T works.

Gluon (triton.experimental.gluon) is experimental and its API changes between Triton releases: attention/triton.py uses
this file on the Triton version it was tested with (its GLUON flag), on sm_90, and the portable kernel everywhere else.
"""
import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, \
    warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from attention import triton as base

LOG2E = 1.4426950408889634

# Per head dim: (BLOCK_N, STAGES of the K/V ring). Each consumer warpgroup owns WG_ROWS query rows, so a program
# covers BLOCK_M = CONSUMERS·WG_ROWS rows; BLOCK_N = BLOCK_M, so that the diagonal is one tile. Shared memory:
# Q/O rows + STAGES·2 K/V tiles, (BLOCK_M + 2·STAGES·BLOCK_N)·D·2 bytes.
WG_ROWS = 64
CONSUMERS = 2
FWD_CONFIGS = {64: 3, 128: 2}


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
        # is, so K_{j+STAGES} loads while P_j V_j is still on the tensor cores. The first pass waits on the phase
        # before the barrier's first, which counts as complete.
        free = ((i // STAGES) & 1) ^ 1
        start_n = start_m - i * BLOCK_N
        mbarrier.wait(k_empty.index(s), free)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [off_b, off_h, start_n, 0], k_ready.index(s), k_smem.index(s))
        mbarrier.wait(v_empty.index(s), free)
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [off_b, off_h, start_n, 0], v_ready.index(s), v_smem.index(s))


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
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=CONSUMERS)
        mbarrier.init(v_empty.index(s), count=CONSUMERS)
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


_GL_DTYPE = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@functools.lru_cache(maxsize=None)
def _tile_layout(rows, head_dim, dtype):
    """The shared-memory layout of a (1, 1, rows, head_dim) TMA tile: the widest swizzle its rows allow."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim], _GL_DTYPE[dtype])


def forward(q, k, v, o, lse):
    """Launches the forward on (B, H, T, D) q, k, v (one set of strides, unit stride along D, TMA-aligned) into o
    (ours, (B, T, H, D) memory order) and lse (B, H, T), through attention/triton.py's launch path."""
    B, H, T, D = q.shape
    block_n = CONSUMERS * WG_ROWS
    descs = [base._Desc(x, rows, TensorDescriptor, _tile_layout(rows, D, x.dtype))
             for x, rows in ((q, WG_ROWS), (k, block_n), (v, block_n), (o, WG_ROWS))]
    args = (*descs, lse, H, T, B * H)
    grid = base._grid(T, block_n, B * H)
    key = (_attn_fwd_ws, q.device, D, *map(base._specialization, args))
    entry = base._COMPILED.get(key)
    if entry is not None:
        entry[0](grid, q.device, args)
        return
    constexprs = dict(QK_SCALE=D**-0.5 * LOG2E, HEAD_DIM=D, STAGES=FWD_CONFIGS[D], CONSUMERS=CONSUMERS,
                      WG_ROWS=WG_ROWS)
    compiled = _attn_fwd_ws[grid](*base._made(args), **constexprs, num_warps=4)
    base._keep(key, _attn_fwd_ws, compiled, constexprs, block_n, len(args))
