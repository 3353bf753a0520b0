"""Experiment statistics (issue 8, SPEC §9b): pure functions over per-variant counts; no I/O, no state.

The first variant is the control; every treatment is compared with it. The conversion rate of an arm
is p = conversions / exposures, its variance p(1-p)/n; z = Φ⁻¹(1 - alpha/2).

- Rates: two-proportion z-test with the pooled rate under H0 (p-value); Wald interval for the
  absolute lift p_t - p_c; delta-method interval for the relative lift p_t/p_c - 1 (Deng, Knoblich &
  Lu 2018, "Applying the Delta Method in Metric Analytics"). The pooled test and the unpooled
  intervals can disagree right at the alpha boundary; a 0/n vs 0/n (or n/n vs n/n) comparison has
  a zero-width interval and p = 1.
- Values (revenue / points per exposed user, non-converters count as 0): Welch's t-test and
  interval from n, Σx and Σx².
- SRM: Pearson chi-square goodness of fit of the exposures against the configured weights, flagged at
  p < 0.001.
- Several treatment arms: Holm's step-down adjustment of their p-values (`p_value_adjusted`).
- Sequential mode: the asymptotic confidence sequence of Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas
  2023 ("Time-uniform central limit theory and asymptotic confidence sequences", Ann. Statist.), i.e.
  the normal-mixture boundary of Robbins 1970 / Howard et al. 2021 with a plug-in variance, as in
  GrowthBook's and PostHog's engines. Its tuning parameter N* is the total sample size (both arms) at
  which the sequence is tightest, default 5,000 (their default); its p-value is the reciprocal of
  the mixture e-value, so p < alpha exactly when the sequence excludes 0, and peeking at any time keeps
  the false-positive rate ≤ alpha. In this mode `ci_*`, `abs_ci_*`, `p_value`, `p_value_adjusted`,
  `value_ci_*` and `value_p_value` are the always-valid ones; the fixed-horizon `p_value`, `ci_low`
  and `ci_high` are kept next to them as `fixed_p_value`, `fixed_ci_low`, `fixed_ci_high`.
- Bayesian: Beta(1, 1) prior per arm; the chance to beat control P(p_t > p_c) is computed exactly by
  Evan Miller's closed-form sum ("Formulas for Bayesian A/B Testing", 2015), summed over whichever of
  the four Beta parameters is smallest, no sampling; above 200,000 terms (every parameter that large)
  the Beta posteriors are replaced by their normal approximations.
- Power: the fewest users per variant with which the two-sided pooled z-test detects a *relative*
  change `mde` of the control's rate with power 0.8 (statsmodels' `power_proportions_2indep`), alpha
  split evenly over the treatment arms (Bonferroni, which Holm never needs more than). It sizes the
  fixed-horizon test; the wider sequential intervals need more users for the same power.
- Guardrails (`guardrail_results`): a bad-outcome rate per treatment arm, harmed when it is worse at
  p < alpha (the same tests, no multiplicity correction).

Recommendation rules, first match wins:
1. SRM flagged, or fewer than two variants → `check_setup`;
2. a guardrail harmed (worse at significance) → `stop`;
3. an arm below `min_exposures` users → `keep_running`;
4. fixed mode only: an arm below the users the MDE needs (or no control conversions to size it
   from) → `keep_running`, with the numbers; this is what makes the fixed-horizon p-values valid;
5. a treatment significantly better after Holm → `ship` it (the largest lift if several);
6. every treatment significantly worse → `stop`, keep the control;
7. sequential mode: still below the users the MDE needs → `keep_running`;
8. otherwise → `no_difference`, keep the control.
`analyze` output is JSON-ready: plain floats, ints, bools, strings and None; never NaN or infinity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import special, stats

SRM_THRESHOLD = 0.001
DEFAULT_POWER = 0.8
DEFAULT_SEQUENTIAL_TUNING = 5000.0
EXACT_BETA_TERMS = 200_000

Action = Literal["keep_running", "ship", "stop", "no_difference", "check_setup"]


@dataclass(frozen=True, slots=True)
class VariantCounts:
    """One arm's sufficient statistics: exposed users, converted users and their per-user values."""

    key: str
    weight: float  # configured weight (for SRM)
    exposures: int  # users exposed (first exposure counts)
    conversions: int  # exposed users who converted (0..exposures)
    value_sum: float = 0.0  # sum over exposed users of their value (0 for non-converters)
    value_sum_sq: float = 0.0  # sum of squares of the per-user values

    def __post_init__(self) -> None:
        if self.exposures < 0 or not 0 <= self.conversions <= self.exposures:
            raise ValueError(f"variant {self.key!r}: need 0 <= conversions <= exposures")
        if not self.weight >= 0:
            raise ValueError(f"variant {self.key!r}: weight must be >= 0")

    @property
    def rate(self) -> float | None:
        return self.conversions / self.exposures if self.exposures else None


@dataclass(frozen=True, slots=True)
class GuardrailResult:
    """A guardrail metric in one treatment arm: `harmed` when it moved the bad way at significance."""

    metric: str
    harmed: bool
    p_value: float | None = None
    variant: str | None = None
    lift: float | None = None  # relative change of the guardrail rate vs control, when defined


@dataclass(frozen=True, slots=True)
class TestResult:
    """A test statistic and its two-sided p-value."""

    statistic: float
    p_value: float


@dataclass(frozen=True, slots=True)
class Interval:
    """A point estimate, its standard error and a two-sided confidence interval."""

    estimate: float
    se: float
    low: float
    high: float


@dataclass(frozen=True, slots=True)
class WelchResult:
    """Welch's unequal-variance t-test of mean_t - mean_c with its interval."""

    diff: float
    se: float
    df: float | None  # None when both arms have zero variance
    t: float
    p_value: float
    low: float
    high: float


def _z(alpha: float) -> float:
    return float(stats.norm.isf(alpha / 2))


def _p_from_z(z: float) -> float:
    return float(2 * stats.norm.sf(abs(z)))


def _degenerate_p(estimate: float) -> float:
    """The p-value with a zero standard error: no evidence if the estimate is 0, certainty otherwise."""
    return 1.0 if estimate == 0 else 0.0


# -- rates --------------------------------------------------------------------------------------------


def two_proportion_ztest(conv_c: int, n_c: int, conv_t: int, n_t: int) -> TestResult | None:
    """Two-sided z-test of p_t = p_c with the pooled rate under H0 (statsmodels' `proportions_ztest`):
    p̄ = (x_c + x_t)/(n_c + n_t), z = (p_t - p_c) / sqrt(p̄(1-p̄)(1/n_c + 1/n_t)), p = 2Φ(-|z|).
    None when an arm is empty; z = 0, p = 1 when both arms are all-0 or all-1 (p̄(1-p̄) = 0)."""
    if n_c == 0 or n_t == 0:
        return None
    diff = conv_t / n_t - conv_c / n_c
    pooled = (conv_c + conv_t) / (n_c + n_t)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_c + 1 / n_t))
    if se == 0:
        return TestResult(0.0, 1.0)
    z = diff / se
    return TestResult(z, _p_from_z(z))


def _rate_var(conv: int, n: int) -> float:
    p = conv / n
    return p * (1 - p) / n


def abs_lift_ci(conv_c: int, n_c: int, conv_t: int, n_t: int, *, alpha: float = 0.05) -> Interval | None:
    """Wald interval for p_t - p_c: se = sqrt(p_c(1-p_c)/n_c + p_t(1-p_t)/n_t), estimate ± z·se
    (statsmodels' `confint_proportions_2indep(method="wald")`). None when an arm is empty."""
    if n_c == 0 or n_t == 0:
        return None
    diff = conv_t / n_t - conv_c / n_c
    se = math.sqrt(_rate_var(conv_c, n_c) + _rate_var(conv_t, n_t))
    half = _z(alpha) * se
    return Interval(diff, se, diff - half, diff + half)


def relative_lift_ci(conv_c: int, n_c: int, conv_t: int, n_t: int, *, alpha: float = 0.05) -> Interval | None:
    """Delta-method interval for the relative lift r = p_t/p_c - 1 of independent arms:
    Var(r) ≈ Var(p_t)/p_c² + p_t²·Var(p_c)/p_c⁴, estimate ± z·sqrt(Var(r)).
    None when an arm is empty or the control rate is 0 (the ratio is undefined)."""
    if n_c == 0 or n_t == 0 or conv_c == 0:
        return None
    p_c, p_t = conv_c / n_c, conv_t / n_t
    lift = p_t / p_c - 1
    se = math.sqrt(_rate_var(conv_t, n_t) / p_c**2 + p_t**2 * _rate_var(conv_c, n_c) / p_c**4)
    half = _z(alpha) * se
    return Interval(lift, se, lift - half, lift + half)


# -- values -------------------------------------------------------------------------------------------


def welch_ttest(
    mean_c: float, var_c: float, n_c: int, mean_t: float, var_t: float, n_t: int, *, alpha: float = 0.05
) -> WelchResult | None:
    """Welch's t-test of mean_t - mean_c from sample means and (ddof=1) variances (scipy's
    `ttest_ind_from_stats(equal_var=False)`): se² = v_c/n_c + v_t/n_t, t = diff/se,
    df = se⁴ / ((v_c/n_c)²/(n_c-1) + (v_t/n_t)²/(n_t-1)) (Welch-Satterthwaite), p = 2·T_df(-|t|),
    interval diff ± t_{df, 1-alpha/2}·se. None when an arm has fewer than 2 users; with se = 0 the
    interval is the point and p is 1 if diff = 0, else 0."""
    if n_c < 2 or n_t < 2:
        return None
    diff = mean_t - mean_c
    a, b = var_c / n_c, var_t / n_t
    se = math.sqrt(a + b)
    if se == 0:
        return WelchResult(diff, 0.0, None, 0.0, _degenerate_p(diff), diff, diff)
    df = (a + b) ** 2 / (a**2 / (n_c - 1) + b**2 / (n_t - 1))
    t = diff / se
    half = float(stats.t.isf(alpha / 2, df)) * se
    return WelchResult(diff, se, df, t, float(2 * stats.t.sf(abs(t), df)), diff - half, diff + half)


def mean_and_variance(n: int, total: float, total_sq: float) -> tuple[float, float] | None:
    """Sample mean Σx/n and unbiased variance (Σx² - (Σx)²/n)/(n-1) from sums; None when n < 2.
    Round-off below 1e-12 of the mean square counts as 0 (constant values)."""
    if n < 2:
        return None
    mean = total / n
    var = max(0.0, (total_sq - total * total / n) / (n - 1))
    if var <= 1e-12 * (total_sq / n):
        var = 0.0
    return mean, var


def welch_from_sums(
    n_c: int, sum_c: float, sum_sq_c: float, n_t: int, sum_t: float, sum_sq_t: float, *, alpha: float = 0.05
) -> WelchResult | None:
    """`welch_ttest` from each arm's n, Σx and Σx² (see `mean_and_variance`)."""
    c, t = mean_and_variance(n_c, sum_c, sum_sq_c), mean_and_variance(n_t, sum_t, sum_sq_t)
    if c is None or t is None:
        return None
    return welch_ttest(c[0], c[1], n_c, t[0], t[1], n_t, alpha=alpha)


# -- SRM and multiplicity -----------------------------------------------------------------------------


def srm_p_value(exposures: Sequence[int], weights: Sequence[float]) -> float | None:
    """Pearson chi-square goodness of fit of the exposures to the weights (scipy's `chisquare`):
    E_i = N·w_i/Σw, X² = Σ (O_i - E_i)²/E_i, p = P(χ²_{k-1} > X²) over the arms with weight > 0.
    0 when an arm of weight 0 has users; None when there are no users or fewer than two weighted arms."""
    total, weight = sum(exposures), sum(weights)
    if total == 0 or weight <= 0:
        return None
    if any(n > 0 and w == 0 for n, w in zip(exposures, weights, strict=True)):
        return 0.0
    cells = [(n, total * w / weight) for n, w in zip(exposures, weights, strict=True) if w > 0]
    if len(cells) < 2:
        return None
    chi2 = sum((n - e) ** 2 / e for n, e in cells)
    return float(stats.chi2.sf(chi2, len(cells) - 1))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment (statsmodels' `multipletests(method="holm")`): with the m defined
    p-values sorted p_(1) ≤ … ≤ p_(m), p̃_(i) = min(1, max_{j≤i} (m - j + 1)·p_(j)); None stays None
    and does not count in m."""
    defined = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(defined)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(defined):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


# -- sequential ---------------------------------------------------------------------------------------


def sequential_rho(alpha: float, tuning: float = DEFAULT_SEQUENTIAL_TUNING) -> float:
    """Mixture parameter tuned for the tightest sequence at N* = `tuning` total users (Waudby-Smith et
    al. 2023, eq. 161): rho = sqrt((-2 ln alpha + ln(1 - 2 ln alpha)) / N*)."""
    log_alpha = math.log(alpha)
    return math.sqrt((-2 * log_alpha + math.log(1 - 2 * log_alpha)) / tuning)


def sequential_multiplier(n: int, *, alpha: float = 0.05, tuning: float = DEFAULT_SEQUENTIAL_TUNING) -> float:
    """What replaces z in estimate ± z·se after n total users (Waudby-Smith et al. 2023, eq. 9, with
    the per-user variance se²·n): sqrt(2(nrho² + 1)/(nrho²) · ln(sqrt(nrho² + 1)/alpha)); always > z."""
    x = n * sequential_rho(alpha, tuning) ** 2
    return math.sqrt(2 * (x + 1) / x * math.log(math.sqrt(x + 1) / alpha))


def confidence_sequence(
    estimate: float, se: float, n: int, *, alpha: float = 0.05, tuning: float = DEFAULT_SEQUENTIAL_TUNING
) -> tuple[float, float]:
    """Always-valid (1-alpha) interval estimate ± `sequential_multiplier`(n)·se, n = total users: it covers
    the true effect at every n simultaneously with probability ≥ 1-alpha (asymptotically)."""
    half = sequential_multiplier(n, alpha=alpha, tuning=tuning) * se
    return estimate - half, estimate + half


def always_valid_p_value(
    estimate: float, se: float, n: int, *, alpha: float = 0.05, tuning: float = DEFAULT_SEQUENTIAL_TUNING
) -> float:
    """1 / (normal-mixture e-value) against estimate = 0 (Waudby-Smith et al. 2023, eq. 155): with
    z = estimate/se and x = nrho², p = min(1, sqrt(1 + x)·exp(-x/(1 + x)·z²/2)); p < alpha exactly when the
    `confidence_sequence` at the same alpha and N* excludes 0. 1 or 0 when se = 0 (estimate 0 or not)."""
    if se == 0:
        return _degenerate_p(estimate)
    x = n * sequential_rho(alpha, tuning) ** 2
    log_e = x / (1 + x) * (estimate / se) ** 2 / 2 - 0.5 * math.log1p(x)
    return 1.0 if log_e <= 0 else math.exp(-log_e)


# -- Bayesian -----------------------------------------------------------------------------------------


def _prob_greater(a: int, b: int, c: int, d: int) -> float:
    """P(X > Y) for X ~ Beta(a, b), Y ~ Beta(c, d), a a positive integer (Evan Miller 2015):
    Σ_{i=0}^{a-1} B(c+i, b+d) / ((b+i)·B(1+i, b)·B(c, d)), summed in log space."""
    i = np.arange(a, dtype=np.float64)
    log_terms = special.betaln(c + i, b + d) - np.log(b + i) - special.betaln(1 + i, b) - special.betaln(c, d)
    return float(np.exp(special.logsumexp(log_terms)))


def chance_to_beat_control(conv_c: int, n_c: int, conv_t: int, n_t: int) -> float | None:
    """P(p_t > p_c) under independent Beta(1 + conversions, 1 + non-conversions) posteriors (Beta(1, 1)
    priors), exact: `_prob_greater` over the smallest of the four parameters, using
    P(B > A) = 1 - P(A > B) and p_t > p_c ⇔ 1-p_c > 1-p_t. If every parameter exceeds
    `EXACT_BETA_TERMS`, Φ((mean_t - mean_c)/sqrt(var_t + var_c)) of the posteriors' means and variances.
    None when an arm is empty."""
    if n_c == 0 or n_t == 0:
        return None
    a_c, b_c, a_t, b_t = conv_c + 1, n_c - conv_c + 1, conv_t + 1, n_t - conv_t + 1
    smallest = min(a_c, b_c, a_t, b_t)
    if smallest > EXACT_BETA_TERMS:
        mean_c, mean_t = a_c / (a_c + b_c), a_t / (a_t + b_t)
        var_c = a_c * b_c / ((a_c + b_c) ** 2 * (a_c + b_c + 1))
        var_t = a_t * b_t / ((a_t + b_t) ** 2 * (a_t + b_t + 1))
        p = float(stats.norm.cdf((mean_t - mean_c) / math.sqrt(var_c + var_t)))
    elif smallest == a_t:
        p = _prob_greater(a_t, b_t, a_c, b_c)
    elif smallest == a_c:
        p = 1 - _prob_greater(a_c, b_c, a_t, b_t)
    elif smallest == b_c:
        p = _prob_greater(b_c, a_c, b_t, a_t)
    else:
        p = 1 - _prob_greater(b_t, a_t, b_c, a_c)
    return min(1.0, max(0.0, p))


# -- power --------------------------------------------------------------------------------------------


def _mde_target(base_rate: float, mde: float) -> float:
    """The treatment rate a relative change `mde` means: up, unless that passes 100%."""
    up = base_rate * (1 + mde)
    return up if up <= 1 else base_rate * (1 - mde)


def _power_sds(p_c: float, p_t: float) -> tuple[float, float]:
    """Per-user standard deviations of p_t - p_c under H0 (pooled) and under the alternative."""
    pooled = (p_c + p_t) / 2
    return math.sqrt(2 * pooled * (1 - pooled)), math.sqrt(p_c * (1 - p_c) + p_t * (1 - p_t))


def sample_size_per_variant(
    base_rate: float, mde: float, *, alpha: float = 0.05, power: float = DEFAULT_POWER
) -> int | None:
    """Users per variant (equal arms) for the two-sided pooled z-test to detect p_t = `base_rate`·(1 +
    `mde`) (or ·(1 - `mde`) when that would pass 1): with p̄ = (p_c + p_t)/2,
    n = ⌈(z_{1-alpha/2}·sqrt(2p̄(1-p̄)) + z_{power}·sqrt(p_c(1-p_c) + p_t(1-p_t)))² / (p_t - p_c)²⌉
    (Fleiss, Levin & Paik 2003, §4.2, without continuity correction), less the users, if any, that the
    far tail's power makes unnecessary: the smallest n with `power_two_proportions` ≥ `power`.
    None when base_rate is 0."""
    if not 0 < base_rate <= 1:
        return None
    p_t = _mde_target(base_rate, mde)
    sd_null, sd_alt = _power_sds(base_rate, p_t)
    n = math.ceil(((_z(alpha) * sd_null + float(stats.norm.ppf(power)) * sd_alt) / (p_t - base_rate)) ** 2)
    while n > 1 and power_two_proportions(base_rate, p_t, n - 1, alpha=alpha) >= power:
        n -= 1  # the far tail's (tiny) power, which the formula leaves out
    return n


def power_two_proportions(p_c: float, p_t: float, n: int, *, alpha: float = 0.05) -> float:
    """Power of the two-sided pooled z-test with n users per arm (statsmodels'
    `power_proportions_2indep`): with δ = |p_t - p_c|, s₀, s₁ the per-user sds under H0 and H1,
    Φ((δ√n - z·s₀)/s₁) + Φ((-δ√n - z·s₀)/s₁)."""
    sd_null, sd_alt = _power_sds(p_c, p_t)
    delta = abs(p_t - p_c) * math.sqrt(n)
    if sd_alt == 0:
        return 1.0 if delta > _z(alpha) * sd_null else alpha
    crit = _z(alpha) * sd_null
    return float(stats.norm.cdf((delta - crit) / sd_alt) + stats.norm.cdf((-delta - crit) / sd_alt))


# -- guardrails ---------------------------------------------------------------------------------------


def guardrail_results(
    metric: str,
    variants: Sequence[VariantCounts],
    *,
    alpha: float = 0.05,
    higher_is_worse: bool = True,
    sequential: bool = False,
    sequential_tuning: float = DEFAULT_SEQUENTIAL_TUNING,
) -> list[GuardrailResult]:
    """One result per treatment arm for a guardrail rate (`conversions` = users with the bad event):
    harmed when it moved the bad way with p < alpha — the pooled z-test, or in sequential mode the
    always-valid p-value. No multiplicity correction: a guardrail errs on the side of raising alarms."""
    if not variants:
        return []
    c, out = variants[0], []
    for v in variants[1:]:
        p = _rate_p_value(c, v, alpha=alpha, sequential=sequential, tuning=sequential_tuning)
        rel = relative_lift_ci(c.conversions, c.exposures, v.conversions, v.exposures, alpha=alpha)
        diff = (
            v.conversions / v.exposures - c.conversions / c.exposures if v.exposures and c.exposures else 0.0
        )
        worse = diff > 0 if higher_is_worse else diff < 0
        harmed = p is not None and p < alpha and worse
        out.append(GuardrailResult(metric, harmed, p, v.key, rel.estimate if rel else None))
    return out


def _rate_p_value(
    control: VariantCounts, v: VariantCounts, *, alpha: float, sequential: bool, tuning: float
) -> float | None:
    if sequential:
        ci = abs_lift_ci(control.conversions, control.exposures, v.conversions, v.exposures, alpha=alpha)
        if ci is None:
            return None
        n = control.exposures + v.exposures
        return always_valid_p_value(ci.estimate, ci.se, n, alpha=alpha, tuning=tuning)
    test = two_proportion_ztest(control.conversions, control.exposures, v.conversions, v.exposures)
    return test.p_value if test else None


# -- analysis -----------------------------------------------------------------------------------------


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _pct(x: float) -> str:
    return f"{x * 100:.3g}%"


COMPARISON_FIELDS = (
    "lift", "ci_low", "ci_high", "p_value", "abs_lift", "abs_ci_low", "abs_ci_high", "p_value_adjusted",
    "chance_to_beat_control", "value_diff", "value_ci_low", "value_ci_high", "value_p_value",
)  # fmt: skip
FIXED_FIELDS = ("fixed_p_value", "fixed_ci_low", "fixed_ci_high")


def _compare(
    control: VariantCounts, v: VariantCounts, *, alpha: float, sequential: bool, tuning: float
) -> dict[str, Any]:
    """Everything one treatment arm reports against the control, before the Holm adjustment."""
    xc, nc, xt, nt = control.conversions, control.exposures, v.conversions, v.exposures
    test = two_proportion_ztest(xc, nc, xt, nt)
    absolute, relative = (
        abs_lift_ci(xc, nc, xt, nt, alpha=alpha),
        relative_lift_ci(xc, nc, xt, nt, alpha=alpha),
    )
    welch = welch_from_sums(
        nc, control.value_sum, control.value_sum_sq, nt, v.value_sum, v.value_sum_sq, alpha=alpha
    )
    row: dict[str, Any] = {
        "lift": relative.estimate if relative else None,
        "ci_low": relative.low if relative else None,
        "ci_high": relative.high if relative else None,
        "p_value": test.p_value if test else None,
        "p_value_adjusted": None,  # Holm, over all the treatment arms: set by `analyze`
        "abs_lift": absolute.estimate if absolute else None,
        "abs_ci_low": absolute.low if absolute else None,
        "abs_ci_high": absolute.high if absolute else None,
        "chance_to_beat_control": chance_to_beat_control(xc, nc, xt, nt),
        "value_diff": (v.value_sum / nt - control.value_sum / nc) if nc and nt else None,
        "value_ci_low": welch.low if welch else None,
        "value_ci_high": welch.high if welch else None,
        "value_p_value": welch.p_value if welch else None,
    }
    if not sequential:
        return row
    row |= {"fixed_p_value": row["p_value"], "fixed_ci_low": row["ci_low"], "fixed_ci_high": row["ci_high"]}
    n = nc + nt
    if relative:
        row["ci_low"], row["ci_high"] = confidence_sequence(
            relative.estimate, relative.se, n, alpha=alpha, tuning=tuning
        )
    if absolute:
        row["abs_ci_low"], row["abs_ci_high"] = confidence_sequence(
            absolute.estimate, absolute.se, n, alpha=alpha, tuning=tuning
        )
        row["p_value"] = always_valid_p_value(absolute.estimate, absolute.se, n, alpha=alpha, tuning=tuning)
    if welch:
        row["value_ci_low"], row["value_ci_high"] = confidence_sequence(
            welch.diff, welch.se, n, alpha=alpha, tuning=tuning
        )
        row["value_p_value"] = always_valid_p_value(welch.diff, welch.se, n, alpha=alpha, tuning=tuning)
    return row


def _power(variants: Sequence[VariantCounts], *, mde: float, alpha: float) -> dict[str, Any]:
    control, arms = variants[0], max(1, len(variants) - 1)
    plan_alpha = alpha / arms
    base = control.rate
    needed = sample_size_per_variant(base, mde, alpha=plan_alpha) if base is not None else None
    smallest = min(v.exposures for v in variants)
    achieved = (
        power_two_proportions(base, _mde_target(base, mde), smallest, alpha=plan_alpha)
        if base is not None and 0 < base <= 1 and smallest > 0
        else None
    )
    return {
        "mde": mde,
        "mde_kind": "relative",
        "baseline_rate": base,
        "alpha": plan_alpha,
        "target_power": DEFAULT_POWER,
        "users_needed_per_variant": needed,
        "smallest_variant_exposures": smallest,
        "achieved_power": achieved,
        "reached": needed is not None and smallest >= needed,
    }


def _recommend(
    variants: Sequence[VariantCounts],
    rows: list[dict[str, Any]],
    *,
    srm_p: float | None,
    power: dict[str, Any],
    guardrails: Sequence[GuardrailResult],
    alpha: float,
    sequential: bool,
    min_exposures: int,
) -> dict[str, Any]:
    def say(action: Action, text: str, variant: str | None = None) -> dict[str, Any]:
        return {"action": action, "variant": variant, "text": text}

    if len(variants) < 2:
        return say("check_setup", "check setup: an experiment needs a control and at least one treatment")
    if srm_p is not None and srm_p < SRM_THRESHOLD:
        split = " / ".join(f"{v.key} {v.exposures:,}" for v in variants)
        return say(
            "check_setup", f"check setup: sample ratio mismatch (p = {srm_p:.2g}; {split} vs the weights)"
        )
    harmed = [g for g in guardrails if g.harmed]
    if harmed:
        what = ", ".join(f"{g.metric} in {g.variant}" if g.variant else g.metric for g in harmed)
        return say("stop", f"stop: guardrail harmed ({what})", harmed[0].variant)
    smallest = min(variants, key=lambda v: v.exposures)
    if smallest.exposures < min_exposures:
        return say(
            "keep_running",
            f"keep running: n too small ({smallest.key} has {smallest.exposures:,} of the {min_exposures:,} "
            "users needed before any call)",
        )
    mde, needed = _pct(power["mde"]), power["users_needed_per_variant"]
    if needed is None:
        short = (
            f"keep running: n too small for a {mde} MDE (no conversions in the control yet to size it from)"
        )
    else:
        short = (
            f"keep running: n too small for a {mde} MDE (need {needed:,} users per variant at the control's "
            f"{_pct(power['baseline_rate'])} rate; {smallest.key} has {smallest.exposures:,})"
        )
    if not sequential and not power["reached"]:
        return say("keep_running", short)
    treatments = list(zip(variants[1:], rows[1:], strict=True))
    significant = [
        (v, r) for v, r in treatments if r["p_value_adjusted"] is not None and r["p_value_adjusted"] < alpha
    ]
    winners = [(v, r) for v, r in significant if r["abs_lift"] > 0]
    if winners:
        v, r = max(winners, key=lambda vr: vr[1]["abs_lift"])
        lift = f"{r['lift'] * 100:+.3g}%" if r["lift"] is not None else f"{r['abs_lift'] * 100:+.3g} points"
        return say(
            "ship",
            f"ship {v.key}: lift {lift} over control (adjusted p = {r['p_value_adjusted']:.2g})",
            v.key,
        )
    if len(significant) == len(treatments) and all(r["abs_lift"] < 0 for _, r in significant):
        return say("stop", "stop: every variant converts worse than control; keep the control")
    if not power["reached"]:
        return say("keep_running", short)
    return say(
        "no_difference",
        f"no difference: nothing significant at {smallest.exposures:,}+ users per variant, enough to "
        f"detect a {mde} MDE; keep the control",
    )


def analyze(
    variants: Sequence[VariantCounts],
    *,
    alpha: float = 0.05,
    sequential: bool = False,
    mde: float = 0.02,
    guardrails: Sequence[GuardrailResult] = (),
    min_exposures: int = 100,
    sequential_tuning: float = DEFAULT_SEQUENTIAL_TUNING,
) -> dict[str, Any]:
    """Every treatment against the first variant (the control), SRM, power, guardrails and a
    recommendation (rules in the module docstring). `mde` is relative to the control's rate.

    Returns `{srm_p_value, srm, sequential, sequential_tuning, alpha, variants, power, guardrails,
    recommendation}`; `variants` in input order, each `{key, weight, exposures, conversions, rate,
    lift, ci_low, ci_high, p_value, abs_lift, abs_ci_low, abs_ci_high, p_value_adjusted,
    chance_to_beat_control, mean_value, value_diff, value_ci_low, value_ci_high, value_p_value}`
    (+ `fixed_p_value, fixed_ci_low, fixed_ci_high` in sequential mode); comparisons are None for
    the control and wherever undefined."""
    rows: list[dict[str, Any]] = []
    for i, v in enumerate(variants):
        row: dict[str, Any] = {
            "key": v.key,
            "weight": v.weight,
            "exposures": v.exposures,
            "conversions": v.conversions,
            "rate": v.rate,
            "mean_value": v.value_sum / v.exposures if v.exposures else None,
        }
        if i == 0:
            row |= dict.fromkeys(COMPARISON_FIELDS + (FIXED_FIELDS if sequential else ()))
        else:
            row |= _compare(variants[0], v, alpha=alpha, sequential=sequential, tuning=sequential_tuning)
        rows.append(row)
    for row, p in zip(rows[1:], holm([r["p_value"] for r in rows[1:]]), strict=True):
        row["p_value_adjusted"] = p
    srm_p = srm_p_value([v.exposures for v in variants], [v.weight for v in variants])
    power = _power(variants, mde=mde, alpha=alpha) if variants else {}
    recommendation = _recommend(
        variants,
        rows,
        srm_p=srm_p,
        power=power,
        guardrails=guardrails,
        alpha=alpha,
        sequential=sequential,
        min_exposures=min_exposures,
    )
    result: dict[str, Any] = _json_safe(
        {
            "srm_p_value": srm_p,
            "srm": srm_p is not None and srm_p < SRM_THRESHOLD,
            "sequential": sequential,
            "sequential_tuning": sequential_tuning if sequential else None,
            "alpha": alpha,
            "variants": rows,
            "power": power,
            "guardrails": [
                {
                    "metric": g.metric,
                    "variant": g.variant,
                    "harmed": g.harmed,
                    "p_value": g.p_value,
                    "lift": g.lift,
                }
                for g in guardrails
            ],
            "recommendation": recommendation,
        }
    )
    return result
