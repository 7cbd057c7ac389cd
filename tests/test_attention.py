"""The naive and sdpa backends against each other and against fp64 math."""
import pytest
import torch

from attention import BACKENDS, get_attention
from conftest import attention_fp64, qkv_views


@pytest.mark.parametrize("T", [1, 17, 64, 100])
def test_naive_matches_sdpa_and_fp64(T):
    outs, grads = {}, {}
    for name in ("naive", "sdpa"):
        qkv, (q, k, v) = qkv_views(2, 3, T, 16)
        out = get_attention(name)(q, k, v)
        assert out.shape == (2, 3, T, 16)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out * dout).sum().backward()
        outs[name], grads[name] = out.detach(), qkv.grad
    _, (q, k, v) = qkv_views(2, 3, T, 16)
    torch.testing.assert_close(outs["naive"], attention_fp64(q, k, v).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["naive"], outs["sdpa"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads["naive"], grads["sdpa"], atol=1e-4, rtol=1e-4)


def test_causality():
    """Changing a future token must not change any earlier output."""
    _, (q, k, v) = qkv_views(1, 2, 12, 8)
    for name in ("naive", "sdpa"):
        attend = get_attention(name)
        out = attend(q, k, v)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, 7] += 1.0
        v2[:, :, 7] -= 1.0
        out2 = attend(q, k2, v2)
        assert torch.equal(out[:, :, :7], out2[:, :, :7])
        assert not torch.allclose(out[:, :, 7:], out2[:, :, 7:])


def test_unknown_backend_lists_choices():
    with pytest.raises(ValueError) as e:
        get_attention("flsh")
    for name in BACKENDS:
        assert name in str(e.value)
