"""Deterministic, stateless experiment assignment, bit-compatible with GrowthBook SDKs.

A user lands in the same variation here as in a GrowthBook SDK given the same seed, hash
attribute value (our user id), weights, coverage, namespace and hash version. The rules below were
read from GrowthBook's reference JS SDK (``growthbook/growthbook``, ``packages/sdk-js/src/util.ts``
and ``core.ts``) and the Python SDK (``growthbook/growthbook-python``, ``growthbook/core.py``), and
are checked against their shared ``cases.json`` in ``tests/fixtures/growthbook_cases.json``.

- ``fnv1a32``: FNV-1a 32-bit (offset 0x811C9DC5, prime 0x01000193) over the UTF-16 code units of the
  string, as JS ``charCodeAt`` does. Identical to the Python SDK (which uses code points) except for
  characters outside the BMP, where we follow the JS reference SDK.
- ``hash_fraction`` v2: ``fnv1a32(str(fnv1a32(seed + value))) % 10000 / 10000`` (a 4-decimal grid in
  [0, 0.9999]). v1 (legacy, biased): ``fnv1a32(value + seed) % 1000 / 1000`` - note the reversed
  order. Any other version gives ``None``.
- ``bucket_ranges``: coverage is clamped into [0, 1]. Weights are replaced by equal weights when
  missing, of the wrong length, or when their sum (plain left-to-right float sum) is outside
  [0.99, 1.01]; they are never rescaled, so a sum of 0.9999 leaves the top 0.0001 unassigned.
  Variation i gets ``[c_i, c_i + coverage * w_i)`` with ``c_i`` the running float sum of the
  earlier weights: coverage trims the end of each variation's slice (raising coverage never moves
  a user between variations). No rounding is applied anywhere; we repeat GrowthBook's float
  operations in the same order so range boundaries are bit-identical (e.g. ten weights of 0.1 give
  a 4th range starting at 0.30000000000000004).
- ``choose_variation``: ranges are half-open, the first one containing ``n`` wins; a value exactly
  on a shared boundary goes to the later variation, empty ranges never match, and -1 means none.
- ``in_namespace``: ``hash("__" + namespace_id, user_id, 1)`` - always hash version 1, whatever the
  experiment's version or seed - must lie in ``[start, end)``.
- ``assign`` follows the SDK's ``runExperiment`` order: fewer than 2 variations or an empty user id
  -> not in the experiment; namespace check; hash (``hash_version`` 0 means 1, like JS ``|| 1``; an
  unknown version -> not in the experiment); bucket ranges; choose. GrowthBook substitutes the
  experiment key for an empty seed - callers pass the key as ``seed`` when none is configured.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
    "assign",
    "bucket_ranges",
    "choose_variation",
    "equal_weights",
    "fnv1a32",
    "hash_fraction",
    "in_namespace",
]

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193
_MASK32 = 0xFFFFFFFF


def _utf16_code_units(text: str) -> Iterable[int]:
    """The UTF-16 code units of ``text`` (what JS ``charCodeAt`` iterates over)."""
    if text.isascii() or max(map(ord, text)) <= 0xFFFF:
        return map(ord, text)
    data = text.encode("utf-16-le", "surrogatepass")
    return (data[i] | (data[i + 1] << 8) for i in range(0, len(data), 2))


def fnv1a32(text: str) -> int:
    """FNV-1a 32-bit hash of ``text``'s UTF-16 code units as an unsigned int (GrowthBook's ``hashFnv32a``)."""
    h = _FNV_OFFSET
    for unit in _utf16_code_units(text):
        h = ((h ^ unit) * _FNV_PRIME) & _MASK32
    return h


def hash_fraction(seed: str, value: str, version: int = 2) -> float | None:
    """GrowthBook's ``hash(seed, value, version)``: a number in [0, 1), or None for an unknown version."""
    if version == 2:
        return (fnv1a32(str(fnv1a32(seed + value))) % 10000) / 10000
    if version == 1:
        return (fnv1a32(value + seed) % 1000) / 1000
    return None


def equal_weights(n: int) -> list[float]:
    """``n`` weights of ``1 / n`` each; empty for ``n <= 0``."""
    if n <= 0:
        return []
    return [1 / n] * n


def bucket_ranges(
    n: int, coverage: float = 1.0, weights: Sequence[float] | None = None
) -> list[tuple[float, float]]:
    """The ``[start, end)`` hash range of each of ``n`` variations (GrowthBook's ``getBucketRanges``).

    Coverage is clamped into [0, 1]; weights fall back to equal weights when missing, not ``n`` long or
    not summing to 1 within 0.01 (they are never rescaled).
    """
    if coverage < 0:
        coverage = 0.0
    elif coverage > 1:
        coverage = 1.0
    chosen: Sequence[float] = equal_weights(n) if weights is None or len(weights) != n else weights
    total = 0.0
    for w in chosen:  # left to right like JS reduce (Python >= 3.12 sum() is compensated)
        total += w
    if total < 0.99 or total > 1.01:
        chosen = equal_weights(n)
    ranges: list[tuple[float, float]] = []
    cumulative = 0.0
    for w in chosen:
        start = cumulative
        cumulative += w
        ranges.append((start, start + coverage * w))
    return ranges


def choose_variation(n: float, ranges: Sequence[tuple[float, float]]) -> int:
    """Index of the first half-open range ``[start, end)`` containing ``n``; -1 when in none."""
    for i, (start, end) in enumerate(ranges):
        if start <= n < end:
            return i
    return -1


def in_namespace(user_id: str, namespace: tuple[str, float, float] | None) -> bool:
    """Whether ``user_id`` falls in the namespace slice ``(namespace_id, start, end)``; True when None."""
    if namespace is None:
        return True
    namespace_id, start, end = namespace
    n = hash_fraction("__" + namespace_id, user_id, 1)
    return n is not None and start <= n < end


def assign(
    user_id: str,
    *,
    seed: str,
    weights: Sequence[float],
    coverage: float = 1.0,
    namespace: tuple[str, float, float] | None = None,
    hash_version: int = 2,
) -> int | None:
    """The variation index a GrowthBook SDK gives ``user_id`` (as the hash attribute) for these settings.

    One variation per weight. None when the user is not in the experiment: fewer than 2 variations,
    empty user id, outside the namespace or the coverage, or an unknown hash version.
    """
    if len(weights) < 2 or not user_id:
        return None
    if not in_namespace(user_id, namespace):
        return None
    n = hash_fraction(seed, user_id, hash_version or 1)
    if n is None:
        return None
    index = choose_variation(n, bucket_ranges(len(weights), coverage, weights))
    return index if index >= 0 else None
