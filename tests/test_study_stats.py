"""Study statistics with few seeds and edge cases: t intervals and their calibration, intervals that
touch 0, amortisation when scratch failed, the smallest size reaching the target, caveats kept,
the few-shot legend and the statistics seed of the study config."""

from __future__ import annotations

import numpy as np
import pytest
from test_study_report import make_results

from pretune.study.stats import analyse, paired_diff, score_ci, seed_ci


def _run(arm, seed, score, flops=10.0, ex=None, size=16, task="t"):
    return {"task": task, "arm": arm, "size": size, "size_label": str(size), "seed": seed, "run_dir": "",
            "status": "completed", "score": float(score), "metrics": {},
            "example_scores": None if ex is None else list(ex),
            "cost": {"flops": flops, "wall_s": 1.0, "energy_j": 1.0, "co2_g": 0.0, "peak_mem_bytes": 1,
                     "energy_source": "nvml"}, "trainable_params": 1}


def _results(runs, target=None, chance=None, arms=None):
    return {"study": {}, "tasks": {"t": {"metric": "accuracy", "target": target, "chance": chance, "n_test": 500}},
            "arms": arms or {"scratch": {"init": "scratch", "method": "full"},
                             "full": {"init": "base", "method": "full"}},
            "stages": {"base": {"kind": "pretrain", "cost": {"flops": 1000.0}}}, "runs": runs}


def test_t_quantile_matches_the_tables():
    from pretune.study.stats import t_quantile

    for df, t in ((1, 12.706204736), (2, 4.302652730), (3, 3.182446305), (10, 2.228138852),
                  (2.5, 3.574654842), (None, 1.959963985)):
        assert t_quantile(0.975, df) == pytest.approx(t, rel=1e-6), df
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1.3, 4.7, 29.0, 400.0):
        assert t_quantile(0.975, df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-6)


def test_seed_interval_is_the_t_interval():
    vals = [0.70, 0.74, 0.69]
    ci = seed_ci(vals)
    half = 4.302652730 * np.std(vals, ddof=1) / np.sqrt(3)
    assert ci["lo"] == pytest.approx(np.mean(vals) - half) and ci["hi"] == pytest.approx(np.mean(vals) + half)
    assert ci["method"] == "seeds"
    d = paired_diff([{"seed": s, "score": v} for s, v in enumerate(vals)],
                    [{"seed": s, "score": 0.7} for s in range(3)], np.random.default_rng(0))
    assert d["lo"] == pytest.approx(np.mean(vals) - 0.7 - half)


def _false_positives(n_seeds, n_studies, rng, n_ex=None):
    """Share of studies in which two arms of the same quality differ 'significantly'."""
    hits = 0
    for i in range(n_studies):
        arms = []
        for _ in "ab":
            if n_ex is None:
                arms.append([{"seed": s, "score": 0.7 + 0.02 * rng.standard_normal()} for s in range(n_seeds)])
                continue
            runs = []
            for s in range(n_seeds):  # seed noise, then test-set noise
                ex = (rng.random(n_ex) < 0.7 + 0.03 * rng.standard_normal()).astype(float)
                runs.append({"seed": s, "score": ex.mean(), "example_scores": ex})
            arms.append(runs)
        hits += paired_diff(arms[0], arms[1], np.random.default_rng(i), n_boot=400)["significant"]
    return hits / n_studies


def test_few_seeds_are_not_overconfident():
    rng = np.random.default_rng(0)
    assert _false_positives(3, 400, rng) < 0.08  # nominal 5%; the seed bootstrap gave 28%
    assert _false_positives(3, 150, rng, n_ex=1000) < 0.08  # two-level: it gave 13%
    covered = 0
    for i in range(400):  # the score interval of one arm holds its true mean
        ci = seed_ci(0.7 + 0.02 * rng.standard_normal(3))
        covered += ci["lo"] <= 0.7 <= ci["hi"]
    assert covered / 400 > 0.92


def test_an_interval_touching_zero_is_not_significant():
    rng = np.random.default_rng(0)
    a, b = [], []
    for s in range(3):  # b gets one answer fewer right than a: a lump of resamples with no difference
        ex = (rng.random(40) < 0.5).astype(float)
        other = ex.copy()
        other[np.flatnonzero(ex == 1)[0]] = 0.0
        a.append({"seed": s, "score": float(ex.mean()), "example_scores": ex.tolist()})
        b.append({"seed": s, "score": float(other.mean()), "example_scores": other.tolist()})
    for n in (1, 3):
        for k in range(5):
            d = paired_diff(a[:n], b[:n], np.random.default_rng(k), 500)
            assert d["lo"] <= 0 and not d["significant"], (n, k, d)
    one = score_ci([{"score": 0.0, "example_scores": [0.0] * 30}], np.random.default_rng(0))
    assert one["lo"] == 0.0 and one["hi"] == 0.0


def test_not_distinguishable_is_kept_among_the_caveats():
    rng = np.random.default_rng(0)
    runs = []
    for s in range(3):
        ex = (rng.random(40) < 0.5).astype(float)
        other = ex.copy()
        other[np.flatnonzero(ex == 1)[0]] = 0.0
        runs += [_run("full", s, ex.mean(), 20.0, ex), _run("scratch", s, other.mean(), 10.0, other)]
    rec = analyse(_results(runs, chance=0.6))["recommendation"]
    row = rec["t"][0]
    assert any("most frequent" in c for c in row["caveats"])  # this row caveat comes first
    assert "full is not distinguishable from scratch" in " ".join(rec["caveats"])
    assert "3 seeds" in " ".join(rec["caveats"])  # three seeds: the few-seeds caveat as well


def test_amortisation_when_scratch_has_no_completed_runs():
    res = make_results()
    for r in res["runs"]:
        if r["task"] == "sentiment" and r["arm"] == "scratch":
            r["status"] = "failed"
    am = analyse(res, n_boot=200)["amortisation"]["sentiment"]
    for arm in ("full", "lora"):
        e = am["arms"][arm]
        assert e["break_even_tasks"] is None and "unknown" in e["break_even_reason"], e
        assert "scratch has no completed runs" in e["break_even_reason"]
        assert "only way" not in e["break_even_reason"]
    res = make_results()  # scratch failed at 256 alone: it may have reached the target there
    for r in res["runs"]:
        if r["task"] == "sentiment" and r["arm"] == "scratch" and r["size"] == 256:
            r["status"] = "failed"
    e = analyse(res, n_boot=200)["amortisation"]["sentiment"]["arms"]["full"]
    assert e["break_even_tasks"] is None and "256" in e["break_even_reason"], e
    full = analyse(make_results(), n_boot=200)["amortisation"]["sentiment"]["arms"]["full"]
    assert full["break_even_tasks"] == 1  # scratch ran everywhere and never reached the target


def test_size_to_target_is_the_smallest_size_reaching_it():
    runs = [_run("scratch", 0, 0.5, 100.0, size=64), _run("scratch", 0, 0.85, 99.0, size=256),
            _run("full", 0, 0.82, 100.0, size=64), _run("full", 0, 0.9, 99.0, size=256)]
    am = analyse(_results(runs, target=0.8))["amortisation"]["t"]
    assert am["arms"]["full"]["size_to_target"] == 64 and am["arms"]["full"]["cost_to_target"] == 100.0
    assert am["arms"]["scratch"]["size_to_target"] == 256


def test_few_shot_legend_shows_the_shots(monkeypatch):
    from pretune.study import plots

    rng = np.random.default_rng(0)
    runs = []
    for s in range(3):
        good, poor = (rng.random(40) < .7).astype(float), (rng.random(40) < .5).astype(float)
        runs += [_run("full", s, good.mean(), 20.0, good), _run("prompted", s, poor.mean(), 5.0, poor)]
    out = analyse(_results(runs, arms={"full": {"init": "base", "method": "full"},
                                       "prompted": {"init": "base", "method": "none", "shots": 4}}))
    monkeypatch.setattr(plots, "_finish", lambda fig, ax: ax.get_legend_handles_labels()[1])
    with plots.plot_style():
        labels = plots.plot_learning_curves(out, "t", plots.arm_styles(out))
    assert "prompted (4-shot)" in labels, labels


def test_stats_seed_is_a_study_key(tmp_path):
    from pretune.study.config import load_study

    (tmp_path / "a.jsonl").write_text("")
    path = tmp_path / "s.yaml"
    path.write_text(f"base: {{run: x}}\nstats_seed: 5\ntasks: {{t: {{train: {tmp_path / 'a.jsonl'}, "
                    f"test: {tmp_path / 'a.jsonl'}}}}}\n")
    assert load_study(str(path)).cfg.stats_seed == 5
    res = make_results()
    res["study"]["config"] = {"stats_seed": 5}
    assert analyse(res, n_boot=100)["stats"]["seed"] == 5


def test_a_t_interval_stays_within_the_range_of_the_example_scores():
    rng = np.random.default_rng(0)
    # three seeds of a 0/1 metric near its ceiling, seeds disagreeing: the t interval would pass 1
    runs = [{"score": float(np.mean(e)), "example_scores": list(e)} for e in
            ([1] * 40, [1] * 39 + [0], [1] * 30 + [0] * 10)]
    ci = score_ci(runs, rng)
    assert ci["method"] == "seeds+examples" and ci["hi"] == 1.0 and 0 < ci["lo"] < ci["mean"]
