"""Statistics of a study: intervals, paired comparisons, Pareto front, amortisation, recommendation.

`analyse(results)` is pure and deterministic: it returns a deep copy of `results` with keys added,
and every random draw comes from numpy generators seeded by `results["study"]["stats_seed"]` (else
`results["study"]["config"]["stats_seed"]`, else 0) and by the name of what is being resampled, so
the numbers do not depend on the order of runs.

Input (what the study runner collects)::

    results = {
      "study": {"name": str, "created": ISO time, "pretune_version": str, "device": str,
                "wall_s": float, "config": {...resolved study config as plain data...},
                "stats_seed": int (optional)},
      "tasks": {TASK: {"task": "classification"|"instruction"|"text2text",
                       "metric": str (primary metric, higher is better),
                       "target": float|None (the score the team needs), "chance": float|None,
                       "n_train": int, "n_test": int}},
      "arms": {ARM: {"init": "base"|"cpt"|"scratch", "method": "full"|"freeze"|"lora"|"none",
                     "replay": bool, "l2sp": float, "shots": int|None, "description": str}},
              # method "none": no training (zero-shot when shots is 0, few-shot when k > 0)
      "stages": {"base": {"run_dir": str, "kind": "pretrain"|"existing", "cost": COST|None,
                          "general_bpb": float|None, "bias": float|None},
                 "cpt": {...same, kind "cpt"; its cost is the continued pre-training alone}},
      "runs": [{"task": TASK, "arm": ARM, "size": int (labelled examples; 0 for zero-shot),
                "size_label": str, "seed": int, "run_dir": str,
                "status": "completed"|"early_stopped"|"failed",
                "score": float, "metrics": {name: float},
                "example_scores": [float, ...]|None (per test example, same order for every run
                                  of a task, so runs pair example by example),
                "cost": COST, "params": int, "trainable_params": int, "steps": int,
                "general_bpb": float|None, "forgetting": float|None (minus the starting model's),
                "bias": float|None, "bias_change": float|None}, ...]}
    COST = {"flops", "flops_trainable", "flops_frozen", "wall_s", "tokens", "target_tokens",
            "peak_mem_bytes", "energy_j", "energy_source", "co2_g"}

Failed runs (or runs without a finite score) are left out of every statistic and counted.

Added keys (CI = {"mean", "lo", "hi", "n", "values", "method"}, a 95% interval; lo = hi = None when
it cannot be estimated, e.g. one seed and no per-example scores):

- "summary": {TASK: {ARM: {str(SIZE): {"score": CI, "metrics": {name: CI}, "flops": CI, "wall_s": CI,
  "energy_j": CI, "co2_g": CI, "peak_mem_bytes": CI, "forgetting": CI|None, "bias_change": CI|None,
  "trainable_params": int, "n_seeds": int, "seeds": [int], "size_label": str, "n_failed": int,
  "energy_source": str}}}}
- "comparisons": [{"task", "size", "a", "b", "diff", "lo", "hi", "significant", "n_pairs",
  "paired_by": "seed"|"broadcast", "kinds": ["vs_scratch"|"vs_best"]}]
- "pareto": {TASK: [{"arm", "size", "score", "flops"}]} (fine-tuning FLOPs only)
- "amortisation": {TASK: {"target", "target_source", "pretrain": {"base": COST|None, "cpt": COST|None,
  "base_known": bool}, "arms": {ARM: {...}}, "curve": {"K": [1..100], ARM: [total FLOPs]|None},
  "note": str}}
- "recommendation": {TASK: [row per data size], "caveats": [str]}
- "stats": {"seed", "n_boot", "level", "notes": {...}}

Method. The score of an (arm, size) cell is the mean over seeds. With per-example scores the
interval comes from a two-level bootstrap: resample seeds with replacement, then test examples with
replacement (one draw of example indices shared by all runs in the resample), so it holds both the
noise of training (seed) and of the finite test set. Without them it is a percentile bootstrap over
seeds. A paired comparison bootstraps the per-example differences of runs with the same seed the
same way. Scores whose mean over examples differs from the reported score (a metric that is not a
mean over examples) are shifted per run so the interval is centred on the reported score. Above
500 test examples the example level draws the per-seed means from their normal limit (same mean
and covariance as resampling the examples), so large test sets stay fast.
"""

from __future__ import annotations

import copy
import math
import zlib

import numpy as np

N_BOOT = 2000
LEVEL = 0.95
FEW_SEEDS = 3  # fewer seeds than this: caveat
SMALL_TEST = 100  # fewer test examples than this: caveat
FORGETTING_BPB = 0.1  # forgetting above this many bits per byte: caveat
K_MAX = 100  # tasks on the amortisation curve
EXACT_MAX_EXAMPLES = 500  # above: the example level of the bootstrap uses its normal limit
COST_KEYS = ("flops", "wall_s", "energy_j", "co2_g", "peak_mem_bytes")

NOTES = {
    "pareto": ("The cost-quality front uses the fine-tuning (or inference) FLOPs of each run only; "
               "the cost of pre-training the base model is shared by all tasks and is handled in the "
               "amortisation analysis."),
    "amortisation": ("Cost to target: FLOPs of the smallest data size whose mean score reaches the "
                     "target. Break-even K*: the number of tasks from which pre-training once and "
                     "fine-tuning K times costs less than training from scratch K times to the same "
                     "target."),
    "bootstrap": ("95% percentile intervals; two-level bootstrap (seeds, then test examples) when "
                  "per-example scores exist, otherwise over seeds; paired by seed and test example "
                  "for differences. A difference is called significant only when its paired "
                  "interval excludes 0."),
}


# ----------------------------------------------------------------------------------- bootstrap
def _rng(seed: int, *key) -> np.random.Generator:
    h = zlib.crc32("\x1f".join(map(str, key)).encode())
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, h])


def _finite(x) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool) \
        and math.isfinite(float(x))


def bootstrap_means(x, rng: np.random.Generator, n_boot: int = N_BOOT, offsets=None,
                    exact_max: int = EXACT_MAX_EXAMPLES) -> np.ndarray:
    """Bootstrap distribution of the grand mean of `x`.

    `x` is (seeds,) for a bootstrap over seeds, or (seeds, examples) for the two-level bootstrap:
    each resample draws seeds with replacement and one multiset of example indices that every
    drawn seed shares. `offsets` (seeds,) is added to each seed's mean. Vectorised: resampled
    examples are drawn as counts, and a matrix product gives every seed's mean in every resample.
    Above `exact_max` examples the per-seed means of an example resample are drawn from their
    normal limit instead (same mean and covariance as the exact resampling; cost independent of
    the number of examples, where the exact draw costs n_boot x examples).
    """
    x = np.asarray(x, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    n_seeds, n_ex = x.shape
    weights = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n_boot) / n_seeds
    if n_ex == 1:
        means = np.broadcast_to(x[:, 0], (n_boot, n_seeds))
    elif n_ex > exact_max:
        centred = x - x.mean(axis=1, keepdims=True)
        w, v = np.linalg.eigh(centred @ centred.T / n_ex / n_ex)  # covariance of resampled means
        means = x.mean(axis=1) + rng.standard_normal((n_boot, n_seeds)) @ (v * np.sqrt(np.clip(w, 0, None))).T
    else:
        means = np.empty((n_boot, n_seeds))
        chunk = max(1, 2_000_000 // n_ex)  # bounds the (chunk, n_ex) count matrix
        p = np.full(n_ex, 1.0 / n_ex)
        for i in range(0, n_boot, chunk):
            counts = rng.multinomial(n_ex, p, size=min(chunk, n_boot - i))
            means[i:i + len(counts)] = counts @ x.T / n_ex
    if offsets is not None:
        means = means + np.asarray(offsets, dtype=float)
    return (weights * means).sum(axis=1)


def make_ci(values, boot=None, method: str = "none") -> dict:
    """CI dict from per-seed values and a bootstrap distribution (None: interval unknown)."""
    vals = [float(v) for v in values]
    mean = float(np.mean(vals)) if vals else None
    lo = hi = None
    if boot is not None and vals:
        a = (1.0 - LEVEL) / 2.0
        lo_b, hi_b = np.percentile(boot, [100 * a, 100 * (1 - a)])
        lo, hi = min(float(lo_b), mean), max(float(hi_b), mean)
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(vals), "values": vals,
            "method": method if lo is not None else "none"}


def seed_ci(values, rng: np.random.Generator, n_boot: int = N_BOOT) -> dict:
    """Percentile bootstrap over seeds; with fewer than two values the interval is unknown."""
    vals = [float(v) for v in values if _finite(v)]
    boot = bootstrap_means(vals, rng, n_boot) if len(vals) >= 2 else None
    return make_ci(vals, boot, "seeds")


def _example_matrix(runs: list[dict]):
    ex = [r.get("example_scores") for r in runs]
    if not ex or any(e is None or len(e) == 0 for e in ex) or len({len(e) for e in ex}) != 1:
        return None
    m = np.asarray(ex, dtype=float)
    return m if np.isfinite(m).all() else None


def score_ci(runs: list[dict], rng: np.random.Generator, n_boot: int = N_BOOT) -> dict:
    """Interval of the mean score of runs (one per seed): two-level bootstrap when possible."""
    scores = np.array([float(r["score"]) for r in runs])
    x = _example_matrix(runs)
    if x is None:
        return seed_ci(scores, rng, n_boot)
    boot = bootstrap_means(x, rng, n_boot, offsets=scores - x.mean(axis=1))
    return make_ci(scores, boot, "seeds+examples" if len(runs) > 1 else "examples")


def paired_diff(runs_a: list[dict], runs_b: list[dict], rng: np.random.Generator,
                n_boot: int = N_BOOT) -> dict | None:
    """Mean difference a - b over runs with the same seed, with its paired bootstrap interval.

    An arm evaluated once without training (method "none", one run) does not depend on a training
    seed: that run is paired with every run of the other arm ("broadcast").
    """
    a = {r["seed"]: r for r in runs_a}
    b = {r["seed"]: r for r in runs_b}
    paired_by = "seed"
    pairs = [(a[s], b[s]) for s in sorted(a.keys() & b.keys())]
    if len(runs_b) == 1 and runs_b[0].get("_inference") and len(runs_a) > len(pairs):
        pairs, paired_by = [(ra, runs_b[0]) for ra in runs_a], "broadcast"
    elif len(runs_a) == 1 and runs_a[0].get("_inference") and len(runs_b) > len(pairs):
        pairs, paired_by = [(runs_a[0], rb) for rb in runs_b], "broadcast"
    if not pairs:
        return None
    d = np.array([float(ra["score"]) - float(rb["score"]) for ra, rb in pairs])
    xa = _example_matrix([p[0] for p in pairs])
    xb = _example_matrix([p[1] for p in pairs])
    if xa is not None and xb is not None and xa.shape == xb.shape:
        dx = xa - xb
        ci = make_ci(d, bootstrap_means(dx, rng, n_boot, offsets=d - dx.mean(axis=1)),
                     "seeds+examples" if len(pairs) > 1 else "examples")
    else:
        ci = make_ci(d, bootstrap_means(d, rng, n_boot) if len(d) >= 2 else None, "seeds")
    sig = ci["lo"] is not None and (ci["lo"] > 0 or ci["hi"] < 0)
    return {"diff": ci["mean"], "lo": ci["lo"], "hi": ci["hi"], "significant": bool(sig),
            "n_pairs": len(pairs), "paired_by": paired_by, "method": ci["method"]}


# ----------------------------------------------------------------------------------- helpers
def pareto_front(points: list[dict]) -> list[dict]:
    """Points that no other point dominates (>= score and <= flops, one strict), by rising flops."""
    pts = [p for p in points if _finite(p.get("score")) and _finite(p.get("flops"))]
    front = [p for p in pts if not any(
        q["score"] >= p["score"] and q["flops"] <= p["flops"]
        and (q["score"] > p["score"] or q["flops"] < p["flops"]) for q in pts)]
    return sorted(front, key=lambda p: (p["flops"], -p["score"]))


def break_even(upfront: float | None, per_task: float | None,
               scratch_per_task: float | None) -> tuple[int | None, str]:
    """Smallest K >= 1 with upfront + K * per_task < K * scratch_per_task, and the reason if none.

    Returns 1 when scratch never reaches the target (pre-training is the only way), None when the
    arm never reaches it, the upfront cost is unknown, or the arm is not cheaper per task.
    """
    if per_task is None:
        return None, "never reaches the target"
    if scratch_per_task is None:
        return 1, "training from scratch never reaches the target: pre-training is the only way"
    if upfront is None:
        return None, "the cost of the base model is unknown (it was not trained by this study)"
    if per_task >= scratch_per_task:
        return None, "not cheaper per task than training from scratch: never breaks even"
    return max(1, math.floor(upfront / (scratch_per_task - per_task)) + 1), ""


def scratch_arm(results: dict) -> str | None:
    arms = results.get("arms", {})
    if "scratch" in arms:
        return "scratch"
    return next((a for a, spec in arms.items() if spec.get("init") == "scratch"), None)


def is_inference(results: dict, arm: str) -> bool:
    return results.get("arms", {}).get(arm, {}).get("method") == "none"


def context_sizes(results: dict, task: str) -> list[int]:
    """Data sizes at which arms are compared: those of trained arms (all sizes if none trained)."""
    by_arm = results["summary"].get(task, {})
    trained = {int(s) for a, cells in by_arm.items() if not is_inference(results, a) for s in cells}
    return sorted(trained or {int(s) for cells in by_arm.values() for s in cells})


def candidates(results: dict, task: str, size: int) -> dict[str, int]:
    """Arms available at `size` -> the size of their cell. An arm without training stands at every
    larger size with its largest smaller cell (a zero-shot run needs no labelled examples)."""
    out = {}
    for arm, cells in results["summary"].get(task, {}).items():
        if str(size) in cells:
            out[arm] = size
        elif is_inference(results, arm):
            lower = [int(s) for s in cells if int(s) <= size]
            if lower:
                out[arm] = max(lower)
    return out


def find_comparison(results: dict, task: str, size: int, a: str, b: str) -> dict | None:
    """The comparison of a against b at size, oriented as a - b (whichever way it was stored)."""
    for c in results.get("comparisons", []):
        if c["task"] == task and c["size"] == size and {c["a"], c["b"]} == {a, b}:
            if c["a"] == a:
                return c
            flip = dict(c, a=a, b=b, diff=-c["diff"])
            flip["lo"], flip["hi"] = (None, None) if c["lo"] is None else (-c["hi"], -c["lo"])
            return flip
    return None


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
    return ca["lo"] > cb["hi"] or cb["lo"] > ca["hi"]


def _cost_of(stage: dict | None) -> float | None:
    cost = (stage or {}).get("cost")
    return float(cost["flops"]) if cost and _finite(cost.get("flops")) else None


def _cost_key(cell: dict) -> float:
    """FLOPs of a cell for ranking; unknown costs rank last."""
    f = cell["flops"]["mean"]
    return f if f is not None else math.inf


def _flops(x: float | None) -> str:
    if x is None:
        return "n/a"
    mant, exp = f"{x:.1e}".split("e")
    return f"{mant}e{int(exp)}"


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


# ----------------------------------------------------------------------------------- analyse
def analyse(results: dict, n_boot: int = N_BOOT) -> dict:
    """Return a copy of `results` with summary, comparisons, pareto, amortisation, recommendation."""
    out = copy.deepcopy(results)
    study = out.get("study", {})
    seed = study.get("stats_seed", (study.get("config") or {}).get("stats_seed", 0)) or 0
    for r in out.get("runs", []):  # a private flag, removed below
        r["_inference"] = is_inference(out, r["arm"])
    cells, failed = _group(out)
    out["summary"] = _summary(out, cells, failed, seed, n_boot)
    out["comparisons"] = _comparisons(out, cells, seed, n_boot)
    out["pareto"] = {task: pareto_front([
        {"arm": arm, "size": int(s), "score": c["score"]["mean"], "flops": c["flops"]["mean"]}
        for arm, by_size in arms.items() for s, c in by_size.items()])
        for task, arms in out["summary"].items()}
    out["amortisation"] = {task: _amortisation(out, task) for task in out["summary"]}
    out["recommendation"] = _recommendation(out)
    out["stats"] = {"seed": int(seed), "n_boot": int(n_boot), "level": LEVEL, "notes": dict(NOTES)}
    for r in out.get("runs", []):
        r.pop("_inference", None)
    return out


def _group(results):
    cells, failed = {}, {}
    for r in results.get("runs", []):
        key = (r["task"], r["arm"], int(r["size"]))
        if r.get("status") == "failed" or not _finite(r.get("score")):
            failed[key] = failed.get(key, 0) + 1
            continue
        cells.setdefault(key, {}).setdefault(r["seed"], r)  # one run per seed
    return {k: [v[s] for s in sorted(v)] for k, v in cells.items()}, failed


def _summary(results, cells, failed, seed, n_boot):
    summary: dict = {task: {} for task in results.get("tasks", {})}
    order = {a: i for i, a in enumerate(results.get("arms", {}))}
    for (task, arm, size), runs in sorted(cells.items(), key=lambda kv: (
            kv[0][0], order.get(kv[0][1], 1 << 30), kv[0][1], kv[0][2])):
        rng = _rng(seed, "cell", task, arm, size)
        primary = results.get("tasks", {}).get(task, {}).get("metric")
        score = score_ci(runs, rng, n_boot)
        metrics = {}
        for name in sorted({m for r in runs for m in (r.get("metrics") or {})}):
            metrics[name] = score if name == primary else seed_ci(
                [(r.get("metrics") or {}).get(name) for r in runs], rng, n_boot)
        cell = {"score": score, "metrics": metrics}
        for key in COST_KEYS:
            cell[key] = seed_ci([(r.get("cost") or {}).get(key) for r in runs], rng, n_boot)
        for key in ("forgetting", "bias_change"):
            vals = [r.get(key) for r in runs if _finite(r.get(key))]
            cell[key] = seed_ci(vals, rng, n_boot) if vals else None
        sources = sorted({str((r.get("cost") or {}).get("energy_source", "unknown")) for r in runs})
        cell.update(trainable_params=int(runs[0].get("trainable_params") or 0), n_seeds=len(runs),
                    seeds=[r["seed"] for r in runs], size_label=str(runs[0].get("size_label", size)),
                    n_failed=failed.get((task, arm, size), 0), energy_source=", ".join(sources))
        summary.setdefault(task, {}).setdefault(arm, {})[str(size)] = cell
    return summary


def _comparisons(results, cells, seed, n_boot):
    scratch = scratch_arm(results)
    comps: list[dict] = []
    for task in results["summary"]:
        for size in context_sizes(results, task):
            cand = candidates(results, task, size)
            cell = {a: results["summary"][task][a][str(s)] for a, s in cand.items()}
            pairs: dict = {}
            if scratch in cand:
                for a in cand:
                    if a != scratch and not is_inference(results, a):
                        pairs.setdefault(frozenset((a, scratch)), ((a, scratch), ["vs_scratch"]))
            if cand:
                best = max(cand, key=lambda a: cell[a]["score"]["mean"])
                for b in cand:
                    if b != best:
                        pairs.setdefault(frozenset((best, b)), ((best, b), []))[1].append("vs_best")
            for (a, b), kinds in pairs.values():
                rng = _rng(seed, "pair", task, size, a, b)
                res = paired_diff(cells[(task, a, cand[a])], cells[(task, b, cand[b])], rng, n_boot)
                if res is not None:
                    comps.append({"task": task, "size": size, "a": a, "b": b, **res, "kinds": kinds})
    return comps


def _amortisation(results, task):
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
        out["note"] += " No target and no scratch arm: nothing to amortise."
        return out

    def to_target(arm):
        ok = [(c["flops"]["mean"], int(s)) for s, c in summary.get(arm, {}).items()
              if c["score"]["mean"] >= target - 1e-12 and c["flops"]["mean"] is not None]
        return min(ok, key=lambda t: (t[0], t[1])) if ok else (None, None)

    scratch_cost = to_target(scratch)[0] if scratch in summary else None
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
        else:
            k, reason = break_even(upfront, per_task, scratch_cost)
        entry = {"init": init, "upfront_flops": upfront, "cost_to_target": per_task,
                 "size_to_target": size, "break_even_tasks": k, "break_even_reason": reason}
        if init == "cpt" and not base_known and arm != scratch and scratch is not None:
            k_cpt = break_even(cpt_flops, per_task, scratch_cost)[0]
            entry["break_even_tasks_cpt_only"] = k_cpt
            if k_cpt is not None:
                entry["break_even_reason"] += f"; counting the continued pre-training alone, K* = {k_cpt}"
        out["arms"][arm] = entry
        first = upfront if upfront is not None else known_part
        out["curve"][arm] = None if per_task is None else [first + k_ * per_task for k_ in out["curve"]["K"]]
    return out


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
                  if cells[s].get("bias_change") and cells[s]["bias_change"]["lo"] is not None
                  and (cells[s]["bias_change"]["lo"] > 0 or cells[s]["bias_change"]["hi"] < 0)]
        if biased:
            out.append(f"{task}: {arm} changes the bias score (share of pairs where the model prefers the "
                       "stereotypical sentence) beyond noise: " + ", ".join(
                           f"{b['mean']:+.3f} [{b['lo']:+.3f}, {b['hi']:+.3f}] at {lab}" for lab, b in biased)
                       + " examples.")
    return out


def _recommendation(results):
    rec: dict = {}
    caveats: list[str] = []
    any_estimate = any("estimate" in str((r.get("cost") or {}).get("energy_source", ""))
                       for r in results.get("runs", []))
    for task, arms in results["summary"].items():
        spec = results.get("tasks", {}).get(task, {})
        target = spec.get("target")
        rows = []
        seeds = [c["n_seeds"] for a, cs in arms.items() if not is_inference(results, a) for c in cs.values()]
        if seeds and min(seeds) < FEW_SEEDS:
            caveats.append(f"{task}: only {min(seeds)} seed(s) for some arms: the intervals mostly "
                           "reflect test-set noise, not the variation between training runs.")
        if spec.get("n_test") is not None and spec["n_test"] < SMALL_TEST:
            caveats.append(f"{task}: small test set ({spec['n_test']} examples): intervals are wide "
                           "and small differences cannot be resolved.")
        if target is None:
            caveats.append(f"{task}: no target score was given; the recommendation is the best-scoring "
                           "arm, and the amortisation uses as target the best mean score of the "
                           "scratch arm.")
        n_failed = sum(1 for r in results.get("runs", []) if r["task"] == task
                       and (r.get("status") == "failed" or not _finite(r.get("score"))))
        if n_failed:
            caveats.append(f"{task}: {n_failed} run(s) failed and are left out.")
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
                        f"the lowest cost: score {interval}, {_flops(flops)} FLOPs.")
            elif target is not None:
                text = (f"With {size_label} labelled examples no arm reaches the target {_fmt(target)}; "
                        f"the best is {pick}: score {interval}.")
            else:
                text = f"With {size_label} labelled examples, {pick} has the highest mean score: {interval}."
            row_cav = []
            if same:
                row_cav.append(f"{task}, {size_label} examples: {pick} is not distinguishable from "
                               f"{', '.join(same)} at this size.")
                text = text[:-1] + f" (not distinguishable from {', '.join(same)})."
            f = c.get("forgetting")
            if f and f["mean"] is not None and f["mean"] > FORGETTING_BPB:
                row_cav.append(f"{task}, {size_label} examples: {pick} forgets general text "
                               f"(+{f['mean']:.3f} bits per byte on held-out general text).")
            b = c.get("bias_change")
            if b and b["lo"] is not None and (b["lo"] > 0 or b["hi"] < 0):
                row_cav.append(f"{task}, {size_label} examples: {pick} changes the bias score by "
                               f"{b['mean']:+.3f} [{b['lo']:+.3f}, {b['hi']:+.3f}] (share preferring "
                               "the stereotypical sentence).")
            caveats.extend(row_cav[:1] if same else [])  # forgetting and bias: once per arm, below
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
    rec["caveats"] = list(dict.fromkeys(caveats))
    return rec
