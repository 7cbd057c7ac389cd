"""The fused LM head + cross-entropy (model.fused_lm_head_loss, GPTConfig.loss_chunk) against F.cross_entropy on
the full logits (fp64): alone, inside the whole GPT, under torch.compile, under autocast and without grad."""
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.utils.flop_counter import FlopCounterMode

from model import FP8_GRAD_SCALE, GPT, GPTConfig, fused_lm_head_loss
from training.precision import BF16Params

TINY = dict(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=16)


def reference(h, weight, targets):
    """Loss and gradients of h and weight through the full logits, in fp64."""
    h, weight = h.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    loss = F.cross_entropy(h @ weight.t(), targets)
    return (loss, *torch.autograd.grad(loss, (h, weight)))


def fused(h, weight, targets, chunk, fp8=False):
    h, weight = h.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = fused_lm_head_loss(h, weight, targets, chunk, fp8)
    return (loss, *torch.autograd.grad(loss, (h, weight)))


@pytest.mark.parametrize("chunk", [1, 8, 16, 37, 64])  # 37 rows: chunks that divide them, that do not, one, bigger
def test_loss_and_gradients_equal_cross_entropy_on_full_logits(chunk):
    g = torch.Generator().manual_seed(chunk)
    h, weight = torch.randn(37, 16, generator=g), torch.randn(101, 16, generator=g)  # vocab 101: no multiple of 8 or 16
    targets = torch.randint(0, 101, (37,), generator=g)
    got, expected = fused(h, weight, targets, chunk), reference(h, weight, targets)
    assert all(t.dtype == torch.float32 for t in got)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b, atol=1e-6, rtol=1e-6)


def with_ignored(targets, rows):
    """targets with F.cross_entropy's ignore_index (-100) at `rows`."""
    targets = targets.clone()
    targets[rows] = -100
    return targets


# Ignored rows: scattered, one whole chunk of 8 (rows 8-15), and the last row.
IGNORED = [0, 3, *range(8, 16), 36]


@pytest.mark.parametrize("chunk", [8, 37])
def test_ignore_index_targets_are_ignored_as_by_cross_entropy(chunk):
    """Targets of -100 add no loss and no gradient, and the mean is over the other rows, as in F.cross_entropy (the
    plain path, which the reference is): fused, and inside the whole GPT against the plain path."""
    g = torch.Generator().manual_seed(chunk)
    h, weight = torch.randn(37, 16, generator=g), torch.randn(101, 16, generator=g)
    targets = with_ignored(torch.randint(0, 101, (37,), generator=g), IGNORED)
    got, expected = fused(h, weight, targets, chunk), reference(h, weight, targets)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b, atol=1e-6, rtol=1e-6)
    assert torch.all(got[1][IGNORED] == 0)
    with torch.no_grad():
        loss = fused_lm_head_loss(h, weight, targets, chunk)
    torch.testing.assert_close(loss.double(), expected[0], atol=1e-6, rtol=1e-6)
    all_ignored = torch.full_like(targets, -100)  # no row counts: nan on both paths
    assert fused(h, weight, all_ignored, chunk)[0].isnan() and reference(h, weight, all_ignored)[0].isnan()


def test_gpt_with_loss_chunk_ignores_targets_as_the_plain_path_does():
    idx = torch.randint(0, 101, (3, 21), generator=torch.Generator().manual_seed(1))
    targets = with_ignored(idx[:, 1:], (slice(None), slice(5, 12)))
    results = []
    for loss_chunk in (16, 0):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**TINY, loss_chunk=loss_chunk))
        _, loss = model(idx[:, :-1], targets)
        loss.backward()
        results.append((loss, {name: p.grad for name, p in model.named_parameters()}))
    (loss, grads), (plain_loss, plain_grads) = results
    torch.testing.assert_close(loss, plain_loss, atol=1e-6, rtol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_without_grad_only_the_forward_matmuls_run():
    h, weight, targets = torch.randn(40, 16), torch.randn(101, 16), torch.randint(0, 101, (40,))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        loss = fused_lm_head_loss(h, weight, targets, 16)
    assert counter.get_total_flops() == 2 * 40 * 16 * 101  # the logits only: no grad_h, no grad_weight
    torch.testing.assert_close(loss.double(), reference(h, weight, targets)[0], atol=1e-6, rtol=1e-6)
    assert loss.grad_fn is None


def grads_of_gpt(loss_chunk, compile=False, autocast=False, device="cpu"):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, loss_chunk=loss_chunk)).to(device)
    forward = torch.compile(model, fullgraph=True) if compile else model
    idx = torch.randint(0, 101, (3, 21), generator=torch.Generator().manual_seed(1)).to(device)  # 60 rows: 16 does not divide
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        logits, loss = forward(idx[:, :-1], idx[:, 1:])
    loss.backward()
    return logits, loss, {name: p.grad for name, p in model.named_parameters()}


def test_gpt_with_loss_chunk_trains_like_the_plain_path():
    """Every parameter's gradient, the tied wte/lm_head weight included, equals the plain path's in fp32."""
    logits, loss, grads = grads_of_gpt(loss_chunk=16)
    plain_logits, plain_loss, plain_grads = grads_of_gpt(loss_chunk=0)
    assert logits is None and plain_logits.shape == (3, 20, 101)
    torch.testing.assert_close(loss, plain_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == plain_grads.keys() and "transformer.wte.weight" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_gpt_evaluation_without_grad_gives_the_loss_of_the_logits():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, loss_chunk=16)).eval()
    idx = torch.randint(0, 101, (3, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, loss = model(idx[:, :-1], idx[:, 1:])
        full = model(idx[:, :-1])[0]  # without targets: the plain logits
    expected = -torch.log_softmax(full.double(), -1).gather(-1, idx[:, 1:, None]).mean()
    assert logits is None and loss.grad_fn is None
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-6)


def test_compiled_fullgraph_gives_the_eager_loss_and_gradients():
    _, loss, grads = grads_of_gpt(loss_chunk=16, compile=True)  # a graph break would raise
    _, eager_loss, eager_grads = grads_of_gpt(loss_chunk=16)
    torch.testing.assert_close(loss, eager_loss, atol=1e-6, rtol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_autocast_matches_the_plain_path_within_bf16_rounding():
    """The trainer's setting (fp32 parameters, bf16 autocast) on the CPU's autocast: the logits are rounded to bf16 on
    both paths, so they agree to bf16 precision, with the loss and every gradient in fp32."""
    _, loss, grads = grads_of_gpt(loss_chunk=16, autocast=True)
    _, plain_loss, plain_grads = grads_of_gpt(loss_chunk=0, autocast=True)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads.values())
    torch.testing.assert_close(loss, plain_loss, atol=1e-2, rtol=0)
    for name in grads:
        scale = plain_grads[name].abs().max()
        torch.testing.assert_close(grads[name] / scale, plain_grads[name] / scale, atol=2e-2, rtol=0, msg=name)


# fp8_lm_head: the logits, grad_h and grad_W as FP8 matmuls (torch._scaled_mm, on the CPU too). h and W are float8_e4m3
# (3 mantissa bits: an operand is off by up to 2^-4), the gradient float8_e5m2 (2 bits: 2^-3). The reference does the
# same rounding, and everything else in fp64, so that the result must agree to fp32 rounding, not to fp8's.
FP8_SHAPE = dict(rows=112, vocab=160, width=64)  # multiples of 16, as cuBLAS's FP8 matmul needs: chunks of 32, 32, 32, 16


def fp8_reference(h, weight, targets, chunk, to_e5m2):
    """fp8_lm_head's loss, grad_h and grad_W in fp64 with its roundings: per chunk of rows, h and W scaled per tensor
    so that the largest |value| is float8_e4m3's largest (448), and rounded by torch's cast; the logits of the
    rounded operands; the gradient (softmax - onehot) * FP8_GRAD_SCALE rounded, from fp32, by to_e5m2."""
    def e4m3(x):
        scale = x.abs().max() / torch.finfo(torch.float8_e4m3fn).max
        return (x / scale).to(torch.float8_e4m3fn).double() * scale.double()

    w, n = e4m3(weight), len(targets)
    loss, grad_h, grad_w = 0.0, [], 0.0
    for start in range(0, n, chunk):
        h_c, t_c = e4m3(h[start:start + chunk]), targets[start:start + chunk]
        logits = h_c @ w.t()
        loss = loss + F.cross_entropy(logits, t_c, reduction="sum")
        grad = (torch.softmax(logits, 1) - F.one_hot(t_c, w.size(0))) * FP8_GRAD_SCALE
        grad = to_e5m2(grad.float()).double() / (n * FP8_GRAD_SCALE)
        grad_h.append(grad @ w)
        grad_w = grad_w + grad.t() @ h_c
    return loss / n, torch.cat(grad_h), grad_w


def assert_close_to_max(got, want, tolerance, name):
    """got within tolerance of want, relative to want's largest |value|."""
    error = ((got.cpu().double() - want).abs().max() / want.abs().max()).item()
    assert error < tolerance, (name, error)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp8_lm_head_is_within_fp8_rounding_of_fp64(seed, monkeypatch):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(FP8_SHAPE["rows"], FP8_SHAPE["width"], generator=g)
    weight = 0.3 * torch.randn(FP8_SHAPE["vocab"], FP8_SHAPE["width"], generator=g)
    targets = torch.randint(0, FP8_SHAPE["vocab"], (FP8_SHAPE["rows"],), generator=g)
    calls, real = [], torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda a, b, **kw: calls.append((a.dtype, b.dtype)) or real(a, b, **kw))
    loss, grad_h, grad_w = fused(h, weight, targets, 32, fp8=True)
    e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
    assert calls == [(e4m3, e4m3), (e5m2, e4m3), (e5m2, e4m3)] * 4  # logits, grad_h and grad_W of each of 4 chunks
    rounded = fp8_reference(h, weight, targets, 32, lambda grad: grad.to(torch.float8_e5m2))
    for got, want, name in zip((loss, grad_h, grad_w), rounded, ("loss", "grad_h", "grad_w")):
        assert_close_to_max(got, want, 1e-5, name)  # measured: below 1e-6; any other rounding: 0.4 and more
    exact = reference(h, weight, targets)  # and what the FP8 rounding costs, against the loss without it
    assert abs(loss.item() / exact[0].item() - 1) < 5e-3
    for got, want, name in ((grad_h, exact[1], "grad_h"), (grad_w, exact[2], "grad_w")):
        assert_close_to_max(got, want, 0.15, name)


def test_fp8_lm_head_keeps_the_gradient_of_improbable_words():
    """Words the model gives a probability of ~1e-8 still get their (tiny) share of grad_W, as in fp64: with e4m3 times
    256, the gradient's earlier format, they got exactly zero, and AdamW then treated those embedding rows differently
    from the bf16 path (TRAINING_NOTES.md, FP8 section)."""
    g = torch.Generator().manual_seed(0)
    h, weight = torch.randn(32, 64, generator=g).clamp(-3, 3), 0.1 * torch.randn(160, 64, generator=g)
    improbable = torch.arange(80, 160)
    weight[improbable] *= 0.1
    # A logit of -10 from one feature, in every row: 4 and 2.5 are h's and W's largest values, which e4m3 keeps exact.
    h[:, 0], weight[:, 0], weight[improbable, 0] = 4.0, 0.0, -2.5
    targets = torch.randint(0, 80, (32,), generator=g)
    probs = torch.softmax((h @ weight.t()).double(), 1)[:, improbable]
    assert 1e-9 < probs.min() and probs.max() < 1e-6  # below e4m3 x 256's smallest step, above e5m2 x 2^15's
    got, want = fused(h, weight, targets, 32, fp8=True)[2][improbable].double(), reference(h, weight, targets)[2][improbable]
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0).item() > 0.99
    assert abs(got.norm() / want.norm() - 1) < 0.1


def test_fp8_lm_head_evaluates_without_rounding_to_fp8():
    """Without grad (evaluation) the logits stay in the compute dtype: the validation loss is the exact one."""
    g = torch.Generator().manual_seed(0)
    h, weight = torch.randn(40, 64, generator=g), torch.randn(160, 64, generator=g)
    targets = torch.randint(0, 160, (40,), generator=g)
    with torch.no_grad():
        loss = fused_lm_head_loss(h, weight, targets, 16, fp8=True)
    torch.testing.assert_close(loss.double(), reference(h, weight, targets)[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("compile", [False, True])
def test_gpt_with_fp8_lm_head_trains_like_the_plain_path(compile):
    """The whole model, compiled with fullgraph too: the loss as FP8 rounding leaves it, every gradient close."""
    shape = dict(TINY, vocab_size=112, n_embd=32)
    results = []
    for fp8 in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**shape, loss_chunk=16, fp8_lm_head=fp8))
        forward = torch.compile(model, fullgraph=True) if compile else model
        idx = torch.randint(0, 112, (4, 21), generator=torch.Generator().manual_seed(1))  # 80 rows: 16 divides them
        _, loss = forward(idx[:, :-1], idx[:, 1:])
        loss.backward()
        results.append((loss, {name: p.grad for name, p in model.named_parameters()}))
    (plain_loss, plain_grads), (loss, grads) = results
    assert abs(loss.item() / plain_loss.item() - 1) < 5e-3
    for name in grads:
        cosine = F.cosine_similarity(grads[name].flatten(), plain_grads[name].flatten(), dim=0).item()
        assert cosine > 0.99, (name, cosine)


@pytest.mark.parametrize("settings, message", [
    (dict(loss_chunk=0), r"fp8_lm_head runs inside the fused loss: set loss_chunk too"),
    (dict(loss_chunk=16, vocab_size=101), r"fp8_lm_head needs vocab_size and n_embd divisible by 16 .* got 101 and 16"),
    (dict(loss_chunk=24, vocab_size=112), r"fp8_lm_head needs loss_chunk and the rows .* divisible by 16 .* got 24 and"),
])
def test_fp8_lm_head_without_what_it_needs_is_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        GPT(GPTConfig(**{**TINY, **settings}, fp8_lm_head=True))


def test_fp8_lm_head_refuses_a_batch_whose_rows_16_does_not_divide():
    model = GPT(GPTConfig(**dict(TINY, vocab_size=112), loss_chunk=16, fp8_lm_head=True))
    idx = torch.randint(0, 112, (3, 21), generator=torch.Generator().manual_seed(1))  # 60 rows
    with pytest.raises(ValueError, match=r"the rows of a batch \(batch_size \* seq_len\) divisible by 16 .* got 16 and 60"):
        model(idx[:, :-1], idx[:, 1:])
    with torch.no_grad():  # evaluation's loss is not computed in FP8: any batch will do
        assert torch.isfinite(model(idx[:, :-1], idx[:, 1:])[1])


def test_negative_loss_chunk_is_refused():
    with pytest.raises(ValueError, match=r"loss_chunk \(-1\) must be >= 0"):
        GPT(GPTConfig(**TINY, loss_chunk=-1))


# The cross-entropy kernel (cross_entropy.py) that the fused loss uses on GPUs. On the CPU it runs in Triton's
# interpreter, in fp32 only (the interpreter computes bf16 on raw bits); bf16 is checked on the GPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n).to(y_ptr.dtype.element_ty), mask=i < n)


def triton_cast(x, dtype):
    """x (fp32) as dtype, converted as a Triton kernel's .to() converts on DEVICE: the GPU rounds to nearest even;
    Triton 3.6's interpreter (the CPU) rounds half up on the raw bits, and where that carries out of the mantissa, an
    odd exponent keeps its value: 1.99 goes to 1.0 in float8_e5m2, 0.99 to 1.0. The fp8 reference of the kernel's
    gradient rounds through this, so that the CPU tests hold the kernel to what it can compute there."""
    y = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x.contiguous().to(DEVICE), y, x.numel(), BLOCK=1024)
    return y


def test_triton_cast_rounds_as_the_device_does():
    x = torch.tensor([1.99, 0.99, 1.74, 1.76, 3.0, 0.3])
    got = triton_cast(x, torch.float8_e5m2).cpu().float().tolist()
    # The nearest e5m2 values are 2, 1, 1.75, 1.75, 3, 0.3125 (torch's cast); the interpreter loses 1.99's carry.
    assert got == ([2.0, 1.0, 1.75, 1.75, 3.0, 0.3125] if DEVICE == "cuda" else [1.0, 1.0, 1.75, 1.75, 3.0, 0.3125])
    assert x.to(torch.float8_e5m2).float().tolist() == [2.0, 1.0, 1.75, 1.75, 3.0, 0.3125]


@pytest.mark.parametrize("vocab, block", [(1, 64), (101, 64), (128, 64), (4099, 1024), (4099, 8192)])
def test_kernel_equals_cross_entropy_in_fp64(vocab, block):
    """One column, tiles that do not divide the vocab, that do, many tiles, one tile wider than the row."""
    import cross_entropy
    g = torch.Generator().manual_seed(vocab)
    logits = 4 * torch.randn(7, vocab, generator=g)
    targets = torch.randint(0, vocab, (7,), generator=g)
    targets[:3] = torch.tensor([0, vocab - 1, -100])  # the first and last column, and an ignored row
    loss, grad = cross_entropy.loss_and_grad(logits.to(DEVICE), targets.to(DEVICE), 0.25, block=block)
    x = logits.double().requires_grad_()
    expected = F.cross_entropy(x, targets, reduction="none")  # 0 for the ignored row, and its gradient 0
    (expected.sum() * 0.25).backward()
    torch.testing.assert_close(loss.cpu().double(), expected.detach(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grad.cpu().double(), x.grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("vocab, block", [(160, 64), (4099, 1024)])
def test_kernel_writes_the_fp8_gradient_within_e5m2_rounding(vocab, block):
    """fp8_lm_head's gradient: (softmax - onehot) * fp8_scale in float8_e5m2, computed in fp64 and rounded as Triton
    rounds on this device (triton_cast). On the CPU every value equals it (measured); on the GPU the kernel's exp is
    an approximation, and a value next to a rounding boundary may land one e5m2 step (2^-2 at most) away."""
    import cross_entropy
    g = torch.Generator().manual_seed(vocab)
    logits = 4 * torch.randn(7, vocab, generator=g)
    targets = torch.randint(0, vocab, (7,), generator=g)
    loss, grad8 = cross_entropy.loss_and_grad(logits.to(DEVICE), targets.to(DEVICE), 0.25, FP8_GRAD_SCALE, block=block)
    assert torch.equal(loss, cross_entropy.loss_and_grad(logits.to(DEVICE), targets.to(DEVICE), 0.25, block=block)[0])
    assert grad8.dtype == torch.float8_e5m2 and grad8.shape == (7, vocab) and grad8.is_contiguous()
    x = logits.double()
    expected = triton_cast(((torch.softmax(x, 1) - F.one_hot(targets, vocab)) * FP8_GRAD_SCALE).float(),
                           torch.float8_e5m2).float()
    got = grad8.float()
    assert (got != expected).float().mean().item() <= (1e-3 if DEVICE == "cuda" else 0)
    torch.testing.assert_close(got, expected, atol=2 ** -16, rtol=2 ** -2)


@pytest.mark.parametrize("n, v, block", [(37, 101, 16), (64, 32, 16), (5, 300, 128)])
def test_transposed_equals_torch_transpose(n, v, block):
    """fp8_lm_head's transpose for grad_W's FP8 matmul: tiles that do not divide either side, that do, one tile wider
    than the matrix; exact, since it only moves bytes."""
    import cross_entropy
    x = torch.randint(0, 256, (n, v), dtype=torch.uint8, generator=torch.Generator().manual_seed(n)).view(torch.float8_e4m3fn)
    y = cross_entropy.transposed(x.to(DEVICE), block=block)
    assert y.dtype == x.dtype and y.shape == (v, n) and y.is_contiguous()
    assert torch.equal(y.cpu().view(torch.uint8), x.t().contiguous().view(torch.uint8))


@pytest.fixture
def kernel(monkeypatch):
    """The fused loss with the kernel, whatever the device (the interpreter on a CPU)."""
    import model
    monkeypatch.setattr(model, "use_kernel", lambda h: True)


@pytest.mark.parametrize("seed", [0, 1])
def test_fp8_lm_head_with_the_kernel_equals_fp64_with_its_rounding(kernel, seed):
    """The kernel's fp8 gradient feeds grad_h and grad_W as the reference's does, rounded as Triton rounds here. On
    the CPU to fp32 rounding (measured: below 1e-6; with torch's rounding instead of the interpreter's, 0.7 and more);
    on the GPU cuBLAS's fast FP8 accumulation (use_fast_accum) and the kernel's approximate exp loosen it."""
    g = torch.Generator().manual_seed(seed)
    h, weight = torch.randn(112, 64, generator=g), 0.3 * torch.randn(160, 64, generator=g)
    targets = torch.randint(0, 160, (112,), generator=g)
    got = fused(h.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE), 32, fp8=True)
    rounded = fp8_reference(h, weight, targets, 32, lambda grad: triton_cast(grad, torch.float8_e5m2).cpu())
    for a, b, name in zip(got, rounded, ("loss", "grad_h", "grad_w")):
        assert_close_to_max(a, b, 1e-5 if DEVICE == "cpu" else 2e-2, name)


def test_fused_loss_with_the_kernel_equals_cross_entropy_on_full_logits(kernel):
    g = torch.Generator().manual_seed(0)
    h, weight = torch.randn(37, 16, generator=g), torch.randn(101, 16, generator=g)
    targets = torch.randint(0, 101, (37,), generator=g)
    got = fused(h.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE), 16)
    for a, b in zip(got, reference(h, weight, targets)):
        torch.testing.assert_close(a.cpu().double(), b, atol=1e-6, rtol=1e-6)


def test_fused_loss_with_the_kernel_ignores_targets_as_cross_entropy_does(kernel):
    """The kernel gives an ignored row loss 0 and a zero gradient, and never reads column -100 (out of bounds)."""
    g = torch.Generator().manual_seed(0)
    h, weight = torch.randn(37, 16, generator=g), torch.randn(101, 16, generator=g)
    targets = with_ignored(torch.randint(0, 101, (37,), generator=g), IGNORED)
    got = fused(h.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE), 8)
    for a, b in zip(got, reference(h, weight, targets)):
        torch.testing.assert_close(a.cpu().double(), b, atol=1e-6, rtol=1e-6)


def test_compiled_gpt_with_the_kernel_gives_the_eager_torch_path_losses_and_gradients(monkeypatch):
    import model
    monkeypatch.setattr(model, "use_kernel", lambda h: False)
    _, eager_loss, eager_grads = grads_of_gpt(loss_chunk=16, device=DEVICE)
    monkeypatch.setattr(model, "use_kernel", lambda h: True)
    _, loss, grads = grads_of_gpt(loss_chunk=16, compile=True, device=DEVICE)  # the custom op under fullgraph=True
    torch.testing.assert_close(loss, eager_loss, atol=1e-6, rtol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.gpu  # bf16 logits: the interpreter computes in fp32 only
def test_kernel_in_bf16_equals_cross_entropy_in_fp64():
    """The trainer's case: bf16 logits of GPT-2's padded vocab, rounded once: the loss in fp32, the gradient to one
    bf16 rounding."""
    import cross_entropy
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(300, 50304, generator=g)).to("cuda", torch.bfloat16)
    targets = torch.randint(0, 50304, (300,), generator=g).cuda()
    loss, grad = cross_entropy.loss_and_grad(logits, targets, 1 / 300)
    x = logits.double()
    expected = F.cross_entropy(x, targets, reduction="none")
    expected_grad = (torch.softmax(x, 1) - F.one_hot(targets, 50304).double()) / 300
    torch.testing.assert_close(loss.double(), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, atol=1e-12, rtol=2 ** -8)


def saved_for_backward(model, idx):
    """The tensors the compiled training step keeps for its backward: the outputs of the forward graph that Inductor's
    partitioner (min-cut rematerialisation) cuts from the joint graph, beyond the loss itself."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    saved = []

    def forward_compiler(gm, example_inputs):
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        saved.extend(o.meta["val"] for o in outputs[1:] if o is not None and isinstance(o.meta.get("val"), torch.Tensor))
        return gm

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: gm,
                           partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    _, loss = torch.compile(model, fullgraph=True, backend=backend)(idx[:, :-1], idx[:, 1:])
    loss.backward()
    return saved


def test_compiled_step_keeps_no_logits_for_backward():
    # Traced through, the chunk loop gave the partitioner the choice of where the gradient matmuls run: it put them in
    # the backward and kept every chunk's (rows, V) logits gradient for them, the whole (B·T, V) block again.
    # It does so where a chunk's logits gradient is smaller than the weight's gradient: chunks of fewer rows than
    # n_embd, as here (32 < 64; seen with bf16 parameters). At the full config's 16384 rows it did not.
    V = 1000  # larger than every other dimension here, so a saved tensor with V columns is a logits-sized one
    model = GPT(GPTConfig(block_size=64, vocab_size=V, n_layer=2, n_head=2, n_embd=64, loss_chunk=32))
    idx = torch.randint(0, V, (2, 65), generator=torch.Generator().manual_seed(0))
    saved = saved_for_backward(BF16Params(model).model, idx)
    assert saved  # the layer's activations are there
    logits_like = [tuple(t.shape) for t in saved if t.dim() == 2 and t.shape[1] == V]
    assert not logits_like, f"kept for backward: {logits_like} (chunks of the logits or their gradient)"


def test_every_matmul_of_the_op_gets_16_byte_aligned_operands_for_an_odd_vocabulary():
    # The op runs its matmuls eagerly, where Inductor's padding of odd shapes does not reach them; cuBLAS runs slow
    # pre-Hopper kernels on operands whose dimensions are not multiples of 16 bytes, and GPT-2's 50,257 bf16 words are
    # not (step 49 went from 37 to 53 ms a step). The vocabulary is padded (to 104 words here, bf16 and fp32 alike).
    import model
    from torch.utils._python_dispatch import TorchDispatchMode

    class Matmuls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                shapes.extend((tuple(a.shape), a.element_size()) for a in args if isinstance(a, torch.Tensor) and a.dim() == 2)
            return func(*args, **(kwargs or {}))

    for dtype in (torch.bfloat16, torch.float32):
        shapes = []
        h, weight, targets = torch.randn(48, 16, dtype=dtype), torch.randn(101, 16, dtype=dtype), torch.randint(0, 101, (48,))
        with Matmuls():  # inside the op (a dispatch mode does not see into a custom op), as it runs on the GPU
            loss, grad_h, grad_w = model._loss_and_grads(h, weight, targets, 16, dtype, with_grad=True)
        assert len(shapes) == 3 * 3 * 2  # three chunks of three matmuls of two operands
        assert all(d * size % 16 == 0 for shape, size in shapes for d in shape), shapes
        assert grad_w.shape == weight.shape
        expected = reference(h, weight, targets)
        torch.testing.assert_close(loss.double(), expected[0], atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=0)
