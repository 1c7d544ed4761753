"""Intervals over training seeds, and the verdicts on the paper's findings computed from them.

A sweep's unit of replication is the training seed: each seed is a whole training run per
(protocol, c) and its own evaluation (generated samples, real subsets, KID subsets), so the
spread of one seed's value to the next holds both the training-seed variance and the
sampling noise of the evaluation. The interval of a mean is the Student t-interval over the
seeds' values (n - 1 degrees of freedom); a comparison of two settings is the t-interval of
their same-seed (paired) differences, which removes what the seed shares across settings
(data split, initial weights of equal shape, evaluation draws). Fewer than two seeds give no
interval (NaN bounds), and every verdict that needs one is then "not resolved".

The decision rules are documented in docs/sweep.md; each is a few lines below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
HOLDS, CONTRADICTED, UNRESOLVED = "holds", "contradicted", "not resolved"
# Finding 1: "best c near 0.6": the best cut ratio within this distance of the paper's 0.6.
PAPER_BEST_CUT = 0.6
NEAR = 0.2 + 1e-9
# Finding 3: "high only at c = 0": the disclosure MSE at c = 0 below this fraction of every
# c > 0 value (the paper: 0.087 against about 1.0, a twelfth).
DISCLOSURE_RATIO = 1.0 / 3.0


@dataclass(frozen=True)
class Interval:
    """Mean of n values and its two-sided t-interval (NaN bounds when n < 2)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def above(self) -> bool:
        """The whole interval lies above 0 (False without an interval)."""
        return self.low > 0

    @property
    def below(self) -> bool:
        """The whole interval lies below 0 (False without an interval)."""
        return self.high < 0

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def text(self, fmt: str = "{:.4f}") -> str:
        if self.n == 0:
            return "n/a"
        if self.n < 2:
            return f"{fmt.format(self.mean)} (1 seed, no interval)"
        return f"{fmt.format(self.mean)} [{fmt.format(self.low)}, {fmt.format(self.high)}]"


def t_interval(values, level: float = LEVEL) -> Interval:
    """mean +- t_{(1+level)/2, n-1} * s / sqrt(n), s the sample std (ddof 1)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = float(stats.t.ppf((1 + level) / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n)


def paired(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """a[seed] - b[seed] over the seeds both have, in seed order."""
    return [a[k] - b[k] for k in sorted(set(a) & set(b))
            if a[k] is not None and b[k] is not None]


def paired_interval(a: dict[int, float], b: dict[int, float], level: float = LEVEL) -> Interval:
    """The t-interval of the same-seed differences a - b."""
    return t_interval(paired(a, b), level)


def seed_means(table: dict[float, dict[int, float]]) -> dict[float, float]:
    """Mean over seeds per cut ratio (NaN where none)."""
    return {c: t_interval(by_seed.values()).mean for c, by_seed in table.items()}


def best_cut(table: dict[float, dict[int, float]], among=None) -> float:
    """The cut ratio of lowest mean over seeds (among ``among``, default all)."""
    means = {c: m for c, m in seed_means(table).items()
             if (among is None or c in among) and math.isfinite(m)}
    return min(means, key=means.get)


@dataclass(frozen=True)
class Verdict:
    finding: str
    verdict: str  # HOLDS, CONTRADICTED or UNRESOLVED
    reason: str  # the numbers it was decided on


def u_shape(table: dict[float, dict[int, float]]) -> Verdict:
    """Finding 1: KID is U-shaped in c with the best c near 0.6.

    c* = the cut ratio of lowest mean KID. Holds: c* is strictly inside, both extremes are worse
    than c* (paired intervals of KID(0) - KID(c*) and KID(1) - KID(c*) above 0) and
    |c* - 0.6| <= 0.2. Contradicted: an extreme is better than every interior c (every
    KID(c) - KID(extreme) above 0), or c* is inside and every c within 0.2 of 0.6 is worse
    than c*. Otherwise not resolved.
    """
    cs = sorted(table)
    name = "KID is U-shaped in c, best near c = 0.6"
    if len(cs) < 3 or cs[0] != 0.0 or cs[-1] != 1.0:
        return Verdict(name, UNRESOLVED, "needs c = 0, c = 1 and a c between them")
    star = best_cut(table)
    inner = cs[1:-1]
    worse = {c: paired_interval(table[c], table[star]) for c in cs if c != star}
    reason = (f"best mean at c = {star:g}; KID(c) - KID(best): "
              + "; ".join(f"c = {c:g}: {iv.text()}" for c, iv in worse.items()))
    for extreme in (cs[0], cs[-1]):
        if all(paired_interval(table[c], table[extreme]).above for c in inner):
            return Verdict(name, CONTRADICTED, f"c = {extreme:g} beats every c between the "
                           f"extremes; {reason}")
    if star in inner:
        near = [c for c in cs if abs(c - PAPER_BEST_CUT) <= NEAR and c != star]
        extremes_worse = worse[cs[0]].above and worse[cs[-1]].above
        if extremes_worse and abs(star - PAPER_BEST_CUT) <= NEAR:
            return Verdict(name, HOLDS, reason)
        if near and all(worse[c].above for c in near) and abs(star - PAPER_BEST_CUT) > NEAR:
            return Verdict(name, CONTRADICTED, f"the best c is far from 0.6 and beats every c "
                           f"near it; {reason}")
    return Verdict(name, UNRESOLVED, reason)


def collaboration(table: dict[float, dict[int, float]]) -> Verdict:
    """Finding 2: collaboration (some c < 1) beats c = 1 on KID.

    c+ = the c < 1 of lowest mean KID. Holds: the paired interval of KID(c+) - KID(1) lies below
    0. Contradicted: it lies above 0 (even the best collaborative c is worse than no
    collaboration). Otherwise not resolved.
    """
    name = "collaboration (some c < 1) beats c = 1"
    if 1.0 not in table or len(table) < 2:
        return Verdict(name, UNRESOLVED, "needs c = 1 and a c < 1")
    plus = best_cut(table, among=[c for c in table if c < 1.0])
    diff = paired_interval(table[plus], table[1.0])
    reason = f"best c < 1 is c = {plus:g}; KID(c = {plus:g}) - KID(c = 1): {diff.text()}"
    verdict = HOLDS if diff.below else CONTRADICTED if diff.above else UNRESOLVED
    return Verdict(name, verdict, reason)


def disclosure_only_at_zero(table: dict[float, dict[int, float]]) -> Verdict:
    """Finding 3: disclosed information is high only at c = 0 (the paper's mean pixel MSE
    between hand-over and real images: low MSE = high disclosure).

    Per seed and c > 0 the ratio r(c) = MSE(0) / MSE(c). Holds: every r(c) interval lies
    below 1/3. Contradicted: some r(c) interval lies above 1/3 (that c discloses within a
    factor 3 of c = 0). Otherwise not resolved.
    """
    name = "disclosed information is high only at c = 0"
    others = [c for c in sorted(table) if c > 0]
    if 0.0 not in table or not others:
        return Verdict(name, UNRESOLVED, "needs c = 0 and a c > 0")
    ratios = {c: t_interval([table[0.0][k] / table[c][k] for k in sorted(set(table[0.0]) &
                                                                          set(table[c]))])
              for c in others}
    reason = "MSE(0) / MSE(c): " + "; ".join(f"c = {c:g}: {iv.text('{:.3f}')}"
                                             for c, iv in ratios.items())
    if all(iv.high < DISCLOSURE_RATIO for iv in ratios.values()):
        return Verdict(name, HOLDS, reason)
    if any(iv.low > DISCLOSURE_RATIO for iv in ratios.values()):
        return Verdict(name, CONTRADICTED, reason)
    return Verdict(name, UNRESOLVED, reason)


def cost_falls_with_c(table: dict[float, dict[int, float]], what: str = "client cost") -> Verdict:
    """Finding 4: a client's cost falls as c falls.

    Holds: for every pair of neighbouring cut ratios c_i < c_{i+1} the paired interval of
    cost(c_{i+1}) - cost(c_i) lies above 0. Contradicted: some such interval lies below 0.
    Otherwise not resolved.
    """
    name = f"a client's {what} falls as c falls"
    cs = sorted(table)
    if len(cs) < 2:
        return Verdict(name, UNRESOLVED, "needs two cut ratios")
    steps = {(a, b): paired_interval(table[b], table[a]) for a, b in zip(cs, cs[1:])}
    reason = "cost(next c) - cost(c): " + "; ".join(
        f"{a:g} -> {b:g}: {iv.text('{:.3g}')}" for (a, b), iv in steps.items())
    if all(iv.above for iv in steps.values()):
        return Verdict(name, HOLDS, reason)
    if any(iv.below for iv in steps.values()):
        return Verdict(name, CONTRADICTED, reason)
    return Verdict(name, UNRESOLVED, reason)
