"""KL(reference || policy) over the reference's top-k tokens plus a tail bucket, against the full-vocabulary KL."""

import pytest
import torch

from logitguard.losses import log1mexp, reference_topk, topk_kl_loss, topk_kl_per_sequence


def full_kl(ref_logits, pol_logits):
    """(B, T) KL(softmax(ref) || softmax(pol)) over the whole vocabulary."""
    ref = torch.log_softmax(ref_logits, -1)
    pol = torch.log_softmax(pol_logits, -1)
    return (ref.exp() * (ref - pol)).sum(-1)


def topk_inputs(ref_logits, pol_logits, k):
    """What the cache and the chunked head path hand the loss: the reference's top-k and tail, the policy's
    logits at those ids and its logsumexp."""
    ids, ref_logp, ref_tail = reference_topk(ref_logits, k)
    return pol_logits.gather(-1, ids), torch.logsumexp(pol_logits, -1), ref_logp, ref_tail


def logits_pair(seed=0, shape=(3, 5, 11), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(shape, generator=g, dtype=dtype), 2 * torch.randn(shape, generator=g, dtype=dtype)


def test_reference_topk_from_full_logits():
    logits, _ = logits_pair()
    ids, logp, tail = reference_topk(logits, 4)
    full = torch.log_softmax(logits, -1)
    assert ids.shape == logp.shape == (3, 5, 4) and tail.shape == (3, 5)
    torch.testing.assert_close(ids, full.topk(4, -1).indices)
    torch.testing.assert_close(logp, full.gather(-1, ids))
    torch.testing.assert_close(tail.exp(), 1 - logp.exp().sum(-1))
    assert torch.all(reference_topk(logits, 11)[2] == float("-inf"))  # k = V: no tail
    # bf16 logits come back as fp32 log-probs
    assert reference_topk(logits.bfloat16(), 4)[1].dtype == torch.float32
    with pytest.raises(ValueError, match="k must be"):
        reference_topk(logits, 12)


def test_equals_the_full_kl_when_k_is_the_vocabulary():
    ref, pol = logits_pair(1)
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    got = topk_kl_per_sequence(*topk_inputs(ref, pol, 11), mask)
    torch.testing.assert_close(got, (full_kl(ref, pol) * mask).sum(1), rtol=1e-10, atol=1e-12)
    mean = topk_kl_loss(*topk_inputs(ref, pol, 11), mask)
    torch.testing.assert_close(mean, full_kl(ref, pol)[mask.bool()].mean(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 4, 8, 10])
def test_lower_bound_and_the_gap_identity(k):
    ref, pol = logits_pair(2)
    inputs = topk_inputs(ref, pol, k)
    # one position at a time: the per-position KL_k (B, T)
    kl_k = torch.stack(
        [topk_kl_per_sequence(*(x[:, t : t + 1] for x in inputs), torch.ones(3, 1)) for t in range(5)], dim=1
    )
    torch.testing.assert_close(kl_k.sum(1), topk_kl_per_sequence(*inputs, torch.ones(3, 5)))
    kl_full = full_kl(ref, pol)
    assert torch.all(kl_k <= kl_full + 1e-12)  # grouping never increases a KL
    # the gap: p_tail * KL(reference's tail, renormalised || policy's tail, renormalised)
    ids, _, ref_tail = reference_topk(ref, k)
    tail = torch.ones_like(ref, dtype=torch.bool).scatter(-1, ids, False)  # (B, T, V)
    r = torch.log_softmax(ref.masked_fill(~tail, float("-inf")), -1)
    q = torch.log_softmax(pol.masked_fill(~tail, float("-inf")), -1)
    within = torch.where(tail, r.exp() * (r - q), 0.0).sum(-1)  # (B, T)
    torch.testing.assert_close(kl_full - kl_k, ref_tail.exp() * within, rtol=1e-9, atol=1e-12)
    if k < 10:
        assert torch.all(kl_full - kl_k > 0)  # strict here: the tails (two tokens or more) differ


def test_gradient_finite_and_zero_at_the_reference():
    ref, _ = logits_pair(3, dtype=torch.float32)
    for k in (4, 11):
        pol = ref.clone().requires_grad_(True)  # the policy equals the reference
        loss = topk_kl_loss(*topk_inputs(ref, pol, k), torch.ones(3, 5))
        assert abs(loss.item()) < 1e-5
        loss.backward()
        assert torch.isfinite(pol.grad).all() and pol.grad.abs().max() < 1e-6
    # away from the reference: a finite, nonzero gradient, also with k = V (the tail clamp) and bf16 inputs
    _, other = logits_pair(4, dtype=torch.float32)
    for k in (4, 11):
        pol = other.bfloat16().requires_grad_(True)
        loss = topk_kl_loss(*topk_inputs(ref, pol, k), torch.ones(3, 5))
        assert loss.dtype == torch.float32 and loss.item() > 0
        loss.backward()
        assert torch.isfinite(pol.grad.float()).all() and pol.grad.float().abs().max() > 0


def test_mask_padding_and_empty_mask():
    ref, pol = logits_pair(5)
    inputs = list(topk_inputs(ref, pol, 4))
    alone = topk_kl_per_sequence(*(x[:1, 1:3] for x in inputs), torch.ones(1, 2))  # row 0, positions 1 and 2
    mask = torch.zeros(3, 5, dtype=torch.float64)
    mask[0, 1:3] = 1
    inputs[0] = inputs[0].clone()
    inputs[0][2] = float("nan")  # a padded row may hold anything
    kl = topk_kl_per_sequence(*inputs, mask)
    torch.testing.assert_close(kl, torch.cat([alone, kl.new_zeros(2)]))
    assert kl[0] > 0
    torch.testing.assert_close(topk_kl_loss(*inputs, mask), alone[0] / 2)
    x = inputs[0].clone().requires_grad_(True)
    empty = topk_kl_loss(x, *inputs[1:], torch.zeros(3, 5))
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="does not match"):
        topk_kl_loss(*inputs[:4], torch.ones(3, 4))


def test_log1mexp_is_stable_at_both_ends():
    x = torch.tensor([-1e-20, -1e-8, -0.5, -1.0, -50.0], dtype=torch.float64)
    # math.log(-math.expm1(x)) and math.log1p(-math.exp(x)), in Python floats
    expected = [
        -46.051701859880914,
        -18.420680748952364,
        -0.9327521295671886,
        -0.45867514538708193,
        -1.9287498479639178e-22,
    ]
    torch.testing.assert_close(log1mexp(x), torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=0)
