import pytest
import torch

from model import GPT, GPTConfig

TINY = dict(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=16)


def test_gpt2_124m_parameter_count():
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = GPT(GPTConfig())
    assert model.num_params() == 124_439_808


def test_weight_tying():
    model = GPT(GPTConfig(**TINY))
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, 101, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    # One tensor receives the gradient of both uses.
    assert model.transformer.wte.weight.grad is not None and model.transformer.wte.weight.grad.abs().sum() > 0


def test_gpt2_initialisation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=1000, n_layer=4, n_head=4, n_embd=256))
    block = model.transformer.h[0]
    assert abs(block.attn.c_attn.weight.std().item() - 0.02) < 1e-3
    for proj in (block.attn.c_proj, block.mlp.c_proj):  # residual projections: 0.02 / sqrt(2 * n_layer)
        assert abs(proj.weight.std().item() - 0.02 / 8**0.5) < 5e-4
    assert all(torch.all(m.bias == 0) for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None)
    assert isinstance(block.mlp.gelu, torch.nn.GELU) and block.mlp.gelu.approximate == "tanh"


def test_loss_is_cross_entropy_of_logits():
    model = GPT(GPTConfig(**TINY))
    idx, targets = torch.randint(0, 101, (2, 8)), torch.randint(0, 101, (2, 8))
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 8, 101)
    expected = -torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(loss.double(), expected)


def test_sequence_longer_than_block_size_fails():
    model = GPT(GPTConfig(**TINY))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_generate_top1_is_greedy():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    idx = torch.randint(0, 101, (2, 3))
    out = model.generate(idx, max_new_tokens=40, top_k=1)  # runs past block_size: the context is cropped
    assert out.shape == (2, 43) and torch.equal(out[:, :3], idx)
    greedy = idx
    for _ in range(40):
        logits, _ = model(greedy[:, -32:])
        greedy = torch.cat([greedy, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, greedy)


def test_generate_never_emits_an_id_of_the_padded_vocabulary():
    """A vocabulary padded past GPT-2's 50,257 ids (to 50,304, for faster matmuls) has rows that are no token: made
    here the most likely by far, generate() called without vocab_size still picks among the real ones only."""
    from model import GPT2_VOCAB
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=1, n_embd=8)).eval()
    with torch.no_grad():  # every position's final hidden state is all ones: each word's logit is its row's sum
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[GPT2_VOCAB:] = 1.0  # logit 8 for the padding, 0 for every real word
        model.lm_head.weight[:GPT2_VOCAB] = 0.0
    idx = torch.zeros(2, 1, dtype=torch.long)
    for top_k in (1, None):
        out = model.generate(idx, max_new_tokens=8, top_k=top_k, generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, 9) and out.max() < GPT2_VOCAB, top_k
    assert model.generate(idx, 8, top_k=1, vocab_size=50304)[:, 1:].min() >= GPT2_VOCAB  # the padding is that likely


def test_import_from_huggingface_gives_same_logits():
    import transformers  # optional for users, installed for the tests (requirements-dev.txt)
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_positions=32, vocab_size=101, n_layer=2, n_head=2, n_embd=16,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # HF initialises biases to zero; randomise them so that a mix-up would show
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    for attention in ("naive", "sdpa"):
        model = GPT.from_huggingface(hf, attention=attention).eval()
        idx = torch.randint(0, 101, (2, 20))
        with torch.no_grad():
            torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_triton_backend_compiled_fullgraph_trains_like_sdpa():
    """The whole model with our kernel inside torch.compile(fullgraph=True) (a graph break would raise) takes the
    same optimizer steps as eager sdpa. T=20 is not a multiple of any block size; D = 32/2 = 16."""
    losses = {}
    for attention in ("sdpa", "triton"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=32, attention=attention))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        forward = torch.compile(model, fullgraph=True) if attention == "triton" else model
        g = torch.Generator().manual_seed(1)
        losses[attention] = []
        for _ in range(3):
            idx = torch.randint(0, 101, (2, 21), generator=g)
            _, loss = forward(idx[:, :-1], idx[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[attention].append(loss.item())
    torch.testing.assert_close(losses["triton"], losses["sdpa"], atol=1e-4, rtol=0)


def test_flops_per_token_matches_pytorch_flop_counter():
    """The MFU numerator against PyTorch's own count of the matmul FLOPs in one forward+backward (naive
    attention performs q@kᵀ and att@v in full, which is what the formula counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = GPT(GPTConfig(**{**TINY, "attention": "naive"}))
    idx = torch.randint(0, 101, (3, 24))
    with FlopCounterMode(display=False) as counter:
        model(idx, idx)[1].backward()
    assert counter.get_total_flops() == model.flops_per_token(24) * 3 * 24


def loss_and_grads(model, idx, compile=False):
    forward = torch.compile(model, fullgraph=True) if compile else model
    _, loss = forward(idx[:, :-1], idx[:, 1:])
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("compile", [False, True])
def test_recompute_gelu_trains_like_the_plain_model(compile):
    # The same arithmetic in the same order, only some of it done twice: equal to fp32 rounding.
    idx = torch.randint(0, 101, (3, 33), generator=torch.Generator().manual_seed(0))
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        results.append(loss_and_grads(GPT(GPTConfig(**TINY, recompute_gelu=recompute)), idx, compile))
    (loss, grads), (loss_r, grads_r) = results
    torch.testing.assert_close(loss_r, loss, atol=1e-6, rtol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_recompute_gelu_keeps_one_4c_activation_per_layer_for_backward():
    from test_fused_loss import saved_for_backward  # what the compiled step keeps, as Inductor partitions it

    def kept_4c(recompute):
        model = GPT(GPTConfig(block_size=64, vocab_size=1000, n_layer=2, n_head=2, n_embd=64, recompute_gelu=recompute))
        idx = torch.randint(0, 1000, (2, 65), generator=torch.Generator().manual_seed(0))
        return [t for t in saved_for_backward(model, idx) if tuple(t.shape[-1:]) == (256,) and t.numel() == 2 * 64 * 256]

    assert len(kept_4c(False)) == 4  # per layer: c_fc's output (GELU's input) and GELU's output
    assert len(kept_4c(True)) == 2  # per layer: GELU's input only
