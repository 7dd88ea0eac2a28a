"""Study statistics and report on synthetic results: intervals, comparisons, Pareto front,
amortisation, recommendation, and the three report files."""

from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest

from pretune.study.decide import break_even, fmt_flops, pareto_front
from pretune.study.report import clean_json, fmt_energy, write_report
from pretune.study.stats import analyse, bootstrap_means, find_comparison, score_ci, seed_ci

N_TEST, SIZES, SEEDS = 60, (16, 64, 256), (0, 1, 2)
PARAMS, LORA_PARAMS = 1_000_000, 20_000
# Mean accuracy by task, arm and size: full is clearly better than scratch; lora scores like full.
P = {"sentiment": {"scratch": (0.45, 0.55, 0.70), "full": (0.72, 0.85, 0.92), "zeroshot": 0.60},
     "topics": {"scratch": (0.30, 0.40, 0.55), "full": (0.50, 0.65, 0.80), "zeroshot": 0.35}}


def _cost(flops, rng, source="estimate"):
    wall = flops / 2e10 * (1 + 0.05 * rng.random())
    return {"flops": float(flops), "flops_trainable": float(flops) * 0.9, "flops_frozen": float(flops) * 0.1,
            "wall_s": wall, "tokens": int(flops / 6e6), "target_tokens": int(flops / 2.4e7),
            "peak_mem_bytes": int(3e8 + 1e7 * rng.random()), "energy_j": 80.0 * wall,
            "energy_source": source, "co2_g": 80.0 * wall / 3.6e6 * 400}


def _scores(p, seed, rng):
    """N_TEST 0/1 scores with an exact number of ones (round(p*N) +- 1 by seed)."""
    k = int(round(p * N_TEST)) + (seed - 1)
    x = np.zeros(N_TEST)
    x[rng.permutation(N_TEST)[:k]] = 1.0
    return x


def make_results() -> dict:
    rng = np.random.default_rng(1234)
    arms = {"scratch": {"init": "scratch", "method": "full", "replay": False, "l2sp": 0.0, "shots": None,
                        "description": "train from scratch on the task"},
            "full": {"init": "base", "method": "full", "replay": False, "l2sp": 0.0, "shots": None,
                     "description": "fine-tune all weights of the base"},
            "lora": {"init": "base", "method": "lora", "replay": False, "l2sp": 0.0, "shots": None,
                     "description": "LoRA adapters on the base"},
            "zeroshot": {"init": "base", "method": "none", "replay": False, "l2sp": 0.0, "shots": 0,
                         "description": "the base, prompted"}}
    tasks = {"sentiment": {"task": "classification", "metric": "accuracy", "target": 0.8, "chance": 0.5,
                           "n_train": 256, "n_test": N_TEST},
             "topics": {"task": "classification", "metric": "accuracy", "target": None, "chance": 0.25,
                        "n_train": 256, "n_test": N_TEST}}
    runs = []

    def run(task, arm, size, seed, ex, flops, trainable, forgetting, bias_change):
        score = float(ex.mean())
        runs.append({"task": task, "arm": arm, "size": size, "size_label": "all (256)" if size == 256 else str(size),
                     "seed": seed, "run_dir": f"runs/{task}/{arm}/n{size}/s{seed}", "status": "completed",
                     "score": score, "metrics": {"accuracy": score, "macro_f1": score - 0.02},
                     "example_scores": ex.tolist(), "cost": _cost(flops, rng), "params": PARAMS,
                     "trainable_params": trainable, "steps": size, "general_bpb": None if forgetting is None
                     else 1.2 + forgetting, "forgetting": forgetting, "bias": None if bias_change is None
                     else 0.55 + bias_change, "bias_change": bias_change})

    for task, p in P.items():
        for i, size in enumerate(SIZES):
            ft_flops = 6 * PARAMS * 64 * 8 * size  # 64 tokens, 8 epochs
            for seed in SEEDS:
                run(task, "scratch", size, seed, _scores(p["scratch"][i], seed, rng), ft_flops, PARAMS,
                    None, None)
                full = _scores(p["full"][i], seed, rng)
                run(task, "full", size, seed, full, ft_flops, PARAMS, 0.05 * (i + 1) + 0.01 * seed,
                    0.02 + 0.005 * seed)
                lora = full.copy()  # the same accuracy, two examples swapped: indistinguishable from full
                lora[np.flatnonzero(full == 1)[0]], lora[np.flatnonzero(full == 0)[0]] = 0.0, 1.0
                run(task, "lora", size, seed, lora, ft_flops * 0.68, LORA_PARAMS, 0.01 + 0.002 * seed,
                    -0.01 + 0.01 * seed)
        run(task, "zeroshot", 0, 0, _scores(p["zeroshot"], 1, rng), 2 * PARAMS * 64 * N_TEST, 0, 0.0, 0.0)
    runs.append({k: runs[0][k] for k in ("task", "arm", "size", "size_label", "run_dir")}
                | {"seed": 7, "status": "failed"})  # a failed run, as the runner records it
    runs.append(dict(runs[1], seed=8, score=float("nan")))  # a score that is not a number: left out too
    runs[2]["cost"] = dict(runs[2]["cost"], energy_j=None, co2_g=None)  # a figure the meter could not give
    base_cost = _cost(1e14, rng)
    return {"study": {"name": "synthetic", "created": "2026-01-01T00:00:00", "pretune_version": "0.1.0",
                      "device": "cpu (synthetic)", "wall_s": 1234.5, "config": {"stats_seed": 0}},
            "tasks": tasks, "arms": arms,
            "stages": {"base": {"run_dir": "base", "kind": "pretrain", "cost": base_cost,
                                "general_bpb": 1.2, "bias": 0.55}},
            "runs": runs}


@pytest.fixture(scope="module")
def analysed():
    return analyse(make_results())


def _cells(res):
    for task, arms in res["summary"].items():
        for arm, sizes in arms.items():
            for size, cell in sizes.items():
                yield task, arm, size, cell


def test_intervals_contain_mean_and_shrink(analysed):
    for _, _, _, cell in _cells(analysed):
        ci = cell["score"]
        assert ci["lo"] <= ci["mean"] <= ci["hi"]
        assert ci["n"] == len(ci["values"]) == cell["n_seeds"]
    s = analysed["summary"]["sentiment"]
    assert s["full"]["64"]["n_seeds"] == 3 and s["zeroshot"]["0"]["n_seeds"] == 1
    assert s["full"]["64"]["score"]["mean"] == pytest.approx(0.85, abs=1e-9)
    assert s["scratch"]["16"]["n_failed"] == 1 and s["full"]["16"]["n_failed"] == 1  # counted, not used
    assert s["full"]["16"]["energy_j"]["n"] == 3 and s["lora"]["16"]["energy_j"]["n"] == 2
    rng = np.random.default_rng(0)
    x = (rng.random((3, 600)) < 0.7).astype(float)

    def width(ci):
        return ci["hi"] - ci["lo"]
    runs = [{"score": float(r.mean()), "example_scores": r} for r in x[:, :60]]
    more = [{"score": float(r.mean()), "example_scores": r} for r in x]
    assert width(score_ci(more, np.random.default_rng(1))) < 0.5 * width(score_ci(runs, np.random.default_rng(1)))
    big = (rng.random((3, 800)) < 0.6).astype(float)  # the normal limit matches exact resampling
    exact = np.percentile(bootstrap_means(big, np.random.default_rng(4), exact_max=10**6), [2.5, 97.5])
    approx = np.percentile(bootstrap_means(big, np.random.default_rng(4)), [2.5, 97.5])
    assert np.allclose(exact, approx, atol=0.006)
    vals = rng.normal(0.7, 0.05, 40)
    assert width(seed_ci(vals)) < width(seed_ci(vals[:4]))
    one = seed_ci([0.5])  # one seed, no example scores: unknown interval
    assert one["mean"] == 0.5 and one["lo"] is None and one["hi"] is None
    # the two-level bootstrap is wider than the example-only one when seeds disagree
    seedy = np.vstack([np.ones(60) * 0.4, np.ones(60) * 0.9])
    assert np.std(bootstrap_means(seedy, np.random.default_rng(0))) > 0.1


def test_comparisons(analysed):
    better = find_comparison(analysed, "sentiment", 64, "full", "scratch")
    assert better["significant"] and better["diff"] == pytest.approx(0.30) and better["n_pairs"] == 3
    assert better["lo"] > 0
    same = find_comparison(analysed, "sentiment", 64, "lora", "full")
    assert not same["significant"] and same["lo"] < 0 < same["hi"] and same["diff"] == pytest.approx(0)
    flipped = find_comparison(analysed, "sentiment", 64, "scratch", "full")
    assert flipped["diff"] == pytest.approx(-0.30) and flipped["hi"] < 0
    zs = find_comparison(analysed, "sentiment", 256, "full", "zeroshot")  # one zero-shot run, paired with all
    assert zs["paired_by"] == "broadcast" and zs["n_pairs"] == 3 and zs["significant"]
    for c in analysed["comparisons"]:  # every pair appears once per task and size
        others = [d for d in analysed["comparisons"] if (d["task"], d["size"]) == (c["task"], c["size"])
                  and {d["a"], d["b"]} == {c["a"], c["b"]}]
        assert len(others) == 1


def test_recommendation_cheapest_reaching_target_with_overlap_caveat(analysed):
    rows = {r["size"]: r for r in analysed["recommendation"]["sentiment"]}
    assert [r["size"] for r in analysed["recommendation"]["sentiment"]] == [16, 64, 256]
    assert rows[64]["arm"] == "lora" and rows[64]["reaches_target"] is True  # as good as full, cheaper
    assert "full" in rows[64]["indistinguishable_from"] and "scratch" not in rows[64]["indistinguishable_from"]
    assert any("lora is not distinguishable from full" in c for c in analysed["recommendation"]["caveats"])
    assert rows[16]["reaches_target"] is False and "no arm reaches the target" in rows[16]["text"]
    assert rows[16]["arm"] == "lora"  # none reaches it: the best score, and the cheaper of equal scores
    topics = analysed["recommendation"]["topics"]
    assert all(r["reaches_target"] is None for r in topics)  # no target: best-scoring arm
    cav = " ".join(analysed["recommendation"]["caveats"])
    assert "small test set" in cav and "estimate" in cav and "no target" in cav
    assert "full forgets general text" in cav and "lora forgets" not in cav  # full: +0.11, +0.16 bpb
    assert "full changes the bias score" in cav and "lora changes the bias" not in cav


def one_run(arm, size, score, flops):
    """A run of task "t" with one seed and the given score and FLOPs (no per-example scores)."""
    return {"task": "t", "arm": arm, "size": size, "size_label": str(size), "seed": 0, "run_dir": "",
            "status": "completed", "score": score, "metrics": {}, "example_scores": None,
            "cost": {"flops": flops, "wall_s": 1.0, "energy_j": 1.0, "co2_g": 0.0,
                     "peak_mem_bytes": 1, "energy_source": "nvml"}, "trainable_params": 1}


def test_break_even_hand_computed():
    # pre-training 1000, fine-tuning 10 per task, scratch 100 per task: 1000 + 10K < 100K from K = 12
    assert break_even(1000.0, 10.0, 100.0) == (12, "")
    assert break_even(900.0, 10.0, 100.0)[0] == 11  # 900 + 10*10 = 1000 is not < 1000
    assert break_even(1000.0, None, 100.0)[0] is None
    assert break_even(1000.0, 10.0, None)[0] == 1  # scratch never reaches the target
    assert break_even(1000.0, 100.0, 100.0)[0] is None  # not cheaper per task
    assert break_even(None, 10.0, 100.0)[0] is None  # base cost unknown

    res = {"study": {}, "tasks": {"t": {"metric": "acc", "target": 0.8, "n_test": 500}},
           "arms": {"scratch": {"init": "scratch", "method": "full"}, "lora": {"init": "base", "method": "lora"}},
           "stages": {"base": {"kind": "pretrain", "cost": {"flops": 1000.0}}},
           "runs": [one_run("scratch", 10, 0.5, 20.0), one_run("scratch", 100, 0.85, 100.0),
                    one_run("lora", 10, 0.81, 10.0), one_run("lora", 100, 0.9, 50.0)]}
    am = analyse(res)["amortisation"]["t"]
    assert am["arms"]["lora"]["cost_to_target"] == 10.0 and am["arms"]["lora"]["size_to_target"] == 10
    assert am["arms"]["scratch"]["cost_to_target"] == 100.0
    assert am["arms"]["lora"]["break_even_tasks"] == 12
    assert am["curve"]["lora"][11] == 1000 + 12 * 10 and am["curve"]["scratch"][11] == 1200
    res["stages"]["base"] = {"kind": "existing", "cost": None}
    am = analyse(res)["amortisation"]["t"]
    assert am["arms"]["lora"]["break_even_tasks"] is None and "unknown" in am["arms"]["lora"]["break_even_reason"]
    rec = analyse(res)["recommendation"]
    assert rec["t"][0]["arm"] == "lora" and rec["t"][0]["lo"] is None  # one seed: interval unknown


def test_amortisation_on_synthetic(analysed):
    am = analysed["amortisation"]["sentiment"]  # scratch never reaches 0.8: pre-training is the only way
    assert am["arms"]["scratch"]["cost_to_target"] is None and am["arms"]["lora"]["break_even_tasks"] == 1
    topics = analysed["amortisation"]["topics"]  # no target: the best scratch mean
    assert topics["target_source"] == "scratch_best" and topics["target"] == pytest.approx(0.55)
    e, s = topics["arms"]["lora"], topics["arms"]["scratch"]
    assert e["size_to_target"] == 64 and s["size_to_target"] == 256
    expect = math.floor(1e14 / (s["cost_to_target"] - e["cost_to_target"])) + 1
    assert e["break_even_tasks"] == expect


def test_pareto_front_hand_made():
    pts = [{"n": "a", "score": 0.5, "flops": 1}, {"n": "b", "score": 0.7, "flops": 2},
           {"n": "c", "score": 0.6, "flops": 3}, {"n": "d", "score": 0.7, "flops": 2.5},
           {"n": "e", "score": 0.9, "flops": 10}, {"n": "f", "score": 0.9, "flops": 12},
           {"n": "g", "score": 0.4, "flops": 1}, {"n": "h", "score": float("nan"), "flops": 0.1}]
    assert [p["n"] for p in pareto_front(pts)] == ["a", "b", "e"]


def test_analyse_is_pure_and_deterministic():
    raw = make_results()
    before = copy.deepcopy(raw)
    a, b = analyse(raw, n_boot=300), analyse(copy.deepcopy(raw), n_boot=300)
    assert json.dumps(clean_json(a)) == json.dumps(clean_json(b))
    assert json.dumps(clean_json(raw)) == json.dumps(clean_json(before))  # the input is left alone
    shuffled = copy.deepcopy(raw)
    shuffled["runs"].reverse()  # the order of runs does not matter
    assert clean_json(analyse(shuffled, n_boot=300)["summary"]) == clean_json(a["summary"])
    raw["study"]["stats_seed"] = 5  # another seed moves the intervals a little, not the means
    c = analyse(raw, n_boot=300)["summary"]["sentiment"]["full"]["64"]["score"]
    d = a["summary"]["sentiment"]["full"]["64"]["score"]
    assert c["mean"] == d["mean"] and c["lo"] != d["lo"] and abs(c["lo"] - d["lo"]) < 0.05


def test_write_report(analysed, tmp_path):
    paths = write_report(analysed, tmp_path / "rep")
    names = ("report.html", "report.md", "results.json")
    assert all(paths[k].is_file() and paths[k].parent == tmp_path / "rep" for k in names)
    page = paths["report.html"].read_text()
    assert page.count('src="data:image/png;base64,') == 8  # 4 plots x 2 tasks
    assert not re.search(r"https?://|<link|<script|src=\"(?!data:)", page)
    assert "Recommendation" in page and "not distinguishable" in page and "Stage costs" in page
    md = paths["report.md"].read_text()
    links = re.findall(r"\]\((report_files/[^)]+\.png)\)", md)
    assert len(links) == 8 and all((tmp_path / "rep" / link).is_file() for link in links)
    for link in links:
        assert (tmp_path / "rep" / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = paths["results.json"].read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert loaded == clean_json(analysed)
    assert [r["score"] for r in loaded["runs"] if r["seed"] == 8] == [None]  # NaN written as null
    stale = tmp_path / "rep" / "report_files" / "renamed-task_curves.png"  # a task no longer in the study
    stale.write_bytes(b"old")
    write_report(analysed, tmp_path / "rep")
    assert not stale.exists() and len(list((tmp_path / "rep" / "report_files").glob("*.png"))) == 8


def test_report_text_is_deterministic(analysed, monkeypatch):
    from pretune.study import report

    for name in ("plot_learning_curves", "plot_cost_quality", "plot_forgetting", "plot_amortisation"):
        monkeypatch.setattr(report, name, lambda *a, **k: b"png")  # the text alone, quickly
    first = report.render_markdown(report._blocks(analysed)[0], "files")
    again = report.render_markdown(report._blocks(copy.deepcopy(analysed))[0], "files")
    assert first == again
    assert "| arm | seeds | score [95% CI] | Δ vs scratch |" in first
    full_vs_scratch = [line for line in first.splitlines() if line.startswith("| full | 3 |")]
    assert full_vs_scratch and all(line.split(" | ")[3].endswith("*") for line in full_vs_scratch)
    same = [line for line in first.splitlines() if line.startswith(("| 64 | full | lora |", "| 64 | lora | full |"))]
    assert len(same) == 2 and all("| no |" in line for line in same)  # one row per task, not significant


def test_formatting():
    assert fmt_flops(1.234e12) == "1.2e12" and fmt_flops(5e-3) == "5.0e-3"
    assert fmt_energy(512.0) == "512.0 J" and fmt_energy(12_345.0, "nvml") == "12.3 kJ (nvml)"


def test_recommendation_says_when_the_best_is_no_better_than_the_majority_label_or_zero():
    res = make_results()
    res["tasks"]["sentiment"].update(chance=0.95, target=0.5)  # a test set of one label, nearly
    for r in res["runs"]:
        if r["task"] == "topics" and r.get("status") == "completed":
            r["score"], r["example_scores"] = 0.0, [0.0] * N_TEST
    rec = analyse(res)["recommendation"]
    cav = " ".join(rec["caveats"])
    assert "sentiment: always answering the most frequent test label scores 0.950" in cav
    assert all("no better than always answering the most frequent test label" in r["text"]
               for r in rec["sentiment"])
    assert all("no arm scores above 0" in r["text"] for r in rec["topics"]) and "every arm scores 0" in cav
    plain = analyse(make_results())["recommendation"]  # the usual case says none of it
    assert not any("most frequent" in r["text"] or "above 0" in r["text"] for r in plain["sentiment"] + plain["topics"])


def test_a_recommended_cpt_arm_names_its_continued_pre_training_cost():
    """The recommendation compares per-task costs; an arm that starts from the continued-pre-trained
    model also needs that stage, paid once: the sentence says so."""
    res = {"study": {}, "tasks": {"t": {"metric": "acc", "target": 0.8, "n_test": 500}},
           "arms": {"scratch": {"init": "scratch", "method": "full"}, "cpt+lora": {"init": "cpt", "method": "lora"}},
           "stages": {"base": {"kind": "pretrain", "cost": {"flops": 1000.0}},
                      "cpt": {"kind": "cpt", "cost": {"flops": 3.3e10}}},
           "runs": [one_run("scratch", 10, 0.85, 100.0), one_run("cpt+lora", 10, 0.81, 10.0)]}
    text = analyse(res)["recommendation"]["t"][0]["text"]
    assert "cpt+lora reaches the target" in text and "continued pre-training of 3.3e10 FLOPs paid once" in text, text
