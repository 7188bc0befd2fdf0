"""The intervals an evaluation reports: Wilson's for a rate, a paired bootstrap for the difference
between two builds. Pure functions of counts; seeded, so a report reads the same every time."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Z_95 = 1.959963984540054
"""The normal quantile of a two-sided 95 % interval."""
RESAMPLES = 1000
SEED = 20_261_207


def wilson(hits: int, total: int, z: float = Z_95) -> tuple[float, float] | None:
    """Wilson's score interval of `hits` in `total` (None with no trials): unlike the normal
    approximation, it stays inside [0, 1] and is honest at 0 and at `total` hits."""
    if total <= 0:
        return None
    p = hits / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    low = 0.0 if hits == 0 else max(0.0, centre - half)  # exact at the ends, free of rounding
    high = 1.0 if hits == total else min(1.0, centre + half)
    return low, high


Cluster = tuple[float, float, float, float]
"""One case's sums over its paired runs: numerator and denominator on build A, then on B."""


def ratio(clusters: Sequence[Cluster], side: int) -> float | None:
    """sum(numerators) / sum(denominators) of one side (0: A, 1: B); None when nothing counted."""
    numerator = sum(c[2 * side] for c in clusters)
    denominator = sum(c[2 * side + 1] for c in clusters)
    return numerator / denominator if denominator else None


def paired_bootstrap(clusters: Sequence[Cluster], *, resamples: int = RESAMPLES,
                     seed: int = SEED) -> tuple[float, float] | None:
    """A 95 % percentile interval of B's ratio minus A's, resampling cases (each with all its
    paired runs) with replacement, so repeats of one case count as one piece of evidence, not
    several. None with fewer than two cases or nothing counted on either side."""
    if len(clusters) < 2 or ratio(clusters, 0) is None or ratio(clusters, 1) is None:
        return None
    rng = random.Random(seed)  # the same seed for every measure: each sees the same resamples
    n = len(clusters)
    differences = []
    for _ in range(resamples):
        na = da = nb = db = 0.0
        for index in rng.choices(range(n), k=n):
            cluster = clusters[index]
            na += cluster[0]
            da += cluster[1]
            nb += cluster[2]
            db += cluster[3]
        if da and db:
            differences.append(nb / db - na / da)
    if not differences:
        return None
    differences.sort()
    low = differences[int(0.025 * (len(differences) - 1))]
    high = differences[math.ceil(0.975 * (len(differences) - 1))]
    return low, high


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank `q` quantile (0..1) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
