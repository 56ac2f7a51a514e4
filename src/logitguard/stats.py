"""Paired statistics for two result rows evaluated on the same items (issue 22, part 2), and the three-valued
verdict they feed. Pure functions of per-item data; docs/statistics.md says what each one is and how to read it.

- Binary outcomes compared item by item (refusal, over-refusal): McNemar's exact test (two-sided binomial test on
  the discordant pairs) and Tango's score interval for the difference in rates (Tango 1998, Stat Med 17:891).
- Scores (pass@1, accuracy) and held-out loss (a ratio: sum of NLL / sum of tokens): a paired bootstrap that
  resamples items, the same draw for every row, with a percentile interval.
- `decide`: meets (the interval's worse end is within the margin), misses (the whole interval is beyond it),
  unresolved otherwise.

scipy is not a dependency: the binomial tail is summed exactly with integers, the interval found by bisection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95%
RESAMPLES = 10_000
SEED = 0


@dataclass(frozen=True)
class Interval:
    """An estimate with its 95% interval; `p` is McNemar's exact p-value where the method has one."""

    estimate: float
    lo: float
    hi: float
    method: str
    p: float | None = None


def bits(items: str) -> list[int]:
    """Per-item outcomes "0110" -> [0, 1, 1, 0] (results files: one char per item, 1 = refused / passed)."""
    if set(items) - {"0", "1"}:
        raise ValueError(f"per-item outcomes must be a string of 0 and 1, got {items[:20]!r}")
    return [int(c) for c in items]


def discordant(x: list[int], y: list[int]) -> tuple[int, int]:
    """(b, c): the items where only x is 1, and where only y is 1. x and y are paired (same items, same order)."""
    if len(x) != len(y):
        raise ValueError(f"paired outcomes differ in length: {len(x)} and {len(y)} (not the same items)")
    b = sum(1 for i, j in zip(x, y) if i and not j)
    c = sum(1 for i, j in zip(x, y) if j and not i)
    return b, c


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips: 2 * P(X <= min(k, n - k)), at most 1.

    The Binomial(n, 1/2) law is symmetric, so the two-sided p-value (sum of the probabilities no larger than the
    observed one) is twice the smaller tail. Integer sums then one division: exact for any n.
    """
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return min(1.0, 2 * tail / 2**n)


def mcnemar_exact(x: list[int], y: list[int]) -> float:
    """McNemar's exact test of equal rates for paired binary outcomes: the binomial test on the discordant pairs."""
    b, c = discordant(x, y)
    return binomial_two_sided_p(b, b + c)


def _tango_z(delta: float, b: int, c: int, n: int) -> float:
    """Tango's score statistic for H0: rate(x) - rate(y) = delta, with b, c the discordant counts of n pairs.

    Under H0 the cell probabilities are q (only y) and q + delta (only x); q~ is their restricted maximum
    likelihood, the positive root of 2n q^2 + (-(b + c) + (2n - b + c) delta) q - c delta (1 - delta) = 0.
    Z = (b - c - n delta) / sqrt(n (2 q~ + delta (1 - delta))).
    """
    big_b = -(b + c) + (2 * n - b + c) * delta
    big_c = -c * delta * (1 - delta)
    q = (-big_b + math.sqrt(max(big_b * big_b - 8 * n * big_c, 0.0))) / (4 * n)
    var = n * (2 * q + delta * (1 - delta))
    num = b - c - n * delta
    if var <= 0:
        return 0.0 if num == 0 else math.copysign(math.inf, num)
    return num / math.sqrt(var)


def tango_interval(b: int, c: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Tango's score interval for the difference of paired rates (b - c) / n: every delta whose |Z| <= z.

    Z falls as delta rises, so each end is found by bisection (60 halvings: far below any printed digit).
    Unlike a Wald or bootstrap interval it does not collapse to a point when there are no discordant pairs.
    """
    if n == 0:
        return -1.0, 1.0
    est = (b - c) / n

    def solve(lo: float, hi: float, level: float) -> float:  # Z(lo) >= level >= Z(hi)
        for _ in range(60):
            mid = (lo + hi) / 2
            if _tango_z(mid, b, c, n) > level:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    lower = -1.0 if est == -1 else solve(-1.0, est, z)
    upper = 1.0 if est == 1 else solve(est, 1.0, -z)
    return lower, upper


def paired_rate_difference(x: list[int], y: list[int]) -> Interval:
    """rate(x) - rate(y) on paired binary outcomes: Tango's 95% interval and McNemar's exact p-value."""
    b, c = discordant(x, y)
    n = len(x)
    lo, hi = tango_interval(b, c, n)
    return Interval((b - c) / n if n else 0.0, lo, hi, "Tango score interval, McNemar exact p", mcnemar_exact(x, y))


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, n) item indices drawn with replacement; one draw is shared by every row compared (paired)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_interval(samples: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """The alpha/2 and 1 - alpha/2 empirical quantiles as order statistics (no interpolation, so +-inf samples are
    kept as such): of 10,000 sorted values, the 251st and the 9,750th."""
    s = np.sort(np.asarray(samples, dtype=float))  # (B,)
    k = len(s)
    return float(s[math.floor(alpha / 2 * k)]), float(s[math.ceil((1 - alpha / 2) * k) - 1])


def paired_bootstrap_difference(x, y, resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """mean(x) - mean(y) over paired items (pass@1, accuracy; fractions when seeds are averaged): percentile
    interval of the paired bootstrap (items resampled, both rows on the same draw)."""
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)  # (n,)
    if len(x) != len(y) or d.size == 0:
        raise ValueError(f"paired outcomes differ in length or are empty: {len(x)} and {len(y)}")
    means = d[resample_indices(d.size, resamples, seed)].mean(axis=1)  # (B,)
    lo, hi = percentile_interval(means)
    return Interval(float(d.mean()), lo, hi, f"paired bootstrap, {resamples} resamples, percentile")


def _loss_arrays(*rows) -> list[np.ndarray]:
    """Each row's [[nll_sum, tokens], ...] as an (n, 2) array; all rows must hold the same conversations."""
    arrays = [np.asarray(r, dtype=float).reshape(-1, 2) for r in rows]
    if len({a.shape[0] for a in arrays}) != 1 or arrays[0].shape[0] == 0:
        raise ValueError(f"loss pairs differ in count or are empty: {[a.shape[0] for a in arrays]}")
    return arrays


def _ratio(pairs: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Token-mean loss of each resample: sum of NLL over sum of tokens of its conversations. (B,)"""
    return pairs[idx, 0].sum(axis=1) / pairs[idx, 1].sum(axis=1)


def loss(pairs) -> float:
    """Held-out loss from per-conversation [nll_sum, tokens]: total NLL / total tokens (a token mean)."""
    (a,) = _loss_arrays(pairs)
    return float(a[:, 0].sum() / a[:, 1].sum())


def loss_difference(row, ref, resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """loss(row) - loss(ref) (negative: the row fits the held-out data better), conversations resampled jointly."""
    r, f = _loss_arrays(row, ref)
    idx = resample_indices(r.shape[0], resamples, seed)  # (B, n)
    lo, hi = percentile_interval(_ratio(r, idx) - _ratio(f, idx))
    return Interval(loss(row) - loss(ref), lo, hi, f"paired bootstrap over conversations, {resamples} resamples")


def gain_share(row, lora, aligned, resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """The share of LoRA's task gain a row keeps: (aligned loss - row loss) / (aligned loss - LoRA loss).

    The three rows are resampled jointly (same conversations). A resample where LoRA gains nothing has no share:
    it is counted at both ends (-inf for the lower quantile, +inf for the upper), which widens the interval
    rather than dropping the resample; if LoRA's own gain is that unclear, the interval says so.
    """
    r, lo_, a = _loss_arrays(row, lora, aligned)
    gain_lora = loss(aligned) - loss(lora)
    estimate = (loss(aligned) - loss(row)) / gain_lora if gain_lora > 0 else math.nan
    idx = resample_indices(r.shape[0], resamples, seed)  # (B, n)
    ref = _ratio(a, idx)  # (B,)
    num, den = ref - _ratio(r, idx), ref - _ratio(lo_, idx)  # (B,) gains of the row and of LoRA
    ok = den > 0
    share = np.where(ok, num / np.where(ok, den, 1.0), 0.0)  # (B,)
    lower = percentile_interval(np.where(ok, share, -np.inf))[0]
    upper = percentile_interval(np.where(ok, share, np.inf))[1]
    return Interval(estimate, lower, upper, f"paired bootstrap over conversations (3 rows), {resamples} resamples")


def decide(interval: Interval, bound: float) -> str:
    """Non-inferiority at 95% for a higher-is-better quantity that must not fall below `bound`:
    "meets" when the whole interval is at or above it (its worse end is within the margin), "misses" when the
    whole interval is below it, "unresolved" otherwise (the data cannot tell). 1e-9: float slack only."""
    if interval.lo >= bound - 1e-9:
        return "meets"
    if interval.hi < bound - 1e-9:
        return "misses"
    return "unresolved"
