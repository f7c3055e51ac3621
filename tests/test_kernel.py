"""token_logprobs against the naive log_softmax(h @ W.T / T).gather(...): values and gradients."""
import pytest
import torch

from mmsearch_r1 import token_logprobs


def naive(h, w, y, T=1.0):
    logp_all = torch.log_softmax((h @ w.t()).float() / T, dim=-1)
    return logp_all.gather(1, y[:, None])[:, 0], -(logp_all.exp() * logp_all).sum(-1)


def inputs(N, H, V, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.5).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    return h, w, y


def grads(out, h, w, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * g).sum(), (h, w))


@pytest.mark.parametrize("T", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [None, 1, 7, 20, 64])   # 20: the backward's vocabulary blocks are 22 rows, the last short
def test_fp32_values_and_grads(T, chunk):
    h, w, y = inputs(37, 16, 101)
    ours = token_logprobs(h, w, y, temperature=T, chunk_size=chunk)
    ref, _ = naive(h, w, y, T)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    for a, b in zip(grads(ours, h, w), grads(ref, h, w)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [1.0, 0.6])
def test_entropy_values_and_grads(T):
    h, w, y = inputs(29, 12, 53)
    logp, ent = token_logprobs(h, w, y, temperature=T, chunk_size=5, with_entropy=True)
    ref_logp, ref_ent = naive(h, w, y, T)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    torch.manual_seed(0)
    gy, ge = torch.randn(29), torch.randn(29)
    ours = torch.autograd.grad((logp * gy + ent * ge).sum(), (h, w))
    refs = torch.autograd.grad((ref_logp * gy + ref_ent * ge).sum(), (h, w))
    for a, b in zip(ours, refs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # only the entropy used: the log-prob output gets no gradient at all
    logp, ent = token_logprobs(h, w, y, temperature=T, with_entropy=True)
    a = torch.autograd.grad(ent.sum(), h)[0]
    b = torch.autograd.grad(naive(h, w, y, T)[1].sum(), h)[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fp32_gemms", [False, True])   # bf16 GEMMs (a GPU, AMX) or fp32 ones (other CPUs)
def test_bf16_within_tolerance(fp32_gemms, monkeypatch):
    """bf16 inputs: logits are upcast to fp32 per chunk (or the GEMMs run in fp32); vs the same naive
    upcast, the log-probs agree to 2e-2 and the gradients to 2e-2 relative (bf16 has an 8-bit
    mantissa). chunk_size=20: the backward's vocabulary blocks are 16 rows, the last one short."""
    monkeypatch.setattr("mmsearch_r1.FP32_GEMMS_ON_CPU", fp32_gemms)
    h, w, y = inputs(64, 32, 257, dtype=torch.bfloat16)
    ours = token_logprobs(h, w, y, chunk_size=20)
    ref, _ = naive(h, w, y)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=2e-2, rtol=0)
    torch.testing.assert_close(token_logprobs(h, w, y), ref, atol=2e-2, rtol=0)   # the default (half) chunk
    for a, b in zip(grads(ours, h, w), grads(ref, h, w)):
        assert a.dtype == torch.bfloat16
        assert (a.float() - b.float()).norm() / b.float().norm() < 2e-2


def test_gradcheck_float64():
    h, w, y = inputs(6, 4, 9, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda h, w: token_logprobs(h, w, y, 0.8, chunk_size=4), (h, w))
    assert torch.autograd.gradcheck(
        lambda h, w: token_logprobs(h, w, y, 0.8, chunk_size=4, with_entropy=True), (h, w))


@pytest.mark.parametrize("N", [0, 1])
def test_tiny_n(N):
    h, w, y = inputs(N, 8, 11)
    ours = token_logprobs(h, w, y, chunk_size=3)
    assert ours.shape == (N,)
    torch.testing.assert_close(ours, naive(h, w, y)[0], atol=1e-5, rtol=0)
    gh, gw = torch.autograd.grad(ours.sum(), (h, w))
    assert gh.shape == h.shape and gw.shape == w.shape
    if N == 0:
        assert (gw == 0).all()


def test_tied_embeddings():
    """The output matrix is also the input embedding: both gradient paths add up."""
    torch.manual_seed(0)
    emb = torch.nn.Parameter(torch.randn(31, 8))
    x = torch.randint(0, 31, (20,))
    y = torch.randint(0, 31, (20,))
    proj = torch.randn(8, 8)
    ours = token_logprobs(torch.tanh(emb[x] @ proj), emb, y, chunk_size=6).sum()
    g_ours = torch.autograd.grad(ours, emb)[0]
    ref = naive(torch.tanh(emb[x] @ proj), emb, y)[0].sum()
    g_ref = torch.autograd.grad(ref, emb)[0]
    torch.testing.assert_close(g_ours, g_ref, atol=1e-5, rtol=0)


def test_shape_errors():
    with pytest.raises(ValueError, match="want hidden"):
        token_logprobs(torch.randn(3, 4), torch.randn(5, 6), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("T", [1.0, 0.7])
def test_frozen_weight(T):
    """W without gradient (LoRA, a frozen head): dh comes from the forward's p W; the same
    values and gradients, with and without entropy (used in the loss, or only logged)."""
    h, w, y = inputs(37, 16, 101)
    w.requires_grad_(False)
    ref, ref_ent = naive(h, w, y, T)
    ours = token_logprobs(h, w, y, temperature=T, chunk_size=7)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    g = torch.randn(37)
    a, = torch.autograd.grad((ours * g).sum(), h)
    b, = torch.autograd.grad((ref * g).sum(), h)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for used in (False, True):
        logp, ent = token_logprobs(h, w, y, temperature=T, chunk_size=7, with_entropy=True)
        ref, ref_ent = naive(h, w, y, T)
        a, = torch.autograd.grad((logp * g + used * ent).sum(), h)
        b, = torch.autograd.grad((ref * g + used * ref_ent).sum(), h)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
