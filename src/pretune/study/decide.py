"""Decisions from a study's statistics: Pareto front, amortisation over tasks, recommendation.

The second half of `pretune.study.stats.analyse`: from the summary and the paired comparisons it
adds "pareto" (the cost-quality front of each task, fine-tuning FLOPs only), "amortisation" (the
cost of reaching a target score, and the break-even K*: the number of tasks from which pre-training
once costs less than training from scratch every time) and "recommendation" (per data size, the
cheapest arm that reaches the target, else the best one, in words, with the caveats the numbers
raise). The number formats shared with the report (`fmt_flops`, `fmt_score`) live here, the lowest
module that writes numbers into text.
"""

from __future__ import annotations

import math

from pretune.study.stats import (NOTES, candidates, context_sizes, excludes_zero, find_comparison, finite,
                                 is_inference, scratch_arm)

FEW_SEEDS = 3  # this many seeds or fewer: caveat
SMALL_TEST = 100  # fewer test examples than this: caveat
FORGETTING_BPB = 0.1  # forgetting above this many bits per byte: caveat
K_MAX = 100  # tasks on the amortisation curve


# ----------------------------------------------------------------------------------- formatting
def fmt_flops(x) -> str:
    """1.2e12 style."""
    if x is None:
        return "n/a"
    if x == 0:
        return "0"
    mant, exp = f"{x:.1e}".split("e")
    return f"{mant}e{int(exp)}"


def fmt_score(x) -> str:
    return "n/a" if x is None else f"{x:.3f}" if abs(x) < 10 else f"{x:.4g}"


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


# ----------------------------------------------------------------------------------- cost and quality
def pareto_front(points: list[dict]) -> list[dict]:
    """Points that no other point dominates (>= score and <= flops, one strict), by rising flops."""
    pts = [p for p in points if finite(p.get("score")) and finite(p.get("flops"))]
    front = [p for p in pts if not any(
        q["score"] >= p["score"] and q["flops"] <= p["flops"]
        and (q["score"] > p["score"] or q["flops"] < p["flops"]) for q in pts)]
    return sorted(front, key=lambda p: (p["flops"], -p["score"]))


def pareto_fronts(results: dict) -> dict[str, list[dict]]:
    """The Pareto front of every task over its (arm, size) cells: mean score and fine-tuning FLOPs."""
    return {task: pareto_front([
        {"arm": arm, "size": int(s), "score": c["score"]["mean"], "flops": c["flops"]["mean"]}
        for arm, by_size in arms.items() for s, c in by_size.items()])
        for task, arms in results["summary"].items()}


def break_even(upfront: float | None, per_task: float | None,
               scratch_per_task: float | None) -> tuple[int | None, str]:
    """Smallest K >= 1 with upfront + K * per_task < K * scratch_per_task, and the reason if none.

    Returns 1 when scratch never reaches the target (pre-training is the only way), None when the
    arm never reaches it, is not cheaper per task (said so even when the upfront cost is unknown:
    it never breaks even whatever that cost), or the upfront cost is unknown. (When
    scratch has no completed runs at some size, `amortisation` does not call it: K* is unknown.)
    """
    if per_task is None:
        return None, "never reaches the target"
    if scratch_per_task is None:
        return 1, "training from scratch never reaches the target: pre-training is the only way"
    if per_task >= scratch_per_task:  # whatever the base cost: knowing it would give no K*
        return None, "not cheaper per task than training from scratch: never breaks even"
    if upfront is None:
        return None, "the cost of the base model is unknown (it was not trained by this study)"
    return max(1, math.floor(upfront / (scratch_per_task - per_task)) + 1), ""


def _cost_of(stage: dict | None) -> float | None:
    cost = (stage or {}).get("cost")
    return float(cost["flops"]) if cost and finite(cost.get("flops")) else None


def amortisation(results, task):
    summary, arms = results["summary"][task], results.get("arms", {})
    stages = results.get("stages") or {}
    base, cpt = stages.get("base"), stages.get("cpt")
    base_known = bool(base) and base.get("kind") != "existing" and _cost_of(base) is not None
    scratch = scratch_arm(results)
    target = results.get("tasks", {}).get(task, {}).get("target")
    source = "task"
    if target is None:
        best = [c["score"]["mean"] for c in summary.get(scratch, {}).values()] if scratch else []
        target, source = (max(best), "scratch_best") if best else (None, None)
    out = {"target": target, "target_source": source,
           "pretrain": {"base": (base or {}).get("cost"), "cpt": (cpt or {}).get("cost"),
                        "base_known": base_known},
           "arms": {}, "curve": {"K": list(range(1, K_MAX + 1))}, "note": NOTES["amortisation"]}
    if not base_known:
        out["note"] += (" The base model was not trained by this study, so its cost is unknown: "
                        "break-even is not computed and the curves leave the base out.")
    if target is None:
        out["note"] += " No target and no completed scratch run: nothing to amortise."
        return out

    def to_target(arm):
        """(FLOPs, size) of the smallest data size whose mean score reaches the target."""
        ok = sorted((int(s), c["flops"]["mean"]) for s, c in summary.get(arm, {}).items()
                    if c["score"]["mean"] >= target - 1e-12 and c["flops"]["mean"] is not None)
        return (ok[0][1], ok[0][0]) if ok else (None, None)

    scratch_cost, scratch_size = to_target(scratch) if scratch in summary else (None, None)
    # sizes at which scratch ran but no run completed: it may have reached the target there
    ran = {int(r["size"]) for r in results.get("runs", []) if r["task"] == task and r["arm"] == scratch}
    missing = sorted(ran - {int(s) for s in summary.get(scratch, {})})
    unknown = None
    if scratch is not None and scratch not in summary:
        unknown = "break-even unknown: scratch has no completed runs"
    elif scratch_cost is None and missing:
        unknown = ("break-even unknown: scratch has no completed runs at n=" + ", ".join(map(str, missing))
                   + ", where it might reach the target")
    out["scratch_unknown"] = unknown
    for arm in summary:
        init = arms.get(arm, {}).get("init", "base")
        base_flops, cpt_flops = (_cost_of(base) if base_known else None), _cost_of(cpt)
        known_part = {"scratch": 0.0, "base": 0.0, "cpt": cpt_flops or 0.0}.get(init, 0.0)
        upfront = {"scratch": 0.0, "base": base_flops,
                   "cpt": None if base_flops is None or cpt_flops is None else base_flops + cpt_flops
                   }.get(init, base_flops)
        per_task, size = to_target(arm)
        if arm == scratch:
            k, reason = None, "the reference"
        elif scratch is None:
            k, reason = None, "no scratch arm to compare with"
        elif unknown and per_task is not None:
            k, reason = None, unknown
        else:
            k, reason = break_even(upfront, per_task, scratch_cost)
            if missing and scratch_size is not None and missing[0] < scratch_size:
                reason += (("; " if reason else "") + f"scratch has no completed runs at n={missing[0]}, "
                           "where it might cost less")
        entry = {"init": init, "upfront_flops": upfront, "cost_to_target": per_task,
                 "size_to_target": size, "break_even_tasks": k, "break_even_reason": reason}
        if init == "cpt" and not base_known and arm != scratch and scratch is not None and not unknown:
            k_cpt = break_even(cpt_flops, per_task, scratch_cost)[0]
            entry["break_even_tasks_cpt_only"] = k_cpt
            if k_cpt is not None:
                entry["break_even_reason"] += f"; counting the continued pre-training alone, K* = {k_cpt}"
        out["arms"][arm] = entry
        first = upfront if upfront is not None else known_part
        out["curve"][arm] = None if per_task is None else [first + k_ * per_task for k_ in out["curve"]["K"]]
    return out


# ----------------------------------------------------------------------------------- recommendation
def distinguishable(results: dict, task: str, size: int, a: str, b: str) -> bool:
    """True only when the paired interval (else the two intervals) leaves no doubt."""
    c = find_comparison(results, task, size, a, b)
    if c is not None and c["lo"] is not None:
        return c["significant"]
    cells = results["summary"][task]
    ca = cells[a][str(candidates(results, task, size)[a])]["score"]
    cb = cells[b][str(candidates(results, task, size)[b])]["score"]
    if ca["lo"] is None or cb["lo"] is None:
        return False
    return excludes_zero({"lo": ca["lo"] - cb["hi"], "hi": ca["hi"] - cb["lo"]})


def _cost_key(cell: dict) -> float:
    """FLOPs of a cell for ranking; unknown costs rank last."""
    f = cell["flops"]["mean"]
    return f if f is not None else math.inf


def _arm_caveats(task: str, arms: dict) -> list[str]:
    """Forgetting above FORGETTING_BPB and bias changes whose interval excludes 0, per arm."""
    out = []
    for arm, cells in arms.items():
        order = sorted(cells, key=int)
        forgot = [(cells[s]["size_label"], cells[s]["forgetting"]["mean"]) for s in order
                  if cells[s].get("forgetting") and (cells[s]["forgetting"]["mean"] or 0) > FORGETTING_BPB]
        if forgot:
            out.append(f"{task}: {arm} forgets general text: " + ", ".join(
                f"+{v:.3f}" for _, v in forgot) + " bits per byte on held-out general text at "
                + ", ".join(lab for lab, _ in forgot) + " examples.")
        biased = [(cells[s]["size_label"], cells[s]["bias_change"]) for s in order
                  if excludes_zero(cells[s].get("bias_change"))]
        if biased:
            out.append(f"{task}: {arm} changes the bias score (share of pairs where the model prefers the "
                       "stereotypical sentence) beyond noise: " + ", ".join(
                           f"{b['mean']:+.3f} [{b['lo']:+.3f}, {b['hi']:+.3f}] at {lab}" for lab, b in biased)
                       + " examples.")
    return out


def recommendation(results):
    rec: dict = {}
    caveats: list[str] = []
    any_estimate = any("estimate" in str((r.get("cost") or {}).get("energy_source", ""))
                       for r in results.get("runs", []))
    cpt_flops = _cost_of((results.get("stages") or {}).get("cpt"))  # paid once, before every cpt arm
    for task, arms in results["summary"].items():
        spec = results.get("tasks", {}).get(task, {})
        target = spec.get("target")
        rows = []
        seeds = [c["n_seeds"] for a, cs in arms.items() if not is_inference(results, a) for c in cs.values()]
        if seeds and min(seeds) == 1:
            caveats.append(f"{task}: only 1 seed for some arms: the intervals mostly reflect test-set "
                           "noise, not the variation between training runs.")
        elif seeds and min(seeds) <= FEW_SEEDS:
            caveats.append(f"{task}: only {min(seeds)} seeds for some arms: the variation between training "
                           f"runs is estimated from {min(seeds)} runs, so the intervals are wide (Student's t "
                           f"with {min(seeds) - 1} degree(s) of freedom where the seeds dominate the uncertainty, "
                           "more where the test set does, counted from an 80% upper bound of the seed "
                           "variance) and small differences cannot be resolved.")
        if spec.get("n_test") is not None and spec["n_test"] < SMALL_TEST:
            caveats.append(f"{task}: small test set ({spec['n_test']} examples): intervals are wide "
                           "and small differences cannot be resolved.")
        if target is None:
            caveats.append(f"{task}: no target score was given; the recommendation is the best-scoring "
                           "arm, and the amortisation uses as target the best mean score of the "
                           "scratch arm.")
        n_failed = sum(1 for r in results.get("runs", []) if r["task"] == task
                       and (r.get("status") == "failed" or not finite(r.get("score"))))
        if n_failed:
            caveats.append(f"{task}: {n_failed} run(s) failed and are left out.")
        if spec.get("chance") is not None and target is not None and spec["chance"] >= target - 1e-12:
            caveats.append(f"{task}: always answering the most frequent test label scores {_fmt(spec['chance'])}, "
                           f"which already reaches the target {_fmt(target)}: the target does not tell the arms "
                           "apart; raise it or use macro-F1.")
        for size in context_sizes(results, task):
            cand = candidates(results, task, size)
            cell = {a: arms[a][str(s)] for a, s in cand.items()}
            reach = [a for a in cand if target is not None and cell[a]["score"]["mean"] >= target - 1e-12]
            if reach:
                pick = min(reach, key=lambda a: (_cost_key(cell[a]), -cell[a]["score"]["mean"]))
            else:  # the best score; between equal scores the cheaper arm
                pick = max(cand, key=lambda a: (cell[a]["score"]["mean"], -_cost_key(cell[a])))
            others = sorted((a for a in cand if a != pick), key=lambda a: -cell[a]["score"]["mean"])
            same = [a for a in others if not distinguishable(results, task, size, pick, a)]
            c = cell[pick]
            sc, label = c["score"], c["size_label"]
            size_label = next((arms[a][str(size)]["size_label"] for a in cand if cand[a] == size), str(size))
            size_label = "no" if size == 0 else size_label
            interval = f"{_fmt(sc['mean'])} [{_fmt(sc['lo'])}, {_fmt(sc['hi'])}]" if sc["lo"] is not None \
                else f"{_fmt(sc['mean'])} (interval unknown)"
            flops = c["flops"]["mean"]
            if reach:
                text = (f"With {size_label} labelled examples, {pick} reaches the target {_fmt(target)} at "
                        f"the lowest cost: score {interval}, {fmt_flops(flops)} FLOPs.")
                if (results.get("arms", {}).get(pick) or {}).get("init") == "cpt" and cpt_flops is not None:
                    # the cost compared is per task: the continued pre-training before it is paid once
                    text = text[:-1] + (f" per task, after a continued pre-training of {fmt_flops(cpt_flops)} "
                                        "FLOPs paid once for all tasks.")
            elif target is not None:
                text = (f"With {size_label} labelled examples no arm reaches the target {_fmt(target)}; "
                        f"the best is {pick}: score {interval}.")
            else:
                text = f"With {size_label} labelled examples, {pick} has the highest mean score: {interval}."
            row_cav = []
            chance = spec.get("chance")
            if sc["mean"] <= 1e-12:
                text = text[:-1] + " — but no arm scores above 0, so this size says nothing about the arms."
                row_cav.append(f"{task}, {size_label} examples: every arm scores 0.")
            elif chance is not None and sc["mean"] <= chance + 1e-12:
                text = text[:-1] + (f" — no better than always answering the most frequent test label "
                                    f"({_fmt(chance)}).")
                row_cav.append(f"{task}, {size_label} examples: the best arm is no better than always answering "
                               f"the most frequent test label ({_fmt(chance)}).")
            alike = None
            if same:
                alike = (f"{task}, {size_label} examples: {pick} is not distinguishable from "
                         f"{', '.join(same)} at this size.")
                row_cav.append(alike)
                text = text[:-1] + f" (not distinguishable from {', '.join(same)})."
            f = c.get("forgetting")
            if f and f["mean"] is not None and f["mean"] > FORGETTING_BPB:
                row_cav.append(f"{task}, {size_label} examples: {pick} forgets general text "
                               f"(+{f['mean']:.3f} bits per byte on held-out general text).")
            b = c.get("bias_change")
            if excludes_zero(b):
                row_cav.append(f"{task}, {size_label} examples: {pick} changes the bias score by "
                               f"{b['mean']:+.3f} [{b['lo']:+.3f}, {b['hi']:+.3f}] (share preferring "
                               "the stereotypical sentence).")
            caveats.extend(c for c in row_cav if "scores 0" in c or "most frequent" in c)
            caveats.extend([alike] if alike else [])  # forgetting and bias: once per arm, below
            rows.append({"size": size, "size_label": size_label, "arm": pick, "arm_size": cand[pick],
                         "arm_size_label": label, "score": sc["mean"], "lo": sc["lo"], "hi": sc["hi"],
                         "flops": flops, "target": target,
                         "reaches_target": bool(reach) if target is not None else None,
                         "runner_up": others[0] if others else None, "indistinguishable_from": same,
                         "text": text, "caveats": row_cav})
        rec[task] = rows
        caveats.extend(_arm_caveats(task, arms))
    stages = results.get("stages") or {}
    if (stages.get("base") or {}).get("kind") == "existing":
        caveats.append("The base model was given, not trained by this study: its pre-training cost "
                       "is unknown and break-even is not computed.")
    if any_estimate or any("estimate" in str(((s or {}).get("cost") or {}).get("energy_source", ""))
                           for s in stages.values()):
        caveats.append("Energy (and CO2) is an estimate from assumed power draw and time, not a "
                       "measurement, for runs marked 'estimate'.")
    skipped = max((s or {}).get("bias_skipped") or 0 for s in stages.values()) if stages else 0
    if skipped:
        caveats.append(f"Bias: {skipped} pair(s) are longer than the model's context, even in a window that "
                       "keeps the words that differ; they are left out of every bias score.")
    rec["caveats"] = list(dict.fromkeys(caveats))
    return rec
