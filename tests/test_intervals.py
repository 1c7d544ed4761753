"""Intervals over training seeds and the verdicts computed from them, on constructed tables."""

import math

import numpy as np
import pytest

from collafuse.evaluation import intervals as iv
from collafuse.evaluation.report import findings

CUTS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
T_975_2DF = 4.302653  # Student t, 97.5% quantile, 2 degrees of freedom (printed tables)


def test_t_interval_matches_a_case_computed_by_hand():
    # mean 0.014; s = sqrt((0.004^2 + 0 + 0.004^2) / 2) = 0.004; s / sqrt(3) = 0.0023094
    got = iv.t_interval([0.010, 0.014, 0.018])
    half = T_975_2DF * 0.004 / math.sqrt(3)  # 0.0099365
    assert got.n == 3 and got.mean == pytest.approx(0.014)
    assert (got.low, got.high) == pytest.approx((0.014 - half, 0.014 + half), abs=1e-8)
    assert got.low == pytest.approx(0.0040635, abs=1e-7)


def test_paired_interval_takes_same_seed_differences_only():
    # differences on seeds 0-2: 0.01, 0.02, 0.01 (seed 3 has no partner): mean 0.013333,
    # s = 0.01 * sqrt(1/3) = 0.0057735, s / sqrt(3) = 0.0033333, half = 0.0143422
    a = {0: 0.03, 1: 0.05, 2: 0.04}
    b = {0: 0.02, 1: 0.03, 2: 0.03, 3: 0.9}
    got = iv.paired_interval(a, b)
    assert got.n == 3 and got.mean == pytest.approx(0.0133333, abs=1e-7)
    assert (got.low, got.high) == pytest.approx((-0.0010088, 0.0276755), abs=1e-6)
    # pairing removes what a seed shares: seeds far apart, the same difference in each
    shifted = iv.paired_interval({0: 0.10, 1: 0.20, 2: 0.30}, {0: 0.09, 1: 0.19, 2: 0.29})
    assert shifted.above and shifted.low == pytest.approx(0.01)


def test_one_seed_gives_no_interval():
    one = iv.t_interval([0.02])
    assert one.mean == 0.02 and math.isnan(one.low) and not one.above and not one.below
    assert "no interval" in one.text()


def table(means, spread, seeds=3, seed=0):
    """{c: {seed: mean + noise}}: per-seed values around each c's mean."""
    rng = np.random.default_rng(seed)
    return {c: {k: m + spread * rng.standard_normal() for k in range(seeds)}
            for c, m in zip(CUTS, means)}


U = [0.05, 0.04, 0.03, 0.02, 0.035, 0.09]  # the paper's shape: best at 0.6, worst at 1


def test_u_shape_present_absent_unresolved():
    assert iv.u_shape(table(U, 0.001)).verdict == iv.HOLDS
    falling = [0.06, 0.05, 0.04, 0.03, 0.02, 0.01]  # best at c = 1, every inner c worse
    assert iv.u_shape(table(falling, 0.001)).verdict == iv.CONTRADICTED
    rising = falling[::-1]  # best at c = 0
    assert iv.u_shape(table(rising, 0.001)).verdict == iv.CONTRADICTED
    # the same means, seeds disagreeing by more than the differences: not resolved
    assert iv.u_shape(table(U, 0.03)).verdict == iv.UNRESOLVED
    assert iv.u_shape(table(U, 0.001, seeds=1)).verdict == iv.UNRESOLVED


def test_u_shape_with_its_best_far_from_the_papers():
    best_at_02 = [0.05, 0.01, 0.03, 0.04, 0.045, 0.09]
    verdict = iv.u_shape(table(best_at_02, 0.001))
    assert verdict.verdict == iv.CONTRADICTED and "far from 0.6" in verdict.reason
    # U present and best at 0.4, within 0.2 of 0.6: holds
    assert iv.u_shape(table([0.05, 0.04, 0.02, 0.03, 0.035, 0.09], 0.001)).verdict == iv.HOLDS


def test_collaboration_verdicts():
    assert iv.collaboration(table(U, 0.001)).verdict == iv.HOLDS
    local_best = [0.06, 0.05, 0.04, 0.03, 0.02, 0.01]
    assert iv.collaboration(table(local_best, 0.001)).verdict == iv.CONTRADICTED
    close = [0.06, 0.05, 0.04, 0.030, 0.035, 0.031]
    assert iv.collaboration(table(close, 0.005)).verdict == iv.UNRESOLVED


def test_disclosure_verdicts():
    paper = [0.087, 1.0, 1.02, 1.05, 1.06, 1.07]
    assert iv.disclosure_only_at_zero(table(paper, 0.005)).verdict == iv.HOLDS
    everywhere = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # c = 0 within a factor 3 of every c
    assert iv.disclosure_only_at_zero(table(everywhere, 0.005)).verdict == iv.CONTRADICTED
    borderline = [0.33, 1.0, 1.0, 1.0, 1.0, 1.0]  # ratio about 1/3, seeds spread widely
    assert iv.disclosure_only_at_zero(table(borderline, 0.05)).verdict == iv.UNRESOLVED


def test_cost_verdicts():
    assert iv.cost_falls_with_c(table([0, 1, 2, 3, 4, 5], 0.01)).verdict == iv.HOLDS
    assert iv.cost_falls_with_c(table([5, 4, 3, 2, 1, 0], 0.01)).verdict == iv.CONTRADICTED
    assert iv.cost_falls_with_c(table([1, 1, 1, 1, 1, 1], 0.1)).verdict == iv.UNRESOLVED


def results_rows(kid, kid_spread, ci_halfwidth=1e-4, seeds=3):
    """A results table of three seeds x six c x two clients, paper-like disclosure and cost;
    each row's sampling-only bootstrap interval of ci_halfwidth around its KID."""
    rng = np.random.default_rng(1)
    rows = []
    for k in range(seeds):
        for c, m, mse in zip(CUTS, kid, [0.087, 1.0, 1.02, 1.05, 1.06, 1.07]):
            value = m + kid_spread * rng.standard_normal()
            for cid in ("A", "B"):
                rows.append(dict(
                    protocol="shared-noise", seed=k, cut_ratio=c, cut_index=round(100 * c),
                    num_timesteps=100, client=cid, kid_train=value, kid_holdout=value,
                    kid_holdout_ci_low=value - ci_halfwidth,
                    kid_holdout_ci_high=value + ci_halfwidth,
                    disclosure_mse=mse + 0.002 * rng.standard_normal(),
                    client_energy_kwh=c * (1 + 0.01 * rng.standard_normal()),
                    client_flops=c * 1e12))
    return rows


def test_report_findings_hold_on_a_paper_like_table():
    lines = findings(results_rows(U, 0.001))
    assert all("**holds**" in line and "contradicted" not in line for line in lines), lines


def test_energy_decides_only_between_runs_trained_at_one_pace():
    rows = results_rows(U, 0.001)
    for r in rows:  # every run at one pace: seconds in proportion to FLOPs
        r["client_seconds"] = r["client_flops"] / 1e10
    assert "client energy: **holds**" in findings(rows)[3]
    for r in rows:  # c = 0.6 trained three times slower (two runs sharing the cores)
        if r["cut_ratio"] == 0.6:
            r["client_seconds"] *= 3
            r["client_energy_kwh"] *= 3
    line = findings(rows)[3]
    assert "client energy: **not resolved**" in line and "factor 3.0" in line, line
    assert "client FLOPs: **holds**" in line


def test_report_intervals_include_the_seed_to_seed_variance():
    """Seeds that disagree, each with a tight sampling-only interval: the KID findings are not
    resolved (an interval from sampling noise alone would call them)."""
    lines = findings(results_rows(U, 0.03, ci_halfwidth=1e-4))
    assert "**not resolved**" in lines[0] and "**holds**" not in lines[0], lines[0]
    assert "**not resolved**" in lines[1] and "**holds**" not in lines[1], lines[1]
    assert "**holds**" in lines[2]  # disclosure does not depend on the KID spread
