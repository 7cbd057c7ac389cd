"""Softmax cross-entropy and its gradient in one kernel: the elementwise half of the fused LM head.

model.fused_lm_head_loss makes the logits one chunk of rows at a time (bf16 on the GPU) and needs, for each row x
with target t, the loss and the gradient of the loss's mean over all N rows:

    loss = logsumexp(x) - x[t]          grad = (softmax(x) - onehot(t)) / N

One program per row, in tiles of BLOCK_V columns: a first pass keeps a running max m_i and sum l_i of exp(x - m_i)
per lane (online softmax, combined across lanes at the end), a second pass writes exp(x - lse) - onehot. The row
(50,304 logits, 100 KB in bf16) is read twice and its gradient written once. Inductor compiles the same torch code
(model.loss_and_grad) into one kernel as well; on the H100, for a chunk of 16,384 rows, that one takes 2.32 ms and
this one 1.66 ms, tuned over tile width and warps (scripts/bench_cross_entropy.py, results/cross_entropy_h100.json).
A first version that held a whole row in registers, to read it only once, took 4.05 ms: it spills.

With GPTConfig.fp8_lm_head the second pass writes (softmax - onehot) * fp8_scale in float8_e5m2 instead, the operand
of the FP8 matmuls for grad_h and grad_W (one byte per logit, no cast pass), and `transposed` turns that gradient
(and h) for grad_W's matmul.

It runs eagerly, inside the LM head's opaque op (model.py), so torch.compile never traces it. Under TRITON_INTERPRET=1
(CPU tests) only fp32 logits are exact: the interpreter computes bf16 and float8 on raw bit patterns.
"""
import torch
import triton
import triton.language as tl

BLOCK_V, NUM_WARPS = 4096, 16
NEG = tl.constexpr(-3.0e38)  # a finite "minus infinity" for padded lanes: their running max and sum never meet inf - inf


@triton.jit
def _cross_entropy_kernel(logits_ptr, targets_ptr, grad_ptr, loss_ptr, V, stride_row, scale, fp8_scale, ignore_index,
                          BLOCK_V: tl.constexpr, FP8: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * stride_row  # passes 2^31 for chunks of more than 42,000 rows
    m_i = tl.full([BLOCK_V], NEG, tl.float32)
    l_i = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits_ptr + base + cols, mask=cols < V, other=NEG).to(tl.float32)
        m_new = tl.maximum(m_i, x)
        l_i = l_i * tl.exp(m_i - m_new) + tl.exp(x - m_new)
        m_i = m_new
    m = tl.max(m_i, axis=0)
    lse = m + tl.log(tl.sum(l_i * tl.exp(m_i - m), axis=0))
    target = tl.load(targets_ptr + row)
    keep = target != ignore_index  # an ignored row: loss and gradient 0, its target (-100: no column) never read
    x_target = tl.load(logits_ptr + base + target, mask=keep, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(keep, lse - x_target, 0.0))
    scale = tl.where(keep, tl.cast(scale, tl.float32), 0.0)  # Inductor passes Python floats as fp64
    fp8_scale = tl.where(keep, tl.cast(fp8_scale, tl.float32), 0.0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits_ptr + base + cols, mask=cols < V, other=NEG).to(tl.float32)
        grad = tl.exp(x - lse) - (cols == target).to(tl.float32)
        if FP8:  # contiguous rows of V bytes
            tl.store(grad_ptr + row.to(tl.int64) * V + cols, (grad * fp8_scale).to(grad_ptr.dtype.element_ty),
                     mask=cols < V)
        else:
            tl.store(grad_ptr + base + cols, (grad * scale).to(grad_ptr.dtype.element_ty), mask=cols < V)


def loss_and_grad(logits, targets, scale, fp8_scale=None, ignore_index=-100, block=BLOCK_V, num_warps=NUM_WARPS):
    """For logits (N, V) and targets (N,): each row's loss (fp32, (N,)) and the gradient, (softmax - onehot) * scale
    in the logits' dtype and layout, or, given fp8_scale, (softmax - onehot) * fp8_scale in float8_e5m2, contiguous;
    a row whose target is ignore_index (F.cross_entropy's default) gets loss 0 and a zero gradient. The launch
    settings are arguments for the benchmark."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n, vocab = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    fp8 = fp8_scale is not None
    grad = (torch.empty(n, vocab, dtype=torch.float8_e5m2, device=logits.device) if fp8 else
            torch.empty_strided(logits.shape, logits.stride(), dtype=logits.dtype, device=logits.device))
    _cross_entropy_kernel[(n,)](logits, targets, grad, loss, vocab, logits.stride(0), scale, fp8_scale or 0.0,
                                ignore_index, BLOCK_V=min(block, triton.next_power_of_2(vocab)), FP8=fp8,
                                num_warps=num_warps)
    return loss, grad


@triton.jit
def _transpose_kernel(x_ptr, y_ptr, N, V, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tile = tl.load(x_ptr + rows[:, None].to(tl.int64) * V + cols[None, :], mask=(rows[:, None] < N) & (cols[None, :] < V))
    tl.store(y_ptr + cols[:, None].to(tl.int64) * N + rows[None, :], tl.trans(tile),
             mask=(cols[:, None] < V) & (rows[None, :] < N))


def transposed(x, block=128, num_warps=8):
    """xᵀ, contiguous, for a contiguous one-byte x (N, V): a tile at a time through shared memory, so both the reads
    and the writes are whole rows. cuBLAS's FP8 matmul takes its first operand row-major and its second column-major,
    so grad_W = gradᵀ @ h needs the gradient and h transposed; torch's copy does it at a fraction of this speed."""
    n, v = x.shape
    y = torch.empty(v, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block), triton.cdiv(v, block))
    _transpose_kernel[grid](x.view(torch.uint8), y.view(torch.uint8), n, v, BLOCK=block, num_warps=num_warps)
    return y
