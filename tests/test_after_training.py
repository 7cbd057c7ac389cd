"""After training: KV-cache generation, export to Hugging Face, sampling and evaluation scripts."""
import pytest
import torch

from model import GPT, GPTConfig, KVCache

TINY = dict(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=32)  # head size 16: the triton kernel's least


# ----------------------------------------------------------------------------------------------------------------
# KV cache

@pytest.mark.parametrize("attention", ["naive", "sdpa", "triton"])
def test_cached_logits_equal_full_forward_at_every_position(attention):
    """Prefill a 13-token prompt through the backend, then decode one token at a time up to block_size: at every
    step the last position's logits equal a full forward pass over the whole sequence (a second code path), and
    the cache's buffers never move."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, attention=attention)).eval()
    seq = torch.randint(0, 101, (2, 32))
    cache = KVCache(model.config.n_layer, 32)
    with torch.no_grad():
        logits, _ = model(seq[:, :13], cache=cache)
        torch.testing.assert_close(logits, model(seq[:, :13])[0], atol=1e-5, rtol=1e-5)
        buffers = [t.data_ptr() for t in cache.k + cache.v]
        for t in range(13, 32):
            logits, _ = model(seq[:, t : t + 1], cache=cache)
            torch.testing.assert_close(logits[:, -1], model(seq[:, : t + 1])[0][:, -1], atol=1e-5, rtol=1e-5)
        assert cache.pos == 32 and [t.data_ptr() for t in cache.k + cache.v] == buffers
        with pytest.raises(ValueError, match="exceeds block_size 32"):  # no position 32 to give a 33rd token
            model(seq[:, :1], cache=cache)


@pytest.mark.parametrize("attention", ["naive", "sdpa", "triton"])
def test_cached_greedy_generation_equals_uncached(attention):
    """Greedy decoding, token for token, from prompts of 1 and 17 tokens (either side of the kernels' 16-row tiles)
    for 40 new tokens: the cache fills to block_size 32, then generation goes on past it, where both paths predict
    each token from the last 32 tokens by a full pass."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, attention=attention)).eval()
    for prompt_len in (1, 17):
        idx = torch.randint(0, 101, (3, prompt_len))
        cached = model.generate(idx, 40, top_k=1)
        uncached = model.generate(idx, 40, top_k=1, use_cache=False)
        assert cached.shape == (3, prompt_len + 40)
        assert torch.equal(cached, uncached)


def test_cached_sampling_equals_uncached_with_one_seed():
    """Sampling (temperature, top-k) draws the same tokens on both paths from generators with one seed."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    idx = torch.randint(0, 101, (4, 5))
    runs = [model.generate(idx, 20, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(7),
                           use_cache=use_cache) for use_cache in (True, False)]
    assert torch.equal(*runs)


def test_cache_takes_one_token_at_a_time_after_the_prompt():
    model = GPT(GPTConfig(**TINY)).eval()
    cache = KVCache(model.config.n_layer, 32)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="one token at a time"):
            model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    small = KVCache(model.config.n_layer, 3)
    with pytest.raises(ValueError, match="the cache holds 3 tokens"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=small)
