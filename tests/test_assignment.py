"""GrowthBook-compatible experiment assignment (metrics/assignment.py).

Fixture values come from GrowthBook's shared SDK test cases: repository growthbook/growthbook, path
packages/sdk-js/test/cases.json (specVersion 0.8.0; identical rows in growthbook/growthbook-python
tests/cases.json), rewritten into tests/fixtures/growthbook_cases.json.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from metrics.assignment import (
    assign,
    bucket_ranges,
    choose_variation,
    equal_weights,
    fnv1a32,
    hash_fraction,
    in_namespace,
)

FIXTURES: dict[str, Any] = json.loads(
    (Path(__file__).parent / "fixtures" / "growthbook_cases.json").read_text(encoding="utf-8")
)
N_USERS = 100_000
USERS = [f"user-{i}" for i in range(N_USERS)]
# chi-square critical values at p = 0.001, used when scipy is not installed
_CHI2_CRITICAL_P001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467}


def _chi2_critical(df: int) -> float:
    try:
        import scipy.stats
    except ImportError:
        return _CHI2_CRITICAL_P001[df]
    return float(scipy.stats.chi2.ppf(0.999, df))


def _chi2(observed: Sequence[int], expected: Sequence[float]) -> float:
    return sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))


def _assert_matches_weights(counts: Counter[int | None], weights: Sequence[float]) -> None:
    total = sum(counts[i] for i in range(len(weights)))
    observed = [counts[i] for i in range(len(weights))]
    expected = [w * total for w in weights]
    stat = _chi2(observed, expected)
    assert stat < _chi2_critical(len(weights) - 1), (observed, expected, stat)


def _ids(rows: list[dict[str, Any]]) -> list[str]:
    return [str(r.get("name", r.get("n", i))) for i, r in enumerate(rows)]


# --- GrowthBook fixture rows ---------------------------------------------------------------------------


@pytest.mark.parametrize("row", FIXTURES["hash"], ids=_ids(FIXTURES["hash"]))
def test_hash_fixture(row: dict[str, Any]) -> None:
    assert hash_fraction(row["seed"], row["value"], row["version"]) == row["expected"]


@pytest.mark.parametrize("row", FIXTURES["bucket_ranges"], ids=_ids(FIXTURES["bucket_ranges"]))
def test_bucket_ranges_fixture(row: dict[str, Any]) -> None:
    got = bucket_ranges(row["n"], row["coverage"], row["weights"])
    # GrowthBook's own suites compare these after rounding to 6 decimals (values are unrounded floats)
    assert [[round(x, 6) for x in r] for r in got] == [[round(x, 6) for x in r] for r in row["expected"]]


@pytest.mark.parametrize("row", FIXTURES["choose_variation"], ids=_ids(FIXTURES["choose_variation"]))
def test_choose_variation_fixture(row: dict[str, Any]) -> None:
    assert choose_variation(row["n"], [(a, b) for a, b in row["ranges"]]) == row["expected"]


@pytest.mark.parametrize("row", FIXTURES["in_namespace"], ids=_ids(FIXTURES["in_namespace"]))
def test_in_namespace_fixture(row: dict[str, Any]) -> None:
    ns_id, start, end = row["namespace"]
    assert in_namespace(row["user_id"], (ns_id, start, end)) is row["expected"]


@pytest.mark.parametrize("row", FIXTURES["equal_weights"], ids=_ids(FIXTURES["equal_weights"]))
def test_equal_weights_fixture(row: dict[str, Any]) -> None:
    assert [round(w, 6) for w in equal_weights(row["n"])] == [round(w, 6) for w in row["expected"]]


@pytest.mark.parametrize("row", FIXTURES["assign"], ids=_ids(FIXTURES["assign"]))
def test_assign_fixture(row: dict[str, Any]) -> None:
    weights = row["weights"] if row["weights"] is not None else equal_weights(row["num_variations"])
    namespace: tuple[str, float, float] | None = None
    if row["namespace"]:
        ns_id, start, end = row["namespace"]
        namespace = (ns_id, start, end)
    got = assign(
        row["user_id"],
        seed=row["seed"],
        weights=weights,
        coverage=row["coverage"],
        namespace=namespace,
        hash_version=row["hash_version"],
    )
    assert got == row["expected"]


def test_fixture_covers_required_cases() -> None:
    assert {r["version"] for r in FIXTURES["hash"]} == {1, 2, 99}
    assert any(r["coverage"] < 1 for r in FIXTURES["bucket_ranges"])
    assert any(r["weights"] and not math.isclose(sum(r["weights"]), 1) for r in FIXTURES["bucket_ranges"])
    assert {r["expected"] for r in FIXTURES["in_namespace"]} == {True, False}
    assert sum(len(v) for v in FIXTURES.values() if isinstance(v, list)) >= 100


# --- exact GrowthBook details ----------------------------------------------------------------------


def test_fnv1a32_reference_vectors() -> None:
    # canonical FNV-1a 32-bit test vectors
    assert fnv1a32("") == 0x811C9DC5
    assert fnv1a32("a") == 0xE40C292C
    assert fnv1a32("foobar") == 0xBF9CF968


def test_fnv1a32_hashes_utf16_code_units_like_js() -> None:
    def over_units(units: list[int]) -> int:
        h = 0x811C9DC5
        for u in units:
            h = ((h ^ u) * 0x01000193) % 2**32
        return h

    assert fnv1a32("é中") == over_units([0xE9, 0x4E2D])
    # outside the BMP JS charCodeAt sees a surrogate pair (the Python SDK would hash the code point)
    assert fnv1a32("a😀") == over_units([0x61, 0xD83D, 0xDE00])


def test_hash_versions() -> None:
    v2 = hash_fraction("seed", "user-1")
    assert v2 == hash_fraction("seed", "user-1", 2)
    assert v2 is not None and v2 * 10000 == int(v2 * 10000)
    # v1 hashes value + seed, v2 hashes seed + value
    assert hash_fraction("b", "a", 1) == (fnv1a32("ab") % 1000) / 1000
    assert hash_fraction("b", "a", 2) == (fnv1a32(str(fnv1a32("ba"))) % 10000) / 10000
    assert hash_fraction("seed", "user-1", 0) is None
    assert hash_fraction("seed", "user-1", 3) is None


def test_bucket_ranges_float_accumulation_and_boundaries() -> None:
    # the running sum is plain float addition, exactly like the JS SDK (checked against it)
    ranges = bucket_ranges(10, 1.0, [0.1] * 10)
    assert ranges[3] == (0.30000000000000004, 0.4)
    assert choose_variation(0.3, ranges) == 2
    # a value on a shared boundary belongs to the later variation
    assert choose_variation(0.5, bucket_ranges(2)) == 1
    assert choose_variation(0.0, bucket_ranges(2)) == 0
    assert choose_variation(1.0, bucket_ranges(2)) == -1


def test_weight_sum_check_is_left_to_right() -> None:
    # 0.06 + 0.55 + 0.4 == 1.0100000000000002 left to right (fsum gives 1.01): GrowthBook rejects it
    assert bucket_ranges(3, 1.0, [0.06, 0.55, 0.4]) == bucket_ranges(3)
    # 0.01 + 0.29 + 0.69 == 0.99 left to right (fsum gives 0.9899999999999999): accepted, not rescaled
    assert bucket_ranges(3, 1.0, [0.01, 0.29, 0.69]) == [(0.0, 0.01), (0.01, 0.3), (0.3, 0.99)]


def test_weights_not_rescaled_leave_top_unassigned() -> None:
    user = next(u for u in USERS if hash_fraction("exp", u) == 0.9999)
    assert assign(user, seed="exp", weights=[0.4, 0.5999]) is None
    assert assign(user, seed="exp", weights=[0.4, 0.6]) == 1


def test_coverage_is_clamped() -> None:
    assert bucket_ranges(2, -0.5) == bucket_ranges(2, 0.0)
    assert bucket_ranges(2, 7.0) == bucket_ranges(2, 1.0)
    assert all(assign(u, seed="exp", weights=[0.5, 0.5], coverage=0.0) is None for u in USERS[:1000])


def test_assign_not_in_experiment_cases() -> None:
    assert assign("", seed="exp", weights=[0.5, 0.5]) is None
    assert assign("u1", seed="exp", weights=[1.0]) is None
    assert assign("u1", seed="exp", weights=[]) is None
    assert assign("u1", seed="exp", weights=[0.5, 0.5], hash_version=3) is None
    # hashVersion 0 is falsy in the SDK (`hashVersion || 1`)
    assert assign("u1", seed="exp", weights=[0.5, 0.5], hash_version=0) == assign(
        "u1", seed="exp", weights=[0.5, 0.5], hash_version=1
    )
    assert in_namespace("u1", None)


def test_namespace_uses_v1_hash_of_prefixed_id() -> None:
    for user in USERS[:200]:
        n = hash_fraction("__checkout", user, 1)
        assert n is not None
        assert in_namespace(user, ("checkout", 0.0, 0.5)) is (n < 0.5)
        # independent of the experiment's seed / hash version
        inside = assign(user, seed="x", weights=[0.5, 0.5], namespace=("checkout", 0.0, 0.5)) is not None
        assert inside is (n < 0.5)


# --- determinism ---------------------------------------------------------------------------------------


def test_deterministic_within_and_across_processes() -> None:
    users = USERS[:500]
    first = [assign(u, seed="exp-det", weights=[0.2, 0.3, 0.5], coverage=0.8) for u in users]
    assert first == [assign(u, seed="exp-det", weights=[0.2, 0.3, 0.5], coverage=0.8) for u in users]
    code = (
        "import json; from metrics.assignment import assign; "
        "print(json.dumps([assign(f'user-{i}', seed='exp-det', weights=[0.2, 0.3, 0.5], coverage=0.8) "
        "for i in range(500)]))"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == first


# --- distribution over 100k synthetic users ------------------------------------------------------------


@pytest.mark.parametrize(
    "weights",
    [[0.5, 0.5], [0.2, 0.8], equal_weights(3), [0.2, 0.3, 0.5]],
    ids=["50-50", "20-80", "3-way-equal", "20-30-50"],
)
def test_distribution_matches_weights(weights: list[float]) -> None:
    counts = Counter(assign(u, seed="exp-distribution", weights=weights) for u in USERS)
    assert counts[None] == 0
    _assert_matches_weights(counts, weights)


def test_coverage_half_puts_about_half_in() -> None:
    counts = Counter(assign(u, seed="exp-coverage", weights=[0.5, 0.5], coverage=0.5) for u in USERS)
    inside = counts[0] + counts[1]
    assert _chi2([inside, counts[None]], [N_USERS / 2, N_USERS / 2]) < _chi2_critical(1)
    _assert_matches_weights(counts, [0.5, 0.5])


def test_raising_coverage_never_moves_a_user() -> None:
    for user in USERS[:20_000]:
        low = assign(user, seed="exp-ramp", weights=[0.3, 0.7], coverage=0.3)
        if low is not None:
            assert assign(user, seed="exp-ramp", weights=[0.3, 0.7], coverage=0.8) == low


def test_changing_seed_reshuffles_users() -> None:
    a = [assign(u, seed="exp-a", weights=[0.5, 0.5]) for u in USERS]
    b = [assign(u, seed="exp-b", weights=[0.5, 0.5]) for u in USERS]
    table = Counter(zip(a, b, strict=True))
    changed = table[(0, 1)] + table[(1, 0)]
    assert 0.48 < changed / N_USERS < 0.52
    # independence of the two assignments (2x2 chi-square, df = 1)
    rows = {v: table[(v, 0)] + table[(v, 1)] for v in (0, 1)}
    cols = {v: table[(0, v)] + table[(1, v)] for v in (0, 1)}
    observed = [table[(r, c)] for r in (0, 1) for c in (0, 1)]
    expected = [rows[r] * cols[c] / N_USERS for r in (0, 1) for c in (0, 1)]
    assert _chi2(observed, expected) < _chi2_critical(1)


def test_namespaces_partition_users() -> None:
    first = [
        assign(u, seed="exp-ns-1", weights=[0.5, 0.5], namespace=("onboarding", 0.0, 0.5)) for u in USERS
    ]
    second = [
        assign(u, seed="exp-ns-2", weights=[0.2, 0.8], namespace=("onboarding", 0.5, 1.0)) for u in USERS
    ]
    both = sum(1 for x, y in zip(first, second, strict=True) if x is not None and y is not None)
    neither = sum(1 for x, y in zip(first, second, strict=True) if x is None and y is None)
    assert both == 0
    assert neither == 0  # full coverage: the two slices together cover everybody
    in_first = sum(x is not None for x in first)
    assert _chi2([in_first, N_USERS - in_first], [N_USERS / 2, N_USERS / 2]) < _chi2_critical(1)
    _assert_matches_weights(Counter(first), [0.5, 0.5])
    _assert_matches_weights(Counter(second), [0.2, 0.8])


def test_other_namespace_is_independent() -> None:
    users = USERS[:20_000]
    a = [in_namespace(u, ("onboarding", 0.0, 0.5)) for u in users]
    b = [in_namespace(u, ("pricing", 0.0, 0.5)) for u in users]
    overlap = sum(x and y for x, y in zip(a, b, strict=True))
    assert 0.23 < overlap / len(users) < 0.27
