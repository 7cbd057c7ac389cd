"""Softmax cross-entropy and its gradient in one pass over the logits: the elementwise half of the fused LM head.

model.fused_lm_head_loss makes the logits one chunk of rows at a time (bf16 on the GPU) and needs, for each row x
with target t, the loss and the gradient of the loss's mean over all N rows:

    loss = logsumexp(x) - x[t]          grad = (softmax(x) - onehot(t)) / N

Written in torch, Inductor turns this into two passes over the chunk: an online-softmax reduction that reads the
logits, then the gradient, which reads them again and writes the result (a row of 50,304 values is too long for
its single-pass "persistent" reductions). Here one program owns one whole row: BLOCK_V, the next power of two of
V, values held in registers (at V = 50,304 and 16 warps, 128 fp32 values a thread), so it reads each logit once
and writes its gradient once: 4 bytes of traffic per bf16 logit instead of 6. At GPT-2's batch of 2^19 tokens
that is 53 GB less memory traffic per optimizer step.

The op is an opaque torch.library.custom_op, so torch.compile calls it as it is (fullgraph, no breaks). Under
TRITON_INTERPRET=1 (CPU tests) only fp32 logits are exact: the interpreter computes bf16 on raw bit patterns.
"""
import torch
import triton
import triton.language as tl

MAX_VOCAB = 65536  # beyond this a row no longer fits in registers; model.py keeps the torch path there


@triton.jit
def _cross_entropy_kernel(logits_ptr, targets_ptr, grad_ptr, loss_ptr, stride_row, V, scale,
                          BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2^31 for chunks of more than 42,000 rows
    cols = tl.arange(0, BLOCK_V)
    in_vocab = cols < V
    x = tl.load(logits_ptr + row * stride_row + cols, mask=in_vocab, other=-float("inf")).to(tl.float32)
    target = tl.load(targets_ptr + row)
    m = tl.max(x, axis=0)
    p = tl.exp(x - m)  # padded columns: exp(-inf) = 0
    l = tl.sum(p, axis=0)
    x_t = tl.sum(tl.where(cols == target, x, 0.0), axis=0)
    tl.store(loss_ptr + row, m + tl.log(l) - x_t)
    grad = (p / l - (cols == target).to(tl.float32)) * tl.cast(scale, tl.float32)
    tl.store(grad_ptr + row * stride_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_vocab)


@torch.library.custom_op("gpt2::cross_entropy_loss_and_grad", mutates_args=())
def loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For logits (N, V) with contiguous rows and targets (N,): each row's loss (fp32, (N,)) and the gradient
    (softmax - onehot) * scale in the logits' dtype."""
    logits = logits.contiguous()  # a no-op for the matmul's output
    n, vocab = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits)
    block = triton.next_power_of_2(vocab)
    _cross_entropy_kernel[(n,)](logits, targets, grad, loss, logits.stride(0), vocab, scale,
                                BLOCK_V=block, num_warps=16 if block >= 32768 else 4)
    return loss, grad


@loss_and_grad.register_fake
def _(logits, targets, scale):
    return logits.new_empty(logits.size(0), dtype=torch.float32), torch.empty_like(logits)
