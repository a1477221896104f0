"""Paired comparisons over seeds: the mean of per-seed differences with a Student-t 95%
interval, the way a claim "A beats B" over a handful of seeds can be checked."""
from __future__ import annotations

import math
import statistics

__all__ = ["t_quantile_975", "paired_difference"]

# Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30.
_T975 = [12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423]


def t_quantile_975(df: int) -> float:
    """t(0.975, df); beyond the table, the Cornish-Fisher expansion around the normal's 1.95996."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1; got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def paired_difference(a: dict, b: dict) -> dict:
    """Per-seed differences a[seed] - b[seed] over the seeds both have: n, the mean, the 95%
    t-interval (None with one seed), the sample std, how many seeds favour a, and the
    differences themselves (in seed order)."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    out = {"n": len(diffs), "seeds": seeds, "diffs": diffs, "mean": None, "std": None, "low": None, "high": None,
           "wins": sum(d > 0 for d in diffs)}
    if not diffs:
        return out
    mean = statistics.fmean(diffs)
    out["mean"] = mean
    if len(diffs) > 1:
        sd = statistics.stdev(diffs)
        half = t_quantile_975(len(diffs) - 1) * sd / math.sqrt(len(diffs))
        out.update(std=sd, low=mean - half, high=mean + half)
    return out
