"""GPT-2 in one file: the model, its initialisation, sampling, and loading OpenAI's weights from Hugging Face.

The only thing that varies between runs of the step-49 experiment is `GPTConfig.attention`, the name of the
function (see attention/) that turns q, k, v into the attention output.
"""
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from attention import get_attention

try:  # the fused loss's cross-entropy kernel on GPUs; without Triton (macOS) the torch path runs
    import cross_entropy
except ImportError:
    cross_entropy = None

GPT2_VOCAB = 50257  # GPT-2 BPE: 50,000 merges + 256 byte tokens + <|endoftext|>; ids from here up are no token
IGNORE_INDEX = -100  # F.cross_entropy's default: a target of this value adds no loss and no gradient, on every path


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the position embedding covers
    vocab_size: int = GPT2_VOCAB  # rows of the embedding; above GPT2_VOCAB (e.g. 50304), padding for faster matmuls
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block; the head dim is n_embd / n_head (triton: 16, 32, 64 or 128)
    n_embd: int = 768  # C: the width of the embeddings and the residual stream; a multiple of n_head
    attention: str = "sdpa"  # naive | sdpa | triton
    loss_chunk: int = 0  # rows per chunk of the fused LM head + cross-entropy (fused_lm_head_loss); 0: plain logits
    recompute_gelu: bool = False  # keep only the MLP's input to GELU for backward and recompute GELU there (less memory)
    fp8_lm_head: bool = False  # the LM head's matmuls in training as FP8 matmuls (needs loss_chunk; Ada/Hopper GPUs)


# OpenAI's checkpoint (and so transformers' GPT-2) uses Conv1D modules, whose weights are the transpose of nn.Linear's.
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class KVCache:
    """The keys and values of the tokens seen so far, for generation: the prompt's are written once (the prefill),
    then each new token's after them. One key and one value buffer per layer, allocated at the prefill for max_len
    tokens (in the dtype autocast gives k and v) and then written in place: decoding never reallocates or copies it."""

    def __init__(self, n_layer, max_len):
        self.max_len = max_len
        self.pos = 0  # tokens cached, the same in every layer; GPT.forward advances it
        self.k, self.v = [None] * n_layer, [None] * n_layer

    def update(self, layer, k, v):
        """Store k, v (B, H, T, D) of `layer` after the cached tokens; return the keys and values of all of them."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} tokens, {end} do not fit; make a larger KVCache")
        if self.k[layer] is None:
            B, H, _, D = k.shape
            self.k[layer], self.v[layer] = k.new_empty(B, H, self.max_len, D), v.new_empty(B, H, self.max_len, D)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def decode_attention(q, k, v):
    """Attention of one new token per sequence, q (B, H, 1, D), to the cached keys and values of every token so far,
    itself included, k and v (B, H, L, D): nothing is in its future, so there is no mask. Every backend decodes
    through this one function because a backend's causal_attention takes q, k, v of one length (its mask is the
    square lower triangle); the prompt, where they have one length, goes through the backend. Plain matmuls, not
    F.scaled_dot_product_attention: on the H100, sdpa dispatches to cuDNN, which builds a plan for every new shape,
    and L grows by one at every step (seen on the H100 here: a first generation ran many times slower than the next)."""
    att = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5  # (B, H, 1, L)
    return F.softmax(att, dim=-1) @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True
        self.attend = get_attention(config.attention)

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, H, T, D): strided views, no copies; each backend takes them as they are.
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None:  # training, evaluation: the whole sequence at once
            y = self.attend(q, k, v)
        elif cache.pos == 0:  # generation's prompt: through the backend, its keys and values kept for what follows
            cache.update(layer, k, v)
            y = self.attend(q, k, v)
        else:  # generation's next token, against everything cached
            y = decode_attention(q, *cache.update(layer, k, v))
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # the approximation GPT-2 was trained with
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True
        self.recompute_gelu = config.recompute_gelu

    def forward(self, x):
        h = self.c_fc(x)
        if self.recompute_gelu and torch.is_grad_enabled():
            # GELU's output, (B, T, 4C), is the largest activation backward needs (c_proj's weight gradient reads it);
            # here it is dropped after the forward and made again from h in the backward: one elementwise pass.
            return checkpoint(self._gelu_proj, h, use_reentrant=False, context_fn=_KEEP_MATMULS)
        return self._gelu_proj(h)

    def _gelu_proj(self, h):
        return self.c_proj(self.gelu(h))


def _keep_matmuls(ctx, op, *args, **kwargs):
    """Selective checkpointing's policy for recompute_gelu: matmul outputs are kept, never recomputed."""
    return CheckpointPolicy.MUST_SAVE if op in _MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
_KEEP_MATMULS = partial(create_selective_checkpoint_contexts, _keep_matmuls)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0):
        # Pre-LayerNorm: the residual stream itself is never normalised, so gradients flow straight through it.
        x = x + self.attn(self.ln_1(x), cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


# ----------------------------------------------------------------------------------------------------------
# The LM head and the cross-entropy fused, chunk by chunk (GPTConfig.loss_chunk): the logits of the whole batch,
# (B*T, V) and their fp32 copies and gradient, never exist; only one chunk's do.

FP8 = torch.float8_e4m3fn  # h and W: 3 mantissa bits, per-tensor scales
# The gradient (softmax - onehot, in [-1, 1]) in e5m2 times a fixed 2^15: below e5m2's largest value (57,344), and its
# 5 exponent bits keep every value down to 2^-31. e4m3 times 256 (lever 16b) rounded every probability below ~4e-6
# to a zero gradient: the embedding rows of rare words got none (TRAINING_NOTES.md, lever 16c).
FP8_GRAD = torch.float8_e5m2
FP8_GRAD_SCALE = 2.0 ** 15


def loss_and_grad(logits, targets, scale=None, fp8_scale=None, ignore_index=IGNORE_INDEX):
    """Each row's cross-entropy (fp32) and, given a scale, the gradient (softmax - onehot) * scale in the logits' dtype
    or, given fp8_scale, (softmax - onehot) * fp8_scale in float8_e5m2: in torch, what cross_entropy.loss_and_grad
    computes on GPUs. A row whose target is ignore_index has loss 0 and a zero gradient."""
    x = logits.float()
    keep = targets != ignore_index
    lse = torch.logsumexp(x, dim=1)
    loss = torch.where(keep, lse - x.gather(1, targets.where(keep, 0)[:, None]).squeeze(1), 0.0)
    if scale is None:
        return loss, None
    onehot = torch.arange(x.size(1), device=x.device) == targets[:, None]
    grad = (torch.exp(x - lse[:, None]) - onehot.float()) * keep[:, None]
    return loss, (grad * fp8_scale).to(FP8_GRAD) if fp8_scale is not None else (grad * scale).to(logits.dtype)


def use_kernel(h):
    """Whether the chunks' loss and gradient come from cross_entropy.py's kernel: on GPUs, with Triton."""
    return h.is_cuda and cross_entropy is not None


def _compute_dtype(h):
    """The dtype of the chunks' logits: autocast's (bf16) where it is on, else h's."""
    device = h.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype


def _to_fp8(x, dtype=FP8):
    """x as dtype (float8_e4m3 by default) and the fp32 scale with x ≈ x8 * scale: x's largest |value| goes to the
    format's largest (448 for e4m3)."""
    scale = x.abs().amax().float().clamp(min=1e-30) / torch.finfo(dtype).max
    return (x.float() / scale).to(dtype), scale


def _padded_to_16_bytes(w):
    """W (V, C) with zero rows appended until V * element size is a multiple of 16 bytes, and a bias for its logits: 0
    for the real words, -inf for the added ones (no probability, a zero gradient). The op's matmuls run eagerly,
    where Inductor's padding of odd shapes does not reach them, and cuBLAS runs pre-Hopper kernels on operands that
    are not 16-byte aligned: GPT-2's 50,257 words (step 49: 37 -> 53 ms per step). None for the bias where no row is
    added."""
    pad = -w.size(0) % (16 // w.element_size())
    if not pad:
        return w, None
    bias = torch.cat([w.new_zeros(w.size(0)), w.new_full((pad,), float("-inf"))])
    return torch.cat([w, w.new_zeros(pad, w.size(1))]), bias


def _loss_and_grads(h, weight, targets, chunk, dtype, with_grad, fp8=False):
    """The cross-entropy of the logits h @ weightᵀ summed over the rows and divided by their number N (a row whose
    target is IGNORE_INDEX adds nothing) and, with_grad, its gradients for h and weight, `chunk` rows at a time. A
    chunk's logits come out of the matmul in `dtype`; logsumexp and loss are in fp32. Their gradient, (softmax -
    onehot) / N, is turned at once into the chunk's rows of grad_h and added to grad_weight (fp32), so it is never
    stored for more than one chunk. On a GPU with Triton the loss and gradient of a chunk come from a
    kernel that reads its logits from memory once (cross_entropy.py).

    With fp8 (and with_grad: evaluation's logits stay in `dtype`), all three are FP8 matmuls (fp32 accumulation,
    ~1.5-2x the tensor-core rate of bf16 on Hopper): h and W scaled per tensor into float8_e4m3's range, the gradient
    (softmax - onehot) written in float8_e5m2 by the cross-entropy with a fixed scale, and for grad_W, whose
    FP8 matmul wants gradᵀ and hᵀ row-major, both transposed."""
    w = weight.to(dtype)  # cast once, not once per matmul as autocast would
    n, vocab = targets.numel(), w.size(0)
    kernel = with_grad and use_kernel(h)
    fp8 = fp8 and with_grad
    w, bias = _padded_to_16_bytes(w) if with_grad else (w, None)
    if fp8:  # cuBLAS's FP8 matmul takes its first operand row-major, its second column-major
        _check_fp8_rows(chunk, n)
        w8, w_scale = _to_fp8(w)
        w8_t, grad8_scale = w8.t().contiguous(), torch.full((), 1.0 / (n * FP8_GRAD_SCALE), device=h.device)
        transposed = cross_entropy.transposed if kernel else lambda x: x.t().contiguous()
    loss, grad_h, grad_w = h.new_zeros((), dtype=torch.float32), [], None
    for start in range(0, n, chunk):
        h_c, t_c = h[start:start + chunk].to(dtype), targets[start:start + chunk]
        if fp8:
            h8, h_scale = _to_fp8(h_c)
            logits = torch._scaled_mm(h8, w8.t(), scale_a=h_scale, scale_b=w_scale, out_dtype=dtype, use_fast_accum=True)
        else:
            logits = h_c @ w.t() if bias is None else torch.addmm(bias, h_c, w.t())
        row_loss, grad_logits = (cross_entropy.loss_and_grad if kernel else loss_and_grad)(
            logits, t_c, 1.0 / n if with_grad else None, FP8_GRAD_SCALE if fp8 else None)
        loss = loss + row_loss.sum()
        if not with_grad:
            continue
        if fp8:
            grad_h.append(torch._scaled_mm(grad_logits, w8_t.t(), scale_a=grad8_scale, scale_b=w_scale,
                                           out_dtype=h.dtype))
            chunk_grad_w = torch._scaled_mm(transposed(grad_logits), transposed(h8).t(), scale_a=grad8_scale,
                                            scale_b=h_scale, out_dtype=dtype)
        else:
            grad_h.append((grad_logits @ w).to(h.dtype))
            chunk_grad_w = grad_logits.t() @ h_c
        grad_w = chunk_grad_w.float() if grad_w is None else grad_w + chunk_grad_w  # summed in fp32
    return loss / n, (torch.cat(grad_h) if with_grad else None), (grad_w[:vocab] if with_grad else None)


# One opaque op for torch.compile. Traced through, the loop above is the partitioner's to split: only the loss is
# needed in the forward, and where a chunk has fewer rows than n_embd it moves the two gradient matmuls into the
# backward and keeps every chunk's logits gradient for them, the (B·T, V) block the chunking exists to avoid. At the
# full config it keeps the matmuls, yet the step holds 2.8 GiB more than with the op (TRAINING_NOTES.md, lever 12).
@torch.library.custom_op("gpt2::lm_head_loss_and_grads", mutates_args=())
def _lm_head_loss_and_grads(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                            dtype: torch.dtype, fp8: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    loss, grad_h, grad_w = _loss_and_grads(h, weight, targets, chunk, dtype, with_grad=True, fp8=fp8)
    return loss, grad_h, grad_w.to(weight.dtype)


@_lm_head_loss_and_grads.register_fake
def _(h, weight, targets, chunk, dtype, fp8):
    return h.new_empty((), dtype=torch.float32), torch.empty_like(h), torch.empty_like(weight)


class FusedLMHeadLoss(torch.autograd.Function):
    """The gradients are computed in the forward, chunk by chunk, where the logits are at hand; backward only scales
    them by the loss's incoming gradient."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, dtype, fp8):
        loss, grad_h, grad_w = _lm_head_loss_and_grads(h, weight, targets, chunk, dtype, fp8)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None, None


def fused_lm_head_loss(h, weight, targets, chunk, fp8=False):
    """F.cross_entropy(h @ weight.t(), targets) for h (N, C), weight (V, C), targets (N,), computed `chunk` rows at a
    time; the gradient work is done only when autograd needs it (not under no_grad), with fp8 in FP8 matmuls. As
    there, targets of IGNORE_INDEX add nothing and the mean is over the other rows (all ignored: nan)."""
    # The op divides by all N rows; the factor N / (rows that count) is applied to its loss, and through autograd to
    # its gradients, as a scalar: no pass over the gradients, no read of the count by the host.
    share = targets.numel() / (targets != IGNORE_INDEX).sum()
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return FusedLMHeadLoss.apply(h, weight, targets, chunk, _compute_dtype(h), fp8) * share
    return _loss_and_grads(h, weight, targets, chunk, _compute_dtype(h), with_grad=False)[0] * share


def check_fp8_lm_head(config, rows=None):
    """What fp8_lm_head needs of the model's shape and, given it, of a batch's rows (B·T): it runs inside the fused
    loss, and cuBLAS's FP8 matmul takes dimensions that are multiples of 16 (the rows are grad_W's inner one)."""
    if not config.fp8_lm_head:
        return
    if not config.loss_chunk:
        raise ValueError("fp8_lm_head runs inside the fused loss: set loss_chunk too (e.g. 16384), or fp8_lm_head false")
    if config.vocab_size % 16 or config.n_embd % 16:
        raise ValueError(f"fp8_lm_head needs vocab_size and n_embd divisible by 16 (cuBLAS's FP8 matmul), got "
                         f"{config.vocab_size} and {config.n_embd}; pad the vocabulary (GPT-2's 50257 to 50304)")
    _check_fp8_rows(config.loss_chunk, rows or 0)


def _check_fp8_rows(chunk, rows):
    """A chunk's rows are grad_W's inner dimension in the FP8 matmul, which cuBLAS takes in multiples of 16."""
    if chunk % 16 or rows % 16:
        raise ValueError(f"fp8_lm_head needs loss_chunk and the rows of a batch (batch_size * seq_len) divisible by 16 "
                         f"(cuBLAS's FP8 matmul), got {chunk} and {rows}")


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})")
        if config.loss_chunk < 0:
            raise ValueError(f"loss_chunk ({config.loss_chunk}) must be >= 0: rows per chunk of the fused loss, 0: off")
        check_fp8_lm_head(config)
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the input embedding and the output projection are one matrix (as in GPT-2).
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE", False):
                # Each block adds two projections to the residual stream; scale them so that its variance
                # does not grow with depth (GPT-2 paper, section 2.3).
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        """Parameters counted once each (the tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len):
        """Training FLOPs per token, the numerator of MFU (PaLM paper, appendix B): 6 per matrix weight (2 in
        the forward matmul, 4 in the backward; the tied embedding counts once, as lm_head; position embeddings
        are a lookup), plus 12·n_layer·n_embd·T for q@kᵀ and att@v, counted in full, without the causal halving.
        Biases, LayerNorm and softmax are left out, as in PyTorch's FLOP counter."""
        c = self.config
        n_matmul = sum(p.numel() for p in self.parameters() if p.dim() == 2) - self.transformer.wpe.weight.numel()
        return 6 * n_matmul + 12 * c.n_layer * c.n_embd * seq_len

    def forward(self, idx, targets=None, cache=None):
        """With a KVCache (generation): idx is the prompt when the cache is empty, else the one newest token."""
        B, T = idx.size()
        start = 0 if cache is None else cache.pos
        if start + T > self.config.block_size:
            raise ValueError(f"sequence length {start + T} exceeds block_size {self.config.block_size}")
        if start > 0 and T != 1:
            raise ValueError(f"after the prompt, a KVCache takes one token at a time, not {T}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        if targets is not None and self.config.loss_chunk:
            # No logits to return: the fused path never makes them for the whole batch.
            h, chunk = x.view(B * T, -1), self.config.loss_chunk
            return None, fused_lm_head_loss(h, self.lm_head.weight, targets.reshape(-1), chunk, self.config.fp8_lm_head)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            # In fp32 also for a bf16 model (bf16_params): a bf16 loss is rounded to 3 significant digits.
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None, use_cache=True, vocab_size=None):
        """Extend idx (B, T) by max_new_tokens sampled tokens, each from the top_k most likely (None: all) of the ids
        below vocab_size (None: GPT2_VOCAB, or the model's vocab_size where that is smaller: the rows of a vocabulary
        padded for faster matmuls are no token, and tiktoken cannot decode them).

        With use_cache the prompt goes through the model once and each later step feeds only the newest token,
        which attends to the cached keys and values (KVCache); without, each step runs the whole sequence again.
        Positions end at block_size: once the sequence is longer, each token is predicted from the last block_size
        tokens by a full forward pass on both paths, since every token's position then shifts at each step and
        nothing cached stays valid.
        """
        block_size = self.config.block_size
        cache = KVCache(self.config.n_layer, min(idx.size(1) + max_new_tokens - 1, block_size)) if use_cache else None
        for step in range(max_new_tokens):
            if cache is None or idx.size(1) > block_size:
                logits, _ = self(idx[:, -block_size:])
            else:
                logits, _ = self(idx if step == 0 else idx[:, -1:], cache=cache)
            logits = logits[:, -1, :vocab_size or GPT2_VOCAB].float() / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            next_token = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, next_token), dim=1)
        return idx

    @classmethod
    def from_pretrained(cls, model_type, attention="sdpa"):
        """OpenAI's GPT-2 weights ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl") via Hugging Face."""
        sizes = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
                 "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
        if model_type not in sizes:
            raise ValueError(f"unknown model_type {model_type!r}; choose one of: {', '.join(sizes)}")
        try:
            from transformers import GPT2LMHeadModel
        except ImportError as e:
            raise ImportError("from_pretrained needs the optional package transformers: pip install transformers") from e
        return cls.from_huggingface(GPT2LMHeadModel.from_pretrained(model_type), attention)

    @classmethod
    def from_huggingface(cls, hf_model, attention="sdpa"):
        """Copy the weights of a transformers GPT2LMHeadModel into a GPT of the same shape."""
        c = hf_model.config
        model = cls(GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                              n_head=c.n_head, n_embd=c.n_embd, attention=attention))
        ours = model.state_dict()
        theirs = {k: v for k, v in hf_model.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        if set(ours) != set(theirs):
            raise ValueError(f"parameter names differ: only ours {sorted(set(ours) - set(theirs))}, "
                             f"only theirs {sorted(set(theirs) - set(ours))}")
        with torch.no_grad():
            for name, tensor in theirs.items():
                ours[name].copy_(tensor.t() if name.endswith(HF_TRANSPOSED) else tensor)
        return model

