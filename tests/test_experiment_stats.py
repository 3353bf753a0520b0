"""metrics.experiment_stats: every function against an independent reference — statsmodels and scipy
computations, published worked examples, numerical integration — plus property checks, the edge
cases (no conversions, 100%, an empty arm, one variant, a control rate of 0) and the recommendation
rules. Pure functions over counts: no services, no I/O."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import (
    confint_proportions_2indep,
    power_proportions_2indep,
    proportions_ztest,
    samplesize_proportions_2indep_onetail,
)

from metrics import experiment_stats as es
from metrics.experiment_stats import (
    COMPARISON_FIELDS,
    GuardrailResult,
    VariantCounts,
    abs_lift_ci,
    always_valid_p_value,
    analyze,
    chance_to_beat_control,
    confidence_sequence,
    guardrail_results,
    holm,
    power_two_proportions,
    relative_lift_ci,
    sample_size_per_variant,
    sequential_multiplier,
    sequential_rho,
    srm_p_value,
    two_proportion_ztest,
    welch_from_sums,
    welch_ttest,
)

# (control conversions, control n, treatment conversions, treatment n)
RATE_CASES = [(1000, 10000, 1100, 10000), (48, 1200, 61, 1180), (3, 40, 9, 45), (530, 530 * 7, 402, 2950)]


def arm(key: str, exposures: int, conversions: int, weight: float = 1.0) -> VariantCounts:
    return VariantCounts(key, weight, exposures, conversions)


# -- rates ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("xc", "nc", "xt", "nt"), RATE_CASES)
def test_ztest_matches_statsmodels_pooled_proportions_ztest(xc, nc, xt, nt):
    z, p = proportions_ztest([xt, xc], [nt, nc])
    result = two_proportion_ztest(xc, nc, xt, nt)
    assert result.statistic == pytest.approx(z, rel=1e-12)
    assert result.p_value == pytest.approx(p, rel=1e-10)


def test_ztest_0_vs_100_percent_matches_statsmodels():
    z, p = proportions_ztest([50, 0], [50, 50])
    assert two_proportion_ztest(0, 50, 50, 50).p_value == pytest.approx(p, rel=1e-9, abs=1e-300)
    assert two_proportion_ztest(0, 50, 50, 50).statistic == pytest.approx(z)


@pytest.mark.parametrize(("xc", "nc", "xt", "nt"), [(0, 500, 0, 480), (500, 500, 480, 480)])
def test_ztest_without_any_variation_has_p_1(xc, nc, xt, nt):
    assert two_proportion_ztest(xc, nc, xt, nt) == es.TestResult(0.0, 1.0)


def test_rate_comparisons_with_an_empty_arm_are_none():
    for f in (two_proportion_ztest, abs_lift_ci, relative_lift_ci, chance_to_beat_control):
        assert f(0, 0, 5, 100) is None
        assert f(5, 100, 0, 0) is None


@pytest.mark.parametrize(("xc", "nc", "xt", "nt"), RATE_CASES)
def test_absolute_ci_matches_statsmodels_wald(xc, nc, xt, nt):
    low, high = confint_proportions_2indep(xt, nt, xc, nc, method="wald", compare="diff", alpha=0.05)
    ci = abs_lift_ci(xc, nc, xt, nt)
    assert ci.estimate == pytest.approx(xt / nt - xc / nc)
    assert (ci.low, ci.high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))


def _delta_variance_numeric(xc: int, nc: int, xt: int, nt: int) -> float:
    """Delta method with a central finite-difference Jacobian of f(p_c, p_t) = p_t/p_c - 1."""
    pc, pt, h = xc / nc, xt / nt, 1e-7

    def f(a: float, b: float) -> float:
        return b / a - 1

    d_pc = (f(pc + h, pt) - f(pc - h, pt)) / (2 * h)
    d_pt = (f(pc, pt + h) - f(pc, pt - h)) / (2 * h)
    return d_pc**2 * pc * (1 - pc) / nc + d_pt**2 * pt * (1 - pt) / nt


@pytest.mark.parametrize(("xc", "nc", "xt", "nt"), RATE_CASES)
def test_relative_ci_is_the_delta_method(xc, nc, xt, nt):
    ci = relative_lift_ci(xc, nc, xt, nt, alpha=0.1)
    se = math.sqrt(_delta_variance_numeric(xc, nc, xt, nt))
    z = stats.norm.ppf(0.95)
    assert ci.estimate == pytest.approx((xt / nt) / (xc / nc) - 1)
    assert ci.se == pytest.approx(se, rel=1e-6)
    assert (ci.low, ci.high) == (pytest.approx(ci.estimate - z * se), pytest.approx(ci.estimate + z * se))


def test_relative_ci_covers_the_true_lift_95_percent_of_the_time():
    rng = np.random.default_rng(8)
    pc, pt, n = 0.10, 0.12, 5000
    xc, xt = rng.binomial(n, pc, 2000), rng.binomial(n, pt, 2000)
    cis = [relative_lift_ci(int(a), n, int(b), n) for a, b in zip(xc, xt, strict=True)]
    coverage = np.mean([ci.low <= pt / pc - 1 <= ci.high for ci in cis])
    assert 0.935 <= coverage <= 0.965


def test_relative_lift_is_undefined_when_the_control_never_converts():
    assert relative_lift_ci(0, 1000, 12, 1000) is None


def test_relative_ci_at_100_percent_in_both_arms_is_the_point_0():
    assert relative_lift_ci(300, 300, 250, 250) == es.Interval(0.0, 0.0, 0.0, 0.0)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000), st.floats(0, 1), st.floats(0, 1))
def test_intervals_contain_their_estimate(nc, nt, fc, ft):
    xc, xt = round(fc * nc), round(ft * nt)
    for ci in (abs_lift_ci(xc, nc, xt, nt), relative_lift_ci(xc, nc, xt, nt)):
        if ci is not None:
            assert ci.low <= ci.estimate <= ci.high


# -- values (Welch) -------------------------------------------------------------------------------------


def _per_user_values(rng: np.random.Generator, n: int, rate: float, scale: float) -> np.ndarray:
    """Synthetic per-user values: an exponential amount for converters, 0 for the others."""
    return np.where(rng.random(n) < rate, rng.exponential(scale, n), 0.0)


@pytest.mark.parametrize(("nc", "nt", "seed"), [(400, 380, 1), (50, 900, 2), (2, 3, 3)])
def test_welch_from_sums_matches_scipy_ttest_ind_on_the_expanded_samples(nc, nt, seed):
    rng = np.random.default_rng(seed)
    c, t = _per_user_values(rng, nc, 0.3, 20.0), _per_user_values(rng, nt, 0.35, 22.0)
    if nc == 2:  # too few to convert reliably: make sure the samples vary
        c, t = np.array([0.0, 5.0]), np.array([1.0, 0.0, 9.0])
    reference = stats.ttest_ind(t, c, equal_var=False)
    low, high = reference.confidence_interval(0.95)
    result = welch_from_sums(nc, c.sum(), (c**2).sum(), nt, t.sum(), (t**2).sum())
    assert result.diff == pytest.approx(t.mean() - c.mean())
    assert result.t == pytest.approx(reference.statistic, rel=1e-9)
    assert result.df == pytest.approx(reference.df, rel=1e-9)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-8)
    assert (result.low, result.high) == (pytest.approx(low, rel=1e-8), pytest.approx(high, rel=1e-8))


def test_welch_ttest_matches_scipy_ttest_ind_from_stats():
    reference = stats.ttest_ind_from_stats(12.5, 4.0, 40, 10.0, 6.0, 55, equal_var=False)
    result = welch_ttest(10.0, 36.0, 55, 12.5, 16.0, 40)
    assert result.t == pytest.approx(reference.statistic, rel=1e-12)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-10)


def test_welch_needs_two_users_per_arm():
    assert welch_from_sums(1, 5.0, 25.0, 10, 30.0, 200.0) is None
    assert welch_from_sums(10, 30.0, 200.0, 0, 0.0, 0.0) is None


def test_welch_on_constant_values_has_no_spread():
    same = welch_from_sums(100, 0.0, 0.0, 90, 0.0, 0.0)
    assert (same.diff, same.p_value, same.low, same.high, same.df) == (0.0, 1.0, 0.0, 0.0, None)
    apart = welch_from_sums(100, 300.0, 900.0, 90, 450.0, 2250.0)  # everyone 3 vs everyone 5
    assert (apart.diff, apart.p_value, apart.low, apart.high) == (2.0, 0.0, 2.0, 2.0)


# -- SRM ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exposures", "weights"),
    [
        ([5000, 4600], [0.5, 0.5]),
        ([5000, 5030], [1, 1]),
        ([2100, 950, 1010], [50, 25, 25]),
        ([70, 30], [0.7, 0.3]),
    ],
)
def test_srm_matches_scipy_chisquare(exposures, weights):
    expected = np.array(weights) / sum(weights) * sum(exposures)
    assert srm_p_value(exposures, weights) == pytest.approx(
        stats.chisquare(exposures, expected).pvalue, rel=1e-10
    )


def test_srm_reproduces_kohavi_tang_xu_worked_example():
    """Kohavi, Tang & Xu, "Trustworthy Online Controlled Experiments" (2020), ch. 3: 821,588 vs 815,482
    users in a 50/50 split have an SRM p-value of 1.8E-6."""
    assert srm_p_value([821_588, 815_482], [0.5, 0.5]) == pytest.approx(1.8e-6, abs=0.05e-6)


def test_srm_fires_on_a_skewed_split_and_not_on_a_fair_one():
    skewed = analyze([arm("A", 5000, 400), arm("B", 4600, 380)])
    assert skewed["srm"] and skewed["srm_p_value"] < 0.001
    assert skewed["recommendation"]["action"] == "check_setup"
    fair = analyze([arm("A", 5000, 400), arm("B", 4950, 380)])
    assert not fair["srm"] and fair["srm_p_value"] > 0.5


def test_srm_edge_cases():
    assert srm_p_value([0, 0], [1, 1]) is None
    assert srm_p_value([120], [1]) is None
    assert srm_p_value([100, 3], [1, 0]) == 0.0  # users in an arm that should get none
    assert srm_p_value([100, 0, 95], [1, 0, 1]) == pytest.approx(stats.chisquare([100, 95]).pvalue)


# -- Holm -----------------------------------------------------------------------------------------------


def test_holm_reproduces_the_wikipedia_example():
    """Wikipedia, "Holm-Bonferroni method", example: p = 0.01, 0.04, 0.03, 0.005 at alpha 0.05 rejects
    H1 and H4 only."""
    p = [0.01, 0.04, 0.03, 0.005]
    adjusted = holm(p)
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [a < 0.05 for a in adjusted] == [True, False, False, True]
    assert adjusted == pytest.approx(list(multipletests(p, method="holm")[1]))


def test_holm_matches_statsmodels():
    rng = np.random.default_rng(7)
    for m in (1, 2, 3, 5, 8):  # statsmodels runs gc.collect() per call: a few arrays only
        p = rng.uniform(0, 0.2, m).tolist()
        assert holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]), abs=1e-12)


def _holm_step_down_rejections(p: list[float], alpha: float) -> list[bool]:
    """Holm 1979 as a procedure: walk the p-values up from the smallest, rejecting while
    p_(k) <= alpha/(m - k), k = 0, 1, ... (multiplied out, to round as the adjusted values do)."""
    rejected = [False] * len(p)
    for k, i in enumerate(sorted(range(len(p)), key=p.__getitem__)):
        if (len(p) - k) * p[i] > alpha:
            break
        rejected[i] = True
    return rejected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=8))
def test_holm_adjusted_p_values_reject_as_the_step_down_procedure_and_are_monotone(p):
    adjusted = holm(p)
    assert all(raw <= a <= 1 for a, raw in zip(adjusted, p, strict=True))
    order = sorted(range(len(p)), key=p.__getitem__)
    assert all(adjusted[i] <= adjusted[j] for i, j in itertools.pairwise(order))
    for alpha in (0.01, 0.05, 0.2):
        assert [a <= alpha for a in adjusted] == _holm_step_down_rejections(p, alpha)


def test_holm_skips_undefined_p_values():
    assert holm([0.01, None, 0.04]) == pytest.approx([0.02, None, 0.04])
    assert holm([]) == []


# -- sequential -----------------------------------------------------------------------------------------


def _howard_normal_mixture_halfwidth(se: float, n: int, alpha: float, tuning: float) -> float:
    """Robbins' normal-mixture boundary in Howard et al. 2021 (eq. 14) form, on the variance scale:
    V = se², mixture variance tau² = V·n·rho²; |estimate - theta| < sqrt(V(V + tau²)/tau² ·
    (2 ln(1/alpha) + ln((V + tau²)/V)))."""
    rho2 = (-2 * math.log(alpha) + math.log(1 - 2 * math.log(alpha))) / tuning
    v = se**2
    tau2 = v * n * rho2
    return math.sqrt(v * (v + tau2) / tau2 * (2 * math.log(1 / alpha) + math.log((v + tau2) / v)))


@pytest.mark.parametrize(
    ("n", "alpha", "tuning"), [(200, 0.05, 5000), (5000, 0.05, 5000), (10**6, 0.1, 2000)]
)
def test_confidence_sequence_is_the_normal_mixture_boundary(n, alpha, tuning):
    low, high = confidence_sequence(0.01, 0.004, n, alpha=alpha, tuning=tuning)
    half = _howard_normal_mixture_halfwidth(0.004, n, alpha, tuning)
    assert (low, high) == (pytest.approx(0.01 - half, rel=1e-12), pytest.approx(0.01 + half, rel=1e-12))


def test_sequential_rho_is_tuned_for_the_tightest_sequence_at_n_star():
    widths = {n: sequential_multiplier(n, tuning=5000) for n in range(1000, 20001, 50)}
    assert min(widths, key=widths.__getitem__) == pytest.approx(5000, rel=0.05)
    assert sequential_rho(0.05, 5000) == pytest.approx(
        math.sqrt((2 * math.log(20) + math.log(1 + 2 * math.log(20))) / 5000)
    )


@settings(max_examples=200, deadline=None)
@given(
    st.integers(2, 10**7), st.sampled_from([0.01, 0.05, 0.1]), st.floats(-0.05, 0.05), st.floats(1e-4, 0.05)
)
def test_sequential_is_wider_than_fixed_and_its_p_value_inverts_it(n, alpha, estimate, se):
    fixed = abs(stats.norm.isf(alpha / 2))
    assert sequential_multiplier(n, alpha=alpha) > fixed
    low, high = confidence_sequence(estimate, se, n, alpha=alpha)
    p = always_valid_p_value(estimate, se, n, alpha=alpha)
    assert 0 <= p <= 1
    assert p >= 2 * stats.norm.sf(abs(estimate / se))  # never more significant than fixed-horizon
    if abs(abs(estimate) / se - sequential_multiplier(n, alpha=alpha)) > 1e-9:
        assert (p < alpha) == (not low <= 0 <= high)


def test_peeking_at_an_aa_test_keeps_the_sequential_false_positive_rate_below_alpha():
    """200 A/A runs at 10% conversion, a peek after every batch of 250 users per arm (20 peeks): the
    fixed-horizon test 'finds' a difference far more often than alpha, the always-valid one does not."""
    rng = np.random.default_rng(20261126)
    runs, peeks, batch = 200, 20, 250
    conversions = rng.binomial(batch, 0.1, size=(runs, peeks, 2)).cumsum(axis=1)
    fixed_hits = sequential_hits = 0
    for run in conversions:
        fixed = sequential = False
        for k, (xc, xt) in enumerate(run.tolist()):
            n = batch * (k + 1)
            fixed |= two_proportion_ztest(xc, n, xt, n).p_value < 0.05
            ci = abs_lift_ci(xc, n, xt, n)
            sequential |= always_valid_p_value(ci.estimate, ci.se, 2 * n) < 0.05
        fixed_hits += fixed
        sequential_hits += sequential
    assert fixed_hits / runs > 0.12
    assert sequential_hits / runs <= 0.05


def test_analyze_in_sequential_mode_reports_always_valid_and_fixed_numbers():
    variants = [arm("A", 10000, 1000), arm("B", 10000, 1100)]
    fixed, sequential = analyze(variants)["variants"][1], analyze(variants, sequential=True)["variants"][1]
    assert sequential["ci_low"] < fixed["ci_low"] < fixed["ci_high"] < sequential["ci_high"]
    assert sequential["abs_ci_low"] < fixed["abs_ci_low"] < fixed["abs_ci_high"] < sequential["abs_ci_high"]
    assert sequential["p_value"] > fixed["p_value"]
    assert (sequential["fixed_p_value"], sequential["fixed_ci_low"], sequential["fixed_ci_high"]) == (
        fixed["p_value"],
        fixed["ci_low"],
        fixed["ci_high"],
    )
    assert "fixed_p_value" not in fixed


# -- Bayesian -------------------------------------------------------------------------------------------


def _chance_by_quadrature(xc: int, nc: int, xt: int, nt: int) -> float:
    """P(p_t > p_c) = ∫ f_t(x)·F_c(x) dx for the Beta(1 + x, 1 + n - x) posteriors."""
    post_c, post_t = stats.beta(1 + xc, 1 + nc - xc), stats.beta(1 + xt, 1 + nt - xt)
    lo, hi = post_t.ppf(1e-12), post_t.isf(1e-12)
    value, _ = integrate.quad(
        lambda x: post_t.pdf(x) * post_c.cdf(x), lo, hi, epsabs=1e-13, epsrel=1e-11, limit=200
    )
    return float(value)


@pytest.mark.parametrize(
    ("xc", "nc", "xt", "nt"),
    # the smallest Beta parameter is, in turn, the control's a, the treatment's a, the control's b and
    # the treatment's b, exercising each form of the sum
    [
        (3, 50, 8, 60),
        (10, 50, 3, 50),
        (48, 50, 45, 50),
        (45, 50, 48, 50),
        (120, 1000, 140, 1000),
        (0, 30, 0, 40),
    ],
)
def test_chance_to_beat_control_matches_numerical_integration(xc, nc, xt, nt):
    assert chance_to_beat_control(xc, nc, xt, nt) == pytest.approx(
        _chance_by_quadrature(xc, nc, xt, nt), abs=1e-9
    )


def test_chance_to_beat_control_is_a_half_for_identical_arms_and_deterministic():
    assert chance_to_beat_control(70, 700, 70, 700) == pytest.approx(0.5, abs=1e-12)
    assert chance_to_beat_control(71, 700, 90, 710) == chance_to_beat_control(71, 700, 90, 710)


def test_chance_to_beat_control_normal_fallback_agrees_with_the_exact_sum(monkeypatch):
    exact = chance_to_beat_control(5000, 10000, 5120, 10000)
    monkeypatch.setattr(es, "EXACT_BETA_TERMS", 1000)
    assert chance_to_beat_control(5000, 10000, 5120, 10000) == pytest.approx(exact, abs=1e-3)


# -- power ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "mde", "alpha"), [(0.1, 0.02, 0.05), (0.2, 0.25, 0.05), (0.03, 0.1, 0.025), (0.5, 0.05, 0.01)]
)
def test_sample_size_matches_statsmodels(base, mde, alpha):
    target = base * (1 + mde)
    reference = samplesize_proportions_2indep_onetail(
        target - base, base, 0.8, ratio=1, alpha=alpha, alternative="two-sided"
    )
    n = sample_size_per_variant(base, mde, alpha=alpha)
    assert n in (math.ceil(reference) - 1, math.ceil(reference))  # the far tail's power can save one user

    def power(m: int) -> float:
        return power_proportions_2indep(target - base, base, m, alpha=alpha, return_results=False)

    assert power(n) >= 0.8 > power(n - 1)
    assert power_two_proportions(base, target, n, alpha=alpha) == pytest.approx(power(n), rel=1e-10)


def test_sample_size_edge_cases():
    assert sample_size_per_variant(0.0, 0.02) is None
    # at a 100% control rate the MDE can only be a drop
    assert sample_size_per_variant(1.0, 0.1) == math.ceil(
        samplesize_proportions_2indep_onetail(-0.1, 1.0, 0.8, alpha=0.05, alternative="two-sided")
    )


# -- guardrails -----------------------------------------------------------------------------------------


def test_guardrail_harmed_only_when_worse_at_significance():
    opt_outs = [arm("A", 5000, 50), arm("B", 5000, 95), arm("C", 5000, 20), arm("D", 5000, 55)]
    results = guardrail_results("opt_out", opt_outs)
    assert [(g.variant, g.harmed) for g in results] == [("B", True), ("C", False), ("D", False)]
    b = results[0]
    assert b.p_value == pytest.approx(proportions_ztest([95, 50], [5000, 5000])[1])
    assert b.lift == pytest.approx(0.9)
    lower_is_worse = guardrail_results("retention", opt_outs, higher_is_worse=False)
    assert [g.harmed for g in lower_is_worse] == [False, True, False]


def test_sequential_guardrail_is_more_conservative():
    opt_outs = [arm("A", 2000, 20), arm("B", 2000, 38)]
    assert guardrail_results("opt_out", opt_outs)[0].harmed
    assert not guardrail_results("opt_out", opt_outs, sequential=True)[0].harmed


# -- analyze: contract, edge cases, recommendations -----------------------------------------------------


def test_analyze_keeps_the_spec_contract():
    result = analyze([arm("control", 4000, 400), arm("B", 4000, 460), arm("C", 4000, 380)], mde=0.2)
    assert {
        "srm_p_value",
        "srm",
        "sequential",
        "alpha",
        "recommendation",
        "power",
        "variants",
    } <= result.keys()
    assert [v["key"] for v in result["variants"]] == ["control", "B", "C"]
    for v in result["variants"]:
        assert {"key", "exposures", "conversions", "rate", "lift", "ci_low", "ci_high", "p_value"} <= v.keys()
        assert set(COMPARISON_FIELDS) <= v.keys()
    control, b = result["variants"][0], result["variants"][1]
    assert all(control[f] is None for f in COMPARISON_FIELDS)
    assert b["rate"] == 0.115 and b["lift"] == pytest.approx(0.15)
    assert b["p_value"] == pytest.approx(proportions_ztest([460, 400], [4000, 4000])[1])


def test_analyze_applies_holm_over_the_treatment_arms():
    result = analyze([arm("A", 3000, 300), arm("B", 3000, 350), arm("C", 3000, 340), arm("D", 3000, 290)])
    raw = [v["p_value"] for v in result["variants"][1:]]
    adjusted = [v["p_value_adjusted"] for v in result["variants"][1:]]
    assert adjusted == pytest.approx(list(multipletests(raw, method="holm")[1]))


def test_analyze_value_metric_is_welch_per_exposed_user():
    a = VariantCounts("A", 1, 1000, 100, value_sum=2000.0, value_sum_sq=60000.0)
    b = VariantCounts("B", 1, 1000, 120, value_sum=2600.0, value_sum_sq=80000.0)
    v = analyze([a, b])["variants"][1]
    sd = [math.sqrt((s2 - s**2 / 1000) / 999) for s, s2 in ((2000.0, 60000.0), (2600.0, 80000.0))]
    reference = stats.ttest_ind_from_stats(2.6, sd[1], 1000, 2.0, sd[0], 1000, equal_var=False)
    assert v["mean_value"] == 2.6 and v["value_diff"] == pytest.approx(0.6)
    assert v["value_p_value"] == pytest.approx(reference.pvalue, rel=1e-9)


EDGE_CASES = {
    "zero conversions in both arms": [arm("A", 1000, 0), arm("B", 1000, 0)],
    "100% conversion in both arms": [arm("A", 800, 800), arm("B", 820, 820)],
    "empty treatment arm": [arm("A", 500, 50), arm("B", 0, 0)],
    "empty control arm": [arm("A", 0, 0), arm("B", 500, 50)],
    "no users at all": [arm("A", 0, 0), arm("B", 0, 0)],
    "a single variant": [arm("A", 1000, 100)],
    "no variants": [],
    "control rate 0": [arm("A", 1000, 0), arm("B", 1000, 30)],
    "0% vs 100%": [arm("A", 300, 0), arm("B", 300, 300)],
    "zero-weight arm with users": [arm("A", 300, 30), arm("B", 300, 40, weight=0)],
    "one user per arm": [VariantCounts("A", 1, 1, 1, 5.0, 25.0), VariantCounts("B", 1, 1, 0)],
    "four arms": [arm("A", 3000, 300), arm("B", 3000, 360), arm("C", 3000, 0), arm("D", 0, 0)],
}


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("case", EDGE_CASES)
def test_analyze_output_is_json_safe_for_every_edge_case(case, sequential):
    result = analyze(EDGE_CASES[case], sequential=sequential)
    json.dumps(result, allow_nan=False)
    assert result["recommendation"]["action"] in {
        "keep_running",
        "ship",
        "stop",
        "no_difference",
        "check_setup",
    }
    assert result["recommendation"]["text"]


def test_analyze_edge_case_values():
    zero = analyze(EDGE_CASES["zero conversions in both arms"])["variants"][1]
    assert (zero["rate"], zero["lift"], zero["abs_lift"], zero["p_value"]) == (0.0, None, 0.0, 1.0)
    assert zero["chance_to_beat_control"] == pytest.approx(0.5)
    full = analyze(EDGE_CASES["100% conversion in both arms"])["variants"][1]
    assert (full["lift"], full["ci_low"], full["ci_high"], full["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    empty = analyze(EDGE_CASES["empty treatment arm"])
    assert empty["variants"][1]["rate"] is None and empty["variants"][1]["p_value"] is None
    assert empty["srm"] and empty["recommendation"]["action"] == "check_setup"  # half the users are missing
    assert analyze(EDGE_CASES["no users at all"])["srm_p_value"] is None
    control_zero = analyze(EDGE_CASES["control rate 0"])
    b = control_zero["variants"][1]
    assert b["lift"] is None and b["ci_low"] is None and b["abs_lift"] == pytest.approx(0.03)
    assert control_zero["power"]["users_needed_per_variant"] is None
    single = analyze(EDGE_CASES["a single variant"])
    assert single["recommendation"]["action"] == "check_setup" and single["srm_p_value"] is None
    four = analyze(EDGE_CASES["four arms"])["variants"]
    assert four[3]["p_value"] is None and four[3]["p_value_adjusted"] is None
    defined = [four[1]["p_value"], four[2]["p_value"]]  # D is empty: Holm over B and C only
    reference = multipletests(defined, method="holm")[1]
    assert [four[1]["p_value_adjusted"], four[2]["p_value_adjusted"]] == pytest.approx(list(reference))
    assert four[2]["p_value_adjusted"] == pytest.approx(2 * four[2]["p_value"])


def test_counts_are_validated():
    with pytest.raises(ValueError):
        VariantCounts("A", 1, 10, 11)
    with pytest.raises(ValueError):
        VariantCounts("A", -1, 10, 1)


def test_recommends_stop_when_a_guardrail_is_harmed():
    guardrails = guardrail_results("opt_out", [arm("A", 5000, 50), arm("B", 5000, 95)])
    result = analyze([arm("A", 5000, 500), arm("B", 5000, 600)], mde=0.2, guardrails=guardrails)
    assert result["recommendation"]["action"] == "stop"
    assert result["recommendation"]["variant"] == "B"
    assert result["recommendation"]["text"].startswith("stop: guardrail harmed")
    assert result["guardrails"][0] == {
        "metric": "opt_out",
        "variant": "B",
        "harmed": True,
        "p_value": guardrails[0].p_value,
        "lift": pytest.approx(0.9),
    }


def test_srm_takes_precedence_over_everything():
    harmed = [GuardrailResult("opt_out", True, 0.001, "B")]
    result = analyze([arm("A", 5000, 400), arm("B", 4600, 380)], guardrails=harmed)
    assert result["recommendation"]["action"] == "check_setup"


def test_recommends_keep_running_below_min_exposures():
    result = analyze([arm("A", 60, 6), arm("B", 60, 30)])
    assert result["recommendation"]["action"] == "keep_running"
    assert "n too small" in result["recommendation"]["text"]


def test_recommends_keep_running_until_the_mde_sample_size_with_the_numbers():
    result = analyze([arm("A", 10000, 1000), arm("B", 10000, 1100)])  # p = 0.02 but 2% MDE needs 356k
    needed = sample_size_per_variant(0.1, 0.02)
    assert result["power"]["users_needed_per_variant"] == needed and not result["power"]["reached"]
    assert result["recommendation"]["action"] == "keep_running"
    assert result["recommendation"]["text"].startswith("keep running: n too small for a 2% MDE")
    assert f"{needed:,}" in result["recommendation"]["text"]


def test_recommends_shipping_the_significant_winner():
    result = analyze([arm("A", 5000, 500), arm("B", 5000, 600)], mde=0.2)
    assert result["power"]["reached"]
    assert result["recommendation"]["action"] == "ship" and result["recommendation"]["variant"] == "B"
    assert result["recommendation"]["text"].startswith("ship B")


def test_ships_the_best_of_several_winners_after_holm():
    variants = [arm("A", 6000, 600), arm("B", 6000, 700), arm("C", 6000, 760), arm("D", 6000, 640)]
    result = analyze(variants, mde=0.2)
    assert result["recommendation"]["variant"] == "C"


def test_holm_can_withhold_a_win_a_single_comparison_would_claim():
    two = analyze([arm("A", 5000, 500), arm("B", 5000, 570)], mde=0.2)
    assert two["recommendation"]["action"] == "ship"
    # five treatment arms: the plan splits alpha five ways, so it needs more users (5,716 per arm)
    many = analyze([arm("A", 8000, 800), arm("B", 8000, 890), *(arm(k, 8000, 800) for k in "CDEF")], mde=0.2)
    assert many["power"]["reached"]
    assert many["variants"][1]["p_value"] < 0.05 < many["variants"][1]["p_value_adjusted"]
    assert many["recommendation"]["action"] == "no_difference"


def test_recommends_no_difference_with_enough_power_and_nothing_significant():
    result = analyze([arm("A", 5000, 500), arm("B", 5000, 505)], mde=0.2)
    assert result["recommendation"]["action"] == "no_difference"
    assert result["recommendation"]["variant"] is None


def test_recommends_stop_when_every_variant_is_worse():
    result = analyze([arm("A", 5000, 600), arm("B", 5000, 480)], mde=0.2)
    assert result["recommendation"]["action"] == "stop"


def test_sequential_mode_may_ship_before_the_planned_sample_size():
    variants = [arm("A", 3000, 300), arm("B", 3000, 420)]
    assert analyze(variants)["recommendation"]["action"] == "keep_running"
    early = analyze(variants, sequential=True)
    assert not early["power"]["reached"]
    assert early["recommendation"]["action"] == "ship" and early["recommendation"]["variant"] == "B"
    assert early["sequential"] is True and early["sequential_tuning"] == 5000
