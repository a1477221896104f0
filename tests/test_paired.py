"""The comparison report's statistics: paired differences over seeds with a t-interval, and
what the demo prints about its single seed."""
import json
import math

import pytest
from helpers import load_script

from vlmoe.eval.paired import paired_difference, t_quantile_975


def test_paired_difference_matches_a_hand_computation():
    a = {0: 61.0, 1: 64.0, 2: 60.0, 3: 66.0, 4: 59.0, 9: 70.0}  # seed 9 has no partner: left out
    b = {0: 60.0, 1: 62.0, 2: 63.0, 3: 62.0, 4: 54.0}
    d = paired_difference(a, b)
    diffs = [1.0, 2.0, -3.0, 4.0, 5.0]
    mean = sum(diffs) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 4)
    half = 2.7764 * sd / math.sqrt(5)  # t(0.975, 4) from a printed table
    assert d["seeds"] == [0, 1, 2, 3, 4] and d["diffs"] == diffs and d["wins"] == 4
    assert d["mean"] == pytest.approx(mean) and d["std"] == pytest.approx(sd)
    assert (d["low"], d["high"]) == (pytest.approx(mean - half, abs=1e-3), pytest.approx(mean + half, abs=1e-3))
    one = paired_difference({0: 1.0}, {0: 0.5})
    assert one["mean"] == 0.5 and one["low"] is None  # one seed: no interval
    assert paired_difference({0: 1.0}, {1: 1.0})["n"] == 0


def test_t_quantiles():
    assert t_quantile_975(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile_975(9) == pytest.approx(2.262, abs=1e-3)
    assert t_quantile_975(40) == pytest.approx(2.021, abs=1e-3)  # beyond the table
    assert t_quantile_975(10 ** 6) == pytest.approx(1.960, abs=1e-3)
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_demo_puts_its_single_seed_beside_the_paired_report(tmp_path):
    demo = load_script("demo")
    results = [{"model": "limoe-tiny", "seed": 1, "steps": 250, "zeroshot_top1": 0.60},
               {"model": "clip-tiny", "seed": 1, "steps": 250, "zeroshot_top1": 0.63}]
    summary = {"steps": 250, "batch_size": 64, "command": "python scripts/compare.py", "paired": [
        {"a": "limoe-tiny", "b": "clip-tiny", "n": 5, "mean": 1.2, "low": -2.0, "high": 4.4, "wins": 3,
         "seeds": [0, 1, 2, 3, 4], "diffs": [1.0, -3.0, 2.0, 4.0, 2.0]},
        {"a": "limoe-tiny, joint", "b": "clip-tiny", "n": 5, "mean": -7.0, "low": -9.0, "high": -5.0, "wins": 0,
         "seeds": [0, 1, 2, 3, 4], "diffs": [-7.0] * 5}]}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    text = demo.seed_context(results, path)
    assert "one seed (1): LIMoE - CLIP = -3.0 points" in text and "cannot say which is better" in text
    assert "other numbers on another CPU type" in text and "The paired result is the one to read." in text
    assert "Paired over 5 seeds" in text and "+1.2 points, 95% interval [-2.0, +4.4]" in text
    assert "LIMoE ahead on 3 of 5 seeds (seed 1: -3.0)" in text
    assert "-7.0" not in text  # another variant's pair is not the demo's
    assert "Paired" not in demo.seed_context(results, tmp_path / "missing.json")
