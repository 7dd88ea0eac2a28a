"""Statistics of a study: bootstrap intervals, summary by cell, paired comparisons; `analyse`.

`analyse(results)` is pure and deterministic: it returns a deep copy of `results` with keys added,
and every random draw comes from numpy generators seeded by `results["study"]["stats_seed"]` (else
`results["study"]["config"]["stats_seed"]`, else 0) and by the name of what is being resampled, so
the numbers do not depend on the order of runs. The decisions drawn from the statistics ("pareto",
"amortisation", "recommendation") come from `pretune.study.decide`, which `analyse` calls last.

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
                "bias": float|None, "bias_change": float|None,
                "bias_pair_changes": [-1..1 by halves, ...]|None (per bias pair, the run's
                                     preference for sent_more, 1, 0 or 0.5 for a tie, minus its
                                     starting model's; pairs too long for the context left out)}, ...]}
    COST = {"flops", "flops_trainable", "flops_frozen", "flops_attention", "wall_s", "tokens", "target_tokens",
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
  "note": str, "scratch_unknown": str|None (why break-even is unknown: scratch has no completed
  runs, at all or at some size, and reached the target at none of the others)}}
- "recommendation": {TASK: [row per data size], "caveats": [str]}
- "stats": {"seed", "n_boot", "level", "notes": {...}}

Method. The score of an (arm, size) cell is the mean over seeds. Without per-example scores its
interval is Student's t over seeds: mean +- t(0.975, n-1) * s / sqrt(n), s the standard deviation
with n - 1 (a percentile bootstrap of 2 to 5 seeds is far too narrow). With per-example scores a
two-level bootstrap resamples seeds with replacement, then test examples with replacement (one draw
of example indices shared by all runs in the resample), so it holds both the noise of training
(seed) and of the finite test set. Its seed level is widened as in the t interval: the deviations
of the resampled seed weights from 1/n are scaled by sqrt(n/(n-1)) (the unbiased variance), and the
interval is mean +- t(0.975, df) * SE, SE the standard deviation of the bootstrap and df the
Welch-Satterthwaite degrees of freedom of the two levels, (n-1) (1 + Ve/Vs')^2 with Ve the
example-level variance of the mean and Vs' the seed-level one at its 80% upper confidence bound
(seed_df: the plain plug-in Vs made 2-seed intervals too narrow): n - 1 when the seeds dominate
(then it is the t interval), the normal quantile when the test set does. With one seed, or seeds whose scores agree
exactly, it is the percentile interval of the bootstrap (the test examples alone); with one seed and
no per-example scores it is unknown. A paired comparison does the same with the per-example
differences of runs with the same seed. Scores whose mean over examples differs from the reported
score (a metric that is not a mean over examples) are shifted per run so the interval is centred on
the reported score. Above 500 test examples the example level draws the per-seed means from their
normal limit (same mean and covariance as resampling the examples), so large test sets stay fast.
Bootstrap values and bounds are rounded to 12 decimals, and an interval that touches 0 does not
exclude it: a lump of resamples at exactly 0 never makes a difference significant by float noise.
"""

from __future__ import annotations

import copy
import functools
import math
import zlib
from statistics import NormalDist

import numpy as np

N_BOOT = 2000
LEVEL = 0.95
EXACT_MAX_EXAMPLES = 500  # above: the example level of the bootstrap uses its normal limit
DIGITS = 12  # interval bounds are rounded to this many decimals (float noise around 0)
SEED_VAR_BOUND = 0.2  # seed_df uses the seed variance's one-sided 1 - 0.2 = 80% upper confidence bound
COST_KEYS = ("flops", "wall_s", "energy_j", "co2_g", "peak_mem_bytes")

NOTES = {
    "pareto": ("The cost-quality front uses the fine-tuning (or inference) FLOPs of each run only; "
               "the cost of pre-training the base model is shared by all tasks and is handled in the "
               "amortisation analysis."),
    "amortisation": ("Cost to target: FLOPs of the smallest data size whose mean score reaches the "
                     "target. Break-even K*: the number of tasks from which pre-training once and "
                     "fine-tuning K times costs less than training from scratch K times to the same "
                     "target."),
    "bootstrap": ("95% intervals. Over seeds alone (no per-example scores): Student's t, mean ± "
                  "t·s/√n with n − 1 degrees of freedom. With per-example scores: a two-level "
                  "bootstrap (seeds, then test examples) with the seed level widened as in the t "
                  "interval: seed deviations scaled by √(n/(n−1)), and mean ± t·SE with the "
                  "Welch–Satterthwaite degrees of freedom of the seed and example levels, taken "
                  "with the seed variance at its 80% upper confidence bound so that 2 or 3 seeds "
                  "keep the 95% level (n − 1 when the seeds dominate, up to the normal quantile "
                  "when the test set does); with one seed, the percentile interval over test "
                  "examples. Differences are paired by seed and test example. A difference is "
                  "called significant only when its paired interval excludes 0 (an interval "
                  "touching 0 does not)."),
}


# ----------------------------------------------------------------------------------- bootstrap
def _rng(seed: int, *key) -> np.random.Generator:
    h = zlib.crc32("\x1f".join(map(str, key)).encode())
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, h])


def finite(x) -> bool:
    """A real number (not a bool) that is neither NaN nor infinite."""
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool) \
        and math.isfinite(float(x))


def t_quantile(p: float, df: float | None) -> float:
    """The p quantile (p > 0.5) of Student's t with `df` degrees of freedom; None (or above 1e6) is
    the normal one. Newton's method on the distribution function, integrated numerically by
    Simpson's rule (no scipy): from the normal quantile it climbs monotonically to the root."""
    z = NormalDist().inv_cdf(p)
    if df is None or df > 1e6:
        return z
    return _t_quantile(p, round(float(df), 9), z)


@functools.lru_cache(maxsize=1024)
def _t_quantile(p: float, df: float, z: float) -> float:
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def pdf(x):
        return c * (1 + x * x / df) ** (-(df + 1) / 2)

    t = z
    for _ in range(100):
        x = np.linspace(0.0, t, 2001)
        f = pdf(x)
        cdf = 0.5 + t / 6000 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
        step = (p - cdf) / pdf(t)
        t += step
        if abs(step) < 1e-10 * t:
            break
    return float(t)


def bootstrap_means(x, rng: np.random.Generator, n_boot: int = N_BOOT, offsets=None,
                    exact_max: int = EXACT_MAX_EXAMPLES) -> np.ndarray:
    """Bootstrap distribution of the grand mean of `x`.

    `x` is (seeds,) for a bootstrap over seeds, or (seeds, examples) for the two-level bootstrap:
    each resample draws seeds with replacement and one multiset of example indices that every
    drawn seed shares. `offsets` (seeds,) is added to each seed's mean. The deviations of the seed
    weights from 1/n are scaled by sqrt(n/(n-1)), so the seed level has the unbiased variance
    s^2/n rather than the plug-in (n-1)/n of it. Vectorised: resampled examples are drawn as counts,
    and a matrix product gives every seed's mean in every resample. Above `exact_max` examples the
    per-seed means of an example resample are drawn from their normal limit instead (same mean and
    covariance as the exact resampling; cost independent of the number of examples, where the exact
    draw costs n_boot x examples). Values are rounded to DIGITS decimals.
    """
    x = np.asarray(x, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    n_seeds, n_ex = x.shape
    weights = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n_boot) / n_seeds
    if n_seeds > 1:
        weights = 1.0 / n_seeds + (weights - 1.0 / n_seeds) * math.sqrt(n_seeds / (n_seeds - 1))
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
    return np.round((weights * means).sum(axis=1), DIGITS)


def chi2_quantile(p: float, df: float) -> float:
    """The p quantile of the chi-squared distribution with `df` degrees of freedom, for p at most
    one half (below the mean, where the series of the regularised lower incomplete gamma function
    converges fast), by bisection (no scipy)."""
    a = df / 2.0

    def cdf(x: float) -> float:
        if x <= 0:
            return 0.0
        h = x / 2.0
        term = total = 1.0 / a
        k = 0
        while term > total * 1e-15 and k < 10_000:
            k += 1
            term *= h / (a + k)
            total += term
        return total * math.exp(a * math.log(h) - h - math.lgamma(a))

    lo, hi = 0.0, max(1.0, df)  # the median of chi-squared is below its mean, df
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


@functools.lru_cache(maxsize=256)
def seed_var_inflation(n: int) -> float:
    """(n - 1) / chi2(SEED_VAR_BOUND; n - 1): the seed-level variance estimated from n seeds times
    this is its one-sided 80% upper confidence bound (15.6 for 2 seeds, 4.5 for 3, 2.4 for 5)."""
    return (n - 1) / chi2_quantile(SEED_VAR_BOUND, n - 1)


def seed_df(x, offsets=None) -> float | None:
    """Degrees of freedom of the interval of the grand mean of x (seeds, examples), after Welch and
    Satterthwaite: the seed-level variance of the mean Vs (from n seeds) has n - 1, the example-level
    one Ve (from many test examples) counts as known, so df = (n-1) (1 + Ve/Vs)^2, but with Vs taken
    at its 80% upper confidence bound (seed_var_inflation). The plain plug-in, from a Vs of n - 1
    degrees of freedom, raises the df exactly when Vs comes out small, and so narrows the intervals
    when they should be widest: with 2 seeds it called about 12% of null differences significant at
    the 5% level (8% with 3 seeds). With the bound the rate stays at or below 5% for 2 to 30 seeds,
    whatever the ratio of the seed and test-set variances (tests/test_study_fixes.py simulates it);
    the df is n - 1 when the seeds dominate and grows to the normal quantile when the test set does.
    None: one seed, or seeds that agree exactly (then the percentile interval of the example level)."""
    x = np.asarray(x, dtype=float)
    n, n_ex = x.shape
    per_seed = x.mean(axis=1) + (0.0 if offsets is None else np.asarray(offsets, dtype=float))
    v_seed = float(np.var(per_seed, ddof=1)) / n if n > 1 else 0.0
    if v_seed <= 0:
        return None
    v_ex = float(np.var(x.mean(axis=0), ddof=1)) / n_ex if n_ex > 1 else 0.0
    return (n - 1) * (1 + v_ex / (v_seed * seed_var_inflation(n))) ** 2


def _ci(vals: list[float], lo, hi, method: str) -> dict:
    mean = float(np.mean(vals)) if vals else None
    if lo is not None:
        lo, hi = round(min(float(lo), mean), DIGITS), round(max(float(hi), mean), DIGITS)
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(vals), "values": vals,
            "method": method if lo is not None else "none"}


def make_ci(values, boot=None, method: str = "none", df: float | None = None, x=None, offsets=None) -> dict:
    """CI dict from per-seed values and a bootstrap distribution (None: interval unknown): the
    percentile interval, or with `df` mean +- t(df) x the bootstrap's standard error. With the
    per-example scores `x` of a metric that is their mean (no offsets), that symmetric interval is
    kept within their range: a mean accuracy's interval does not reach past 1."""
    vals = [float(v) for v in values]
    if boot is None or not vals:
        return _ci(vals, None, None, method)
    a = (1.0 - LEVEL) / 2.0
    mean = float(np.mean(vals))
    if df is not None:
        half = t_quantile(1 - a, df) * float(np.std(boot, ddof=1))
        lo, hi = mean - half, mean + half
        if x is not None and (offsets is None or np.allclose(offsets, 0.0)):
            lo, hi = max(lo, float(np.min(x))), min(hi, float(np.max(x)))
        return _ci(vals, lo, hi, method)
    lo_b, hi_b = np.percentile(boot, [100 * a, 100 * (1 - a)])
    return _ci(vals, lo_b, hi_b, method)


def t_ci(values, method: str = "seeds") -> dict:
    """Student's t interval of the mean of values (one per seed); fewer than two: unknown."""
    vals = [float(v) for v in values]
    if len(vals) < 2:
        return _ci(vals, None, None, method)
    mean = float(np.mean(vals))
    half = t_quantile((1.0 + LEVEL) / 2.0, len(vals) - 1) * float(np.std(vals, ddof=1)) / math.sqrt(len(vals))
    return _ci(vals, mean - half, mean + half, method)


def seed_ci(values) -> dict:
    """Interval over seeds (t, see t_ci) of the finite values; with fewer than two it is unknown."""
    return t_ci([v for v in values if finite(v)], "seeds")


def excludes_zero(ci: dict | None) -> bool:
    """True when an interval ({"lo", "hi"}) is known and excludes 0; one that touches 0 does not."""
    tol = 10.0 ** -DIGITS
    return bool(ci) and ci.get("lo") is not None and (ci["lo"] > tol or ci["hi"] < -tol)


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
        return seed_ci(scores)
    offsets = scores - x.mean(axis=1)
    boot = bootstrap_means(x, rng, n_boot, offsets=offsets)
    return make_ci(scores, boot, "seeds+examples" if len(runs) > 1 else "examples", seed_df(x, offsets), x, offsets)


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
        dx, offsets = xa - xb, d - (xa - xb).mean(axis=1)
        ci = make_ci(d, bootstrap_means(dx, rng, n_boot, offsets=offsets),
                     "seeds+examples" if len(pairs) > 1 else "examples", seed_df(dx, offsets), dx, offsets)
    else:
        ci = t_ci(d, "seeds")
    return {"diff": ci["mean"], "lo": ci["lo"], "hi": ci["hi"], "significant": excludes_zero(ci),
            "n_pairs": len(pairs), "paired_by": paired_by, "method": ci["method"]}


# ----------------------------------------------------------------------------------- helpers
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


# ----------------------------------------------------------------------------------- analyse
def analyse(results: dict, n_boot: int = N_BOOT) -> dict:
    """Return a copy of `results` with summary, comparisons, pareto, amortisation, recommendation."""
    from pretune.study.decide import amortisation, pareto_fronts, recommendation  # it imports this module

    out = copy.deepcopy(results)
    study = out.get("study", {})
    seed = study.get("stats_seed", (study.get("config") or {}).get("stats_seed", 0)) or 0
    for r in out.get("runs", []):  # a private flag, removed below
        r["_inference"] = is_inference(out, r["arm"])
    cells, failed = _group(out)
    out["summary"] = _summary(out, cells, failed, seed, n_boot)
    out["comparisons"] = _comparisons(out, cells, seed, n_boot)
    out["pareto"] = pareto_fronts(out)
    out["amortisation"] = {task: amortisation(out, task) for task in out["summary"]}
    out["recommendation"] = recommendation(out)
    out["stats"] = {"seed": int(seed), "n_boot": int(n_boot), "level": LEVEL, "notes": dict(NOTES)}
    for r in out.get("runs", []):
        r.pop("_inference", None)
    return out


def _group(results):
    cells, failed = {}, {}
    for r in results.get("runs", []):
        key = (r["task"], r["arm"], int(r["size"]))
        if r.get("status") == "failed" or not finite(r.get("score")):
            failed[key] = failed.get(key, 0) + 1
            continue
        cells.setdefault(key, {}).setdefault(r["seed"], r)  # one run per seed
    return {k: [v[s] for s in sorted(v)] for k, v in cells.items()}, failed


def _bias_ci(runs: list[dict], rng: np.random.Generator, n_boot: int) -> dict | None:
    """Interval of the bias change: resampling seeds and bias pairs when the runs carry per-pair
    changes (bias_pair_changes), else seeds alone."""
    have = [r for r in runs if finite(r.get("bias_change"))]
    if not have:
        return None
    pairs = [{"score": r["bias_change"], "example_scores": r.get("bias_pair_changes")} for r in have]
    return score_ci(pairs, rng, n_boot)


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
            metrics[name] = score if name == primary else seed_ci([(r.get("metrics") or {}).get(name) for r in runs])
        cell = {"score": score, "metrics": metrics}
        for key in COST_KEYS:
            cell[key] = seed_ci([(r.get("cost") or {}).get(key) for r in runs])
        vals = [r.get("forgetting") for r in runs if finite(r.get("forgetting"))]
        cell["forgetting"] = seed_ci(vals) if vals else None
        cell["bias_change"] = _bias_ci(runs, rng, n_boot)
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
