"""Token-wise constrained SFT (Qi et al. 2025) against its authors' formula, written out with loops."""

import math

import pytest
import torch

from logitguard.losses import (
    constrained_sft_betas,
    constrained_sft_loss,
    constrained_sft_per_sequence,
    constrained_sft_weights,
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def authors_betas(n: int, beta=0.1, first=5.0, bias=20.0, length=5) -> list[float]:
    """get_beta_list of the authors' trainer for a sequence of n response tokens, written out."""
    prefix = [beta * bias] * length
    if length != 0:
        prefix[0] = beta * first
    if n <= length:
        return prefix[:n]
    return prefix + [beta] * (n - length)


def authors_loss(policy, reference, mask, **betas) -> float:
    """soft_sft_loss + mean: per row the counted tokens in order, w = max(1e-3, 2 (1 - sigmoid(beta (pi - ref)))),
    the mean over every counted token of the batch of -w * pi."""
    terms = []
    for b in range(policy.shape[0]):
        pol = [float(policy[b, t]) for t in range(policy.shape[1]) if mask[b, t]]
        ref = [float(reference[b, t]) for t in range(policy.shape[1]) if mask[b, t]]
        for p, r, be in zip(pol, ref, authors_betas(len(pol), **betas)):
            w = max(1e-3, 2 * (1 - sigmoid(be * (p - r))))
            terms.append(-w * p)
    return sum(terms) / len(terms) if terms else 0.0


def ragged_batch(seed=0):
    """Four rows of 9 positions: counted tokens starting late, a short row, a row with none, a full row."""
    g = torch.Generator().manual_seed(seed)
    policy = -3 * torch.rand(4, 9, generator=g, dtype=torch.float64)  # log-probs: <= 0
    reference = -3 * torch.rand(4, 9, generator=g, dtype=torch.float64)
    mask = torch.zeros(4, 9, dtype=torch.bool)
    mask[0, 2:9] = True  # 7 counted tokens from position 2 (a prompt before them)
    mask[1, 4:7] = True  # 3 counted tokens: shorter than bias_length
    # row 2: none counted
    mask[3, :] = True  # 9 counted tokens from position 0
    return policy, reference, mask


@pytest.mark.parametrize(
    "betas",
    [{}, {"beta": 0.5, "first": 2.0, "bias": 7.0, "length": 3}, {"length": 0}, {"length": 1}],
    ids=["defaults", "other", "no-prefix", "prefix-1"],
)
def test_matches_the_authors_formula_on_ragged_masks(betas):
    policy, reference, mask = ragged_batch()
    kwargs = {
        "beta": betas.get("beta", 0.1),
        "first_token_bias_factor": betas.get("first", 5.0),
        "bias_factor": betas.get("bias", 20.0),
        "bias_length": betas.get("length", 5),
    }
    got = constrained_sft_loss(policy, reference, mask, **kwargs)
    assert got.item() == pytest.approx(authors_loss(policy, reference, mask, **betas), rel=1e-12)
    # float masks, fp32 inputs: the same value to fp32 precision
    got32 = constrained_sft_loss(policy.float(), reference.float(), mask.float(), **kwargs)
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(got.item(), rel=1e-5)


def test_betas_follow_the_rank_among_counted_tokens():
    _, _, mask = ragged_batch()
    betas = constrained_sft_betas(mask)
    for b in range(mask.shape[0]):
        counted = [float(betas[b, t]) for t in range(mask.shape[1]) if mask[b, t]]
        assert counted == pytest.approx(authors_betas(len(counted)))
    assert betas[0, 2].item() == pytest.approx(0.5) and betas[0, 3].item() == pytest.approx(2.0)  # rank 0, rank 1


def test_gradient_is_that_of_the_papers_objective():
    policy, reference, mask = ragged_batch(1)
    x = policy.clone().requires_grad_(True)
    constrained_sft_loss(x, reference, mask).backward()
    # Eq. 3: -(2 / beta_t) log sigmoid(beta_t D_t), averaged the same way
    y = policy.clone().requires_grad_(True)
    betas = constrained_sft_betas(mask, dtype=torch.float64)
    eq3 = -(2 / betas) * torch.nn.functional.logsigmoid(betas * (y - reference))
    (eq3[mask].sum() / mask.sum()).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)
    assert torch.all(x.grad[~mask] == 0) and torch.all(x.grad[mask] < 0)
    # the values differ (the authors' surrogate): only gradients agree
    assert not math.isclose(constrained_sft_loss(policy, reference, mask).item(), float(eq3.detach()[mask].mean()))


def test_weight_floor_and_its_gradient():
    # the policy far above the reference: the weight is clamped at 1e-3 and so is the gradient
    policy = torch.tensor([[-0.01, -0.02]], requires_grad=True)
    reference = torch.tensor([[-200.0, -200.0]])
    mask = torch.ones(1, 2)
    w = constrained_sft_weights(policy, reference, mask)
    torch.testing.assert_close(w, torch.full((1, 2), 1e-3))
    assert not w.requires_grad  # held constant
    constrained_sft_loss(policy, reference, mask).backward()
    torch.testing.assert_close(policy.grad, torch.full((1, 2), -1e-3 / 2))


def test_equal_policy_and_reference_give_weight_one_and_the_nll():
    policy, _, mask = ragged_batch(2)
    w = constrained_sft_weights(policy, policy, mask)
    assert torch.all(w[mask] == 1) and torch.all(w[~mask] == 0)
    nll = -policy[mask].mean()
    assert constrained_sft_loss(policy, policy, mask).item() == pytest.approx(nll.item(), rel=1e-12)


def test_per_sequence_sums_and_step_normalisation():
    policy, reference, mask = ragged_batch(3)
    per_seq = constrained_sft_per_sequence(policy, reference, mask)
    assert per_seq.shape == (4,) and per_seq[2].item() == 0.0
    # two micro-batches of one step: sums over both, divided by the step's count, equal the whole-batch loss
    halves = [constrained_sft_per_sequence(policy[s], reference[s], mask[s]).sum() for s in (slice(0, 1), slice(1, 4))]
    whole = constrained_sft_loss(policy, reference, mask)
    assert (sum(halves) / mask.sum()).item() == pytest.approx(whole.item(), rel=1e-12)


def test_empty_mask_and_padding_values():
    x = torch.full((2, 3), float("-inf"), requires_grad=True)  # padding log-probs may be anything
    loss = constrained_sft_loss(x, torch.zeros(2, 3), torch.zeros(2, 3))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(x.grad == 0)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        constrained_sft_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
