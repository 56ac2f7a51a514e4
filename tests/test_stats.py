"""Paired statistics (stats.py) against direct computations on small inputs: hand-summed binomial tails, Tango's
statistic against a brute-force restricted likelihood, bootstrap intervals against a plain loop over the draws."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from logitguard.stats import (
    Z95,
    Interval,
    _tango_z,
    binomial_two_sided_p,
    bits,
    decide,
    discordant,
    gain_share,
    loss,
    loss_difference,
    mcnemar_exact,
    paired_bootstrap_difference,
    paired_rate_difference,
    percentile_interval,
    resample_indices,
    tango_interval,
)


def test_binomial_tail_against_hand_sums():
    # 2 * P(X <= k) for X ~ Binomial(n, 1/2), summed by hand
    assert binomial_two_sided_p(1, 8) == 2 * (1 + 8) / 256  # 0.0703125
    assert binomial_two_sided_p(7, 8) == 2 * (1 + 8) / 256  # the other tail: same
    assert binomial_two_sided_p(0, 5) == 2 / 32
    assert binomial_two_sided_p(2, 10) == 2 * (1 + 10 + 45) / 1024  # 0.109375
    assert binomial_two_sided_p(5, 10) == 1.0 and binomial_two_sided_p(0, 0) == 1.0
    assert binomial_two_sided_p(0, 1) == 1.0  # 2 * 1/2


def test_binomial_tail_is_the_two_sided_definition():
    # two-sided exact p = sum of the probabilities no larger than the observed one
    for n in (1, 7, 20, 33):
        pmf = [math.comb(n, i) / 2**n for i in range(n + 1)]
        for k in range(n + 1):
            direct = sum(p for p in pmf if p <= pmf[k] * (1 + 1e-12))
            assert binomial_two_sided_p(k, n) == pytest.approx(min(1.0, direct), rel=1e-12)
    assert 0 <= binomial_two_sided_p(3, 1200) < 1e-300  # large n: no overflow


def test_mcnemar_counts_only_discordant_pairs():
    x, y = bits("1101100111"), bits("0101000110")
    assert discordant(x, y) == (3, 0)  # items 0, 4, 9
    assert mcnemar_exact(x, y) == 2 / 8
    # concordant pairs change nothing
    assert mcnemar_exact(x + [1, 1, 0, 0], y + [1, 1, 0, 0]) == mcnemar_exact(x, y)
    with pytest.raises(ValueError, match="not the same items"):
        discordant([1, 0], [1])
    with pytest.raises(ValueError, match="0 and 1"):
        bits("01x")


def _tango_z_brute(delta, b, c, n, grid=100_000):
    """Tango's Z with the restricted MLE of q found by a grid search of the likelihood."""
    lo, hi = max(0.0, -delta), (1 - delta) / 2
    best = (-math.inf, None)
    for i in range(1, grid):
        q = lo + (hi - lo) * i / grid
        ll = b * math.log(q + delta) + c * math.log(q) + (n - b - c) * math.log(1 - 2 * q - delta)
        best = max(best, (ll, q))
    q = best[1]
    return (b - c - n * delta) / math.sqrt(n * (2 * q + delta * (1 - delta)))


@pytest.mark.parametrize("b,c,n", [(1, 7, 21), (6, 16, 161), (3, 0, 10)])
def test_tango_statistic_against_the_likelihood_and_its_bounds(b, c, n):
    for delta in (-0.4, -0.1, 0.02, 0.15):
        assert _tango_z(delta, b, c, n) == pytest.approx(_tango_z_brute(delta, b, c, n), abs=1e-4)
    lo, hi = tango_interval(b, c, n)
    assert lo < (b - c) / n < hi
    assert _tango_z(lo, b, c, n) == pytest.approx(Z95, abs=1e-6)  # each end is where |Z| reaches 1.96
    assert _tango_z(hi, b, c, n) == pytest.approx(-Z95, abs=1e-6)


def test_tango_edges():
    lo, hi = tango_interval(0, 0, 100)  # no discordant pair: still an interval, symmetric, about +-3.7 points
    assert lo == pytest.approx(-hi) and 0.03 < hi < 0.045
    assert tango_interval(0, 5, 5)[0] == -1.0 and tango_interval(5, 0, 5)[1] == 1.0
    assert tango_interval(0, 0, 0) == (-1.0, 1.0)
    r = paired_rate_difference(bits("1100"), bits("0100"))
    assert r.estimate == 0.25 and r.p == 1.0 and r.lo < 0 < 0.25 < r.hi


def test_tango_covers_about_95_percent():
    # a fixed-seed simulation: 1,500 tables of 60 pairs, 15% only-x and 5% only-y
    rng = random.Random(0)
    n, p10, p01, hits, trials = 60, 0.15, 0.05, 0, 1500
    for _ in range(trials):
        u = [rng.random() for _ in range(n)]
        b, c = sum(v < p10 for v in u), sum(p10 <= v < p10 + p01 for v in u)
        lo, hi = tango_interval(b, c, n)
        hits += lo <= p10 - p01 <= hi
    assert 0.93 <= hits / trials <= 0.975


def test_percentile_interval_is_order_statistics():
    assert percentile_interval(np.arange(10_000)[::-1]) == (250.0, 9749.0)
    assert percentile_interval(np.array([-np.inf] * 300 + [1.0] * 9700)) == (-np.inf, 1.0)


def test_paired_bootstrap_against_a_loop_over_the_draws():
    x, y = bits("1101101110011011"), bits("1001100110001011")
    r = paired_bootstrap_difference(x, y, resamples=400, seed=3)
    means = sorted(sum(x[i] - y[i] for i in draw) / len(x) for draw in resample_indices(len(x), 400, 3))
    assert r.estimate == (sum(x) - sum(y)) / len(x)
    assert (r.lo, r.hi) == pytest.approx((means[10], means[389]))  # 400 * 0.025 -> the 11th and the 390th
    # paired: equal rows have no spread at all (an unpaired interval would be about +-30 points here)
    same = paired_bootstrap_difference(x, x)
    assert (same.lo, same.hi) == (0.0, 0.0)
    # large n: close to the normal interval of the mean difference
    rng = np.random.default_rng(1)
    x = (rng.random(400) < 0.4).astype(int)
    r = paired_bootstrap_difference(x, np.zeros(400))
    half = Z95 * x.std() / 20  # sd / sqrt(400)
    assert (r.hi - r.lo) / 2 == pytest.approx(half, rel=0.1)


def _pairs(losses, tokens):
    return [[nll * t, t] for nll, t in zip(losses, tokens)]


def test_loss_is_a_token_ratio_and_resampled_by_conversation():
    # a long easy conversation and a short hard one: the token mean is not the mean of the per-conversation losses
    row = _pairs([1.0, 3.0], [90, 10])
    assert loss(row) == pytest.approx((90 + 30) / 100)
    ref = _pairs([1.5, 3.0], [90, 10])
    r = loss_difference(row, ref, resamples=200, seed=5)
    assert r.estimate == pytest.approx(1.2 - (135 + 30) / 100)

    def ratio(pairs, draw):
        return sum(pairs[i][0] for i in draw) / sum(pairs[i][1] for i in draw)

    direct = sorted(ratio(row, draw) - ratio(ref, draw) for draw in resample_indices(2, 200, 5))
    assert (r.lo, r.hi) == pytest.approx((direct[5], direct[194]))
    with pytest.raises(ValueError, match="differ in count"):
        loss_difference(row, ref[:1])


def test_gain_share():
    aligned = _pairs([2.0, 2.2, 1.8, 2.1], [50, 40, 60, 30])
    lora = _pairs([1.5, 1.6, 1.4, 1.5], [50, 40, 60, 30])
    half = _pairs([1.75, 1.9, 1.6, 1.8], [50, 40, 60, 30])  # half of LoRA's gain on every conversation
    r = gain_share(half, lora, aligned, resamples=500)
    assert r.estimate == pytest.approx(0.5) and r.lo == pytest.approx(0.5) and r.hi == pytest.approx(0.5)
    assert gain_share(lora, lora, aligned).lo == pytest.approx(1.0)
    # LoRA gains nothing: no share can be claimed
    flat = gain_share(half, aligned, aligned, resamples=200)
    assert math.isnan(flat.estimate) and flat.lo == -math.inf and flat.hi == math.inf


def test_decide():
    margin = -0.03  # at most 3 points worse
    assert decide(Interval(0.0, -0.02, 0.04, "m"), margin) == "meets"
    assert decide(Interval(0.0, -0.03, 0.04, "m"), margin) == "meets"  # the worse end exactly at the margin
    assert decide(Interval(-0.06, -0.09, -0.031, "m"), margin) == "misses"
    assert decide(Interval(-0.02, -0.08, 0.01, "m"), margin) == "unresolved"
    assert decide(Interval(0.5, -math.inf, math.inf, "m"), 0.8) == "unresolved"
