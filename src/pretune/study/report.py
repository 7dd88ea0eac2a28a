"""The study report: one self-contained HTML file, the same content in Markdown, and results.json.

`write_report(results, out_dir)` writes `report.html` (plots embedded as base64 PNG, no external
CSS, JS or links), `report.md` (plots as PNG files in `report_files/`, linked relatively) and
`results.json` (the analysed results; NaN and infinities become null). Both documents are rendered
from one list of blocks, so they say the same thing. matplotlib is imported only when plotting,
through its object-oriented API with the Agg canvas (no pyplot, no global backend switch).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path

from pretune.files import atomic_write_bytes
from pretune.study.stats import (FORGETTING_BPB, analyse, candidates, context_sizes,
                                 find_comparison, is_inference, scratch_arm)

# Okabe-Ito (colour-blind safe, yellow left out: too pale on white), then Tol's muted colours.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#882255", "#44AA99",
           "#999933", "#AA4499", "#661100", "#6699CC"]
SCRATCH_COLOUR = "#333333"
MARKERS = "osD^vPXh<>p*"
FIG_W, AX_H, FIG_DPI = 7.5, 3.3, 120  # 900 pixels wide; axes 3.3 inches high
REFERENCE_LABELS = {"Pareto front", "target", "chance", "no forgetting"}
RC = {"font.size": 10.5, "axes.titlesize": 11.5, "axes.labelsize": 10.5, "legend.fontsize": 9.5,
      "xtick.labelsize": 9.5, "ytick.labelsize": 9.5, "axes.spines.top": False,
      "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6,
      "legend.frameon": False, "figure.facecolor": "white"}


# ----------------------------------------------------------------------------------- formatting
def fmt_flops(x) -> str:
    """1.2e12 style."""
    if x is None:
        return "n/a"
    if x == 0:
        return "0"
    mant, exp = f"{x:.1e}".split("e")
    return f"{mant}e{int(exp)}"


def fmt_s(x) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f} s" if x >= 100 else f"{x:.1f} s" if x >= 1 else f"{x:.2f} s"


def fmt_mb(x) -> str:
    return "n/a" if x is None else f"{x / 1e6:,.0f} MB" if x >= 1e7 else f"{x / 1e6:.1f} MB"


def fmt_energy(x, source: str = "") -> str:
    if x is None:
        return "n/a"
    text = f"{x / 1e6:.2f} MJ" if x >= 1e6 else f"{x / 1e3:.1f} kJ" if x >= 1e3 else f"{x:.1f} J"
    return f"{text} ({source})" if source else text


def fmt_g(x) -> str:
    return "n/a" if x is None else f"{x:.3g} g"


def fmt_int(x) -> str:
    return "n/a" if x is None else f"{int(x):,}"


def fmt_score(x) -> str:
    return "n/a" if x is None else f"{x:.3f}" if abs(x) < 10 else f"{x:.4g}"


def fmt_ci(ci, signed: bool = False, digits: int = 3) -> str:
    """mean [lo, hi] of a CI dict (or of a comparison: diff [lo, hi]); [?] when unknown."""
    mean = None if not ci else ci.get("mean", ci.get("diff"))
    if mean is None:
        return "n/a"
    f = (lambda v: f"{v:+.{digits}f}") if signed else (lambda v: f"{v:.{digits}f}")
    return f"{f(mean)} [{f(ci['lo'])}, {f(ci['hi'])}]" if ci.get("lo") is not None else f"{f(mean)} [?]"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(name)).strip("_") or "task"


def clean_json(obj):
    """Plain JSON data: NaN/inf -> None, numpy scalars -> Python, tuples -> lists, paths -> str."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return clean_json(obj.tolist())
    return str(obj)


def arm_styles(results: dict) -> dict[str, tuple[str, str]]:
    """One colour and marker per arm, the same in every plot (scratch is dark grey)."""
    scratch, styles, i = scratch_arm(results), {}, 0
    names = list(results.get("arms", {})) + [a for t in results.get("summary", {}).values() for a in t]
    for arm in dict.fromkeys(names):
        if arm == scratch:
            styles[arm] = (SCRATCH_COLOUR, "o")
        else:
            styles[arm] = (PALETTE[i % len(PALETTE)], MARKERS[(i + 1) % len(MARKERS)])
            i += 1
    return styles


# ----------------------------------------------------------------------------------- plots
def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(FIG_W, 4.5), dpi=FIG_DPI)
    return fig, fig.add_subplot()


def _finish(fig, ax) -> bytes:
    """Legend in columns below the axes (it never covers data); the figure grows to hold it."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i] in REFERENCE_LABELS
                   or labels[i].startswith("forgetting >"))  # arms first, reference lines last
    handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    longest = max((len(t) for t in labels), default=1)
    ncol = max(1, min(len(labels), int(98 / (longest + 7)))) if labels else 1
    rows = -(-len(labels) // ncol) if labels else 0
    bottom = 0.62 + (0.08 + 0.23 * rows if rows else 0)  # inches: tick labels + x label, legend
    top = 0.22 + 0.2 * (ax.get_title().count("\n") + 1)
    height = AX_H + top + bottom
    fig.set_size_inches(FIG_W, height)
    fig.subplots_adjust(left=0.78 / FIG_W, right=1 - 0.22 / FIG_W, top=1 - top / height,
                        bottom=bottom / height)
    if labels:
        fig.legend(handles, labels, loc="lower center", ncol=ncol, bbox_to_anchor=(0.5, 0.04 / height),
                   borderaxespad=0, columnspacing=1.6, handlelength=2.2)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIG_DPI, metadata={"Software": None})
    return buf.getvalue()


def _flops_axis(axis, values) -> None:
    """Ticks of a log axis (set the scale first) labelled 1e12 as in the tables; 1-2-5 when short."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    pos = [v for v in values if v and v > 0]
    short = bool(pos) and max(pos) / min(pos) < 30
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if short else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: fmt_flops(v).replace(".0e", "e")))
    axis.set_minor_formatter(NullFormatter())


def _n(size: int) -> str:
    return f"{size:,}"


def _cells(results, task, arm):
    return sorted(((int(s), c) for s, c in results["summary"][task].get(arm, {}).items()),
                  key=lambda t: t[0])


def _err(cells, key):
    """Asymmetric error bars of a CI key (zero where the interval is unknown)."""
    return [[c[key]["mean"] - c[key]["lo"] if c[key]["lo"] is not None else 0 for _, c in cells],
            [c[key]["hi"] - c[key]["mean"] if c[key]["lo"] is not None else 0 for _, c in cells]]


def _points(ax, xs, cells, style, label, xerr=None):
    """One arm's (size) cells as points with 95% bars, each labelled with its data size."""
    ys = [c["score"]["mean"] for _, c in cells]
    ax.errorbar(xs, ys, xerr=xerr, yerr=_err(cells, "score"), color=style[0], marker=style[1], ms=7, lw=0,
                elinewidth=1.1, capsize=3, label=label, zorder=3)
    for x, y, (s, _) in zip(xs, ys, cells):
        ax.annotate(f"n={_n(s)}", (x, y), xytext=(6, 3), textcoords="offset points", fontsize=8, color=style[0])


def _reference_lines(ax, spec):
    if spec.get("target") is not None:
        ax.axhline(spec["target"], color="#B2182B", ls="-.", lw=1.5, label="target")
    if spec.get("chance") is not None:
        ax.axhline(spec["chance"], color="#777777", ls=":", lw=1.5, label="chance")


def plot_learning_curves(results: dict, task: str, styles) -> bytes:
    from matplotlib.ticker import NullLocator

    fig, ax = _figure()
    spec = results["tasks"].get(task, {})
    ticks = {}
    for arm in results["summary"][task]:
        colour, marker = styles[arm]
        cells = _cells(results, task, arm)
        if is_inference(results, arm) and (len(cells) == 1 or all(s == 0 for s, _ in cells)):
            for s, c in cells:  # no training: a horizontal reference line and its band
                sc = c["score"]
                lab = arm if "shot" in arm.lower() else f"{arm} ({'zero' if s == 0 else s}-shot)"
                ax.axhline(sc["mean"], color=colour, ls="--", lw=1.8, label=lab)
                if sc["lo"] is not None:
                    ax.axhspan(sc["lo"], sc["hi"], color=colour, alpha=0.10, lw=0)
            continue
        cells = [(s, c) for s, c in cells if s > 0]
        if not cells:
            continue
        xs = [s for s, _ in cells]
        ys = [c["score"]["mean"] for _, c in cells]
        ax.plot(xs, ys, color=colour, marker=marker, lw=2, ms=6, label=arm,
                ls="--" if is_inference(results, arm) else "-")
        band = [(s, c["score"]["lo"], c["score"]["hi"]) for s, c in cells if c["score"]["lo"] is not None]
        if band:
            ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band],
                            color=colour, alpha=0.15, lw=0)
        for s, c in cells:
            ticks.setdefault(s, c["size_label"])
    _reference_lines(ax, spec)
    if ticks:
        ax.set_xscale("log")
        ax.set_xticks(sorted(ticks), [ticks[s] for s in sorted(ticks)])
        ax.xaxis.set_minor_locator(NullLocator())
        lo, hi = min(ticks), max(ticks)
        ax.set_xlim(lo / 1.4, hi * 1.4)
    ax.set_xlabel("labelled training examples (log scale)")
    ax.set_ylabel(f"{spec.get('metric', 'score')} on the test set")
    ax.set_title(f"{task}: learning curves (mean over seeds, shaded: 95% interval)")
    return _finish(fig, ax)


def plot_cost_quality(results: dict, task: str, styles) -> bytes:
    fig, ax = _figure()
    spec = results["tasks"].get(task, {})
    pos = [c["flops"]["mean"] for a in results["summary"][task] for _, c in _cells(results, task, a)
           if (c["flops"]["mean"] or 0) > 0]
    floor = min(pos) / 2 if pos else 1.0
    for arm in results["summary"][task]:
        cells = _cells(results, task, arm)
        _points(ax, [max(c["flops"]["mean"] or 0, floor) for _, c in cells], cells, styles[arm],
                arm + (" (inference only)" if is_inference(results, arm) else ""))
    front = results.get("pareto", {}).get(task, [])
    if front:
        fx = [max(p["flops"], floor) for p in front]
        fy = [p["score"] for p in front]
        ax.step(fx, fy, where="post", color="#555555", ls="--", lw=1.2, label="Pareto front", zorder=2)
        ax.scatter(fx, fy, s=170, facecolors="none", edgecolors="#555555", lw=1.2, zorder=2)
    _reference_lines(ax, spec)
    ax.set_xscale("log")
    _flops_axis(ax.xaxis, pos)
    ax.set_xlabel("fine-tuning cost (FLOPs, log scale; pre-training not included)")
    ax.set_ylabel(f"{spec.get('metric', 'score')} on the test set")
    ax.set_title(f"{task}: cost vs quality (bars: 95% interval where known)")
    return _finish(fig, ax)


def plot_forgetting(results: dict, task: str, styles) -> bytes | None:
    by_arm = {arm: [(s, c) for s, c in _cells(results, task, arm) if c.get("forgetting")]
              for arm in results["summary"][task]}
    if not any(by_arm.values()):
        return None
    fig, ax = _figure()
    spec = results["tasks"].get(task, {})
    for arm, cells in by_arm.items():
        if cells:
            _points(ax, [c["forgetting"]["mean"] for _, c in cells], cells, styles[arm], arm,
                    xerr=_err(cells, "forgetting"))
    ax.axvline(0, color="#777777", lw=1.2, ls=":", label="no forgetting")
    ax.axvspan(FORGETTING_BPB, max(ax.get_xlim()[1], FORGETTING_BPB * 1.05), color="#B2182B",
               alpha=0.06, lw=0, label=f"forgetting > {FORGETTING_BPB} bpb")
    ax.set_xlabel("forgetting: Δ bits per byte on general text (right = forgot more)")
    ax.set_ylabel(f"{spec.get('metric', 'score')} on the test set")
    ax.set_title(f"{task}: quality vs forgetting (bars: 95% interval where known)")
    return _finish(fig, ax)


def plot_amortisation(results: dict, task: str, styles) -> bytes | None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    am = results.get("amortisation", {}).get(task, {})
    curve = am.get("curve", {})
    ks = curve.get("K", [])
    if not any(curve.get(a) for a in am.get("arms", {})):
        return None
    fig, ax = _figure()
    scratch, drawn, marks = scratch_arm(results), [], []
    # the curves are straight lines: extend them past K = 100 when a break-even lies beyond
    far = [e.get("break_even_tasks") or e.get("break_even_tasks_cpt_only") for a, e in am["arms"].items()
           if curve.get(a) and (e.get("break_even_tasks") or e.get("break_even_tasks_cpt_only"))]
    k_max = int(min(max(far + [len(ks)]) * 1.3, 1e6)) if max(far + [0]) > len(ks) else len(ks)
    grid = sorted({int(round(10 ** (i * math.log10(k_max) / 240))) for i in range(241)})
    for arm, entry in am["arms"].items():
        if not curve.get(arm):
            continue
        per_task = entry["cost_to_target"]
        start = curve[arm][0] - per_task
        ks = grid
        ys = [start + k * per_task for k in ks]
        colour, _ = styles[arm]
        k = entry.get("break_even_tasks")
        if arm == scratch:
            label = f"{arm} (the reference)"
        elif k is None and entry.get("break_even_tasks_cpt_only"):
            k = entry["break_even_tasks_cpt_only"]
            label = f"{arm}: K*={k:,} counting continued pre-training alone"
        elif k is None:
            known = entry.get("upfront_flops") is not None
            label = f"{arm}: never breaks even" if known else f"{arm} (base cost left out)"
        else:
            label = f"{arm}: break-even K*={k:,}" + (" (beyond the plot)" if k > k_max else "")
        ax.plot(ks, ys, color=colour, lw=2.4 if arm == scratch else 1.9, label=label)
        drawn += ys
        if k is not None and k <= k_max:
            y = start + k * per_task
            ax.plot([k], [y], marker="o", ms=9, mfc="white", mec=colour, mew=2, zorder=4)
            up = len(marks) % 2 == 1  # alternate above-left and below-right so labels do not collide
            marks.append(k)
            ax.annotate(f"K*={k:,}", (k, y), xytext=(-8, 9) if up else (8, -15), textcoords="offset points",
                        ha="right" if up else "left", fontsize=9, color=colour, fontweight="bold")
    ax.set_xscale("log")
    ax.set_xlim(0.9, k_max * 1.1)
    ax.xaxis.set_major_locator(FixedLocator([m * 10 ** e for e in range(7) for m in (1, 2, 5)
                                             if m * 10 ** e <= k_max]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    pos = [v for v in drawn if v > 0]
    if pos and max(pos) / min(pos) > 30:
        ax.set_yscale("log")
        _flops_axis(ax.yaxis, pos)
        ax.set_ylabel("cumulative FLOPs (log scale)")
    else:  # a short span: a common power of ten keeps the tick labels distinct
        e = int(math.floor(math.log10(max(pos)))) if pos else 0
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 10 ** e:.4g}"))
        ax.set_ylabel(f"cumulative FLOPs (×1e{e})")
    ax.set_xlabel("number of tasks K (log scale)")
    src = " (best scratch score)" if am.get("target_source") == "scratch_best" else ""
    title = f"{task}: total cost to reach {fmt_score(am.get('target'))}{src} on K tasks"
    if not am.get("pretrain", {}).get("base_known"):
        title += "\n(the base model was given: its pre-training cost is unknown and left out)"
    elif scratch in am["arms"] and not curve.get(scratch):
        title += "\n(scratch never reaches it: pre-training is the only way)"
    ax.set_title(title)
    return _finish(fig, ax)


# ----------------------------------------------------------------------------------- document
HOW_TO_READ = [
    "Scores are means over training seeds, on the test set, with a 95% interval in brackets "
    "([?]: not estimable, e.g. a single run without per-example scores).",
    "A difference is marked * only when its paired 95% interval excludes 0; otherwise the arms "
    "are not distinguishable with this data, whatever their means say.",
    "Costs are those of fine-tuning (or of inference for zero/few-shot arms); pre-training is "
    "listed apart under stage costs and enters the amortisation analysis.",
    "Forgetting is the change in bits per byte on held-out general text from the starting model "
    "(positive: the model got worse at general text). Bias change is the change in the share of "
    "pairs where the model prefers the stereotypical sentence (0.5 = no preference).",
]
FLOPS_NOTE = ("FLOPs follow the convention of nanoGPT and PaLM: per token, 6 per trainable matrix "
              "parameter, 4 per frozen one that gradients flow through (below a LoRA adapter), 2 per "
              "frozen one that is only run forward, plus attention (12·H·D·T per layer and token when "
              "training through it). Energy comes from NVML or RAPL counters when readable, else from an "
              "assumed power draw times time (marked 'estimate'); CO2 from energy times a grid intensity.")
SIZE_HEAD = ["arm", "seeds", "score [95% CI]", "Δ vs scratch", "trainable params", "FLOPs", "wall time",
             "energy", "CO2", "peak mem", "forgetting Δbpb", "bias change"]
STAGE_HEAD = ["stage", "kind", "FLOPs", "wall time", "tokens", "energy", "CO2", "peak mem", "general bpb", "bias"]
AMORT_HEAD = ["arm", "upfront FLOPs (pre-training)", "size reaching target", "FLOPs per task to target",
              "break-even K*", "note"]


def _blocks(results: dict) -> tuple[list, dict[str, bytes]]:
    """The report as blocks (shared by HTML and Markdown) and the PNG images it refers to."""
    from matplotlib import rc_context

    study, rec = results.get("study", {}), results["recommendation"]
    b = [("h1", f"Study: {study.get('name', 'study')}"),
         ("p", f"Created {study.get('created', '?')} with pretune {study.get('pretune_version', '?')} "
               f"on {study.get('device', '?')}; {len(results.get('runs', []))} runs, "
               f"{fmt_s(study.get('wall_s'))} in all."),
         ("h2", "Recommendation")]
    for task in results["summary"]:
        b += [("p", f"**{task}**"), ("ul", [r["text"] for r in rec.get(task, [])] or ["No completed runs."])]
    b += [("h2", "Caveats"), ("ul", rec.get("caveats") or ["None raised by the numbers."]),
          ("h2", "How to read this"), ("ul", HOW_TO_READ)]
    styles, images = arm_styles(results), {}
    with rc_context(RC):
        for task in results["summary"]:
            b += _task_blocks(results, task, styles, images)
    b += [("h2", "Stage costs"),
          ("p", "Pre-training and continued pre-training, kept apart from the per-task costs "
                "(n/a: the model was given, not trained here; continued pre-training is counted alone)."),
          ("table", STAGE_HEAD, [_stage_row(name, st) for name, st in (results.get("stages") or {}).items()])]
    st = results["stats"]
    b += [("h2", "Method"),
          ("p", f"{st['notes']['bootstrap']} {st['n_boot']} resamples, numpy seed {st['seed']}. Seeds are "
                "training seeds; with one seed and no per-example scores an interval is not estimated."),
          ("p", FLOPS_NOTE), ("p", st["notes"]["amortisation"])]
    return b, images


def _stage_row(name: str, st: dict) -> list[str]:
    st = st or {}
    cost = st.get("cost") or {}
    return [name, str(st.get("kind", "?")), fmt_flops(cost.get("flops")), fmt_s(cost.get("wall_s")),
            fmt_int(cost.get("tokens")), fmt_energy(cost.get("energy_j"), cost.get("energy_source") or ""),
            fmt_g(cost.get("co2_g")), fmt_mb(cost.get("peak_mem_bytes")), fmt_score(st.get("general_bpb")),
            fmt_score(st.get("bias"))]


def _task_blocks(results: dict, task: str, styles: dict, images: dict) -> list:
    spec, slug, scratch = results.get("tasks", {}).get(task, {}), _slug(task), scratch_arm(results)
    b = [("h2", f"Task: {task}"),
         ("p", f"{spec.get('task', '?')} task; primary metric {spec.get('metric', '?')} (higher is better); "
               f"target {fmt_score(spec.get('target'))}; chance {fmt_score(spec.get('chance'))}; "
               f"{fmt_int(spec.get('n_train'))} training and {fmt_int(spec.get('n_test'))} test examples.")]
    for key, title, fn in (("curves", "Learning curves", plot_learning_curves),
                           ("cost", "Cost and quality", plot_cost_quality),
                           ("forgetting", "Quality and forgetting", plot_forgetting)):
        png = fn(results, task, styles)
        b.append(("h3", title))
        if png is None:
            b.append(("p", "No forgetting was measured for this task."))
            continue
        images[f"{slug}_{key}.png"] = png
        b.append(("img", f"{slug}_{key}.png", f"{task}: {title.lower()}"))
        if key == "cost":
            b.append(("p", "Pareto front (no other arm is both better and cheaper): " + ", ".join(
                f"{p['arm']} at n={p['size']} ({fmt_score(p['score'])}, {fmt_flops(p['flops'])} FLOPs)"
                for p in results["pareto"].get(task, [])) + ". " + results["stats"]["notes"]["pareto"]))
    b.append(("h3", "Results by data size"))
    for size in context_sizes(results, task):
        cand = candidates(results, task, size)
        cells = {a: results["summary"][task][a][str(s)] for a, s in cand.items()}
        label = next((cells[a]["size_label"] for a, s in cand.items() if s == size), str(size))
        rows = []
        for arm, c in cells.items():
            comp = find_comparison(results, task, size, arm, scratch) if scratch in cand and arm != scratch else None
            diff = "—" if comp is None else fmt_ci(comp, signed=True) + (" *" if comp["significant"] else "")
            rows.append([arm + ("" if cand[arm] == size else f" (n={c['size_label']})"), str(c["n_seeds"]),
                         fmt_ci(c["score"]), diff, fmt_int(c["trainable_params"]), fmt_flops(c["flops"]["mean"]),
                         fmt_s(c["wall_s"]["mean"]), fmt_energy(c["energy_j"]["mean"], c.get("energy_source", "")),
                         fmt_g(c["co2_g"]["mean"]), fmt_mb(c["peak_mem_bytes"]["mean"]),
                         fmt_ci(c["forgetting"], signed=True), fmt_ci(c["bias_change"], signed=True)])
        head = SIZE_HEAD[:3] + [f"Δ vs {scratch or 'scratch'}"] + SIZE_HEAD[4:]
        b += [("h4", f"{label} labelled examples"), ("table", head, rows)]
    b.append(("p", "* the paired 95% interval of the difference excludes 0. Costs are means over seeds."))
    comps = [c for c in results["comparisons"] if c["task"] == task]
    if comps:
        b += [("h3", "Paired comparisons"),
              ("table", ["size", "a", "b", "a − b [95% CI]", "distinguishable", "pairs"], [
                  [str(c["size"]), c["a"], c["b"], fmt_ci(c, signed=True), "yes" if c["significant"] else "no",
                   f"{c['n_pairs']} ({c['paired_by']})"] for c in comps])]
    b.append(("h3", "Amortisation over tasks"))
    am = results["amortisation"][task]
    png = plot_amortisation(results, task, styles)
    if png is not None:
        images[f"{slug}_amortisation.png"] = png
        b.append(("img", f"{slug}_amortisation.png", f"{task}: amortisation"))
    tgt = fmt_score(am.get("target")) + (" (best mean score of the scratch arm; no target was given)"
                                          if am.get("target_source") == "scratch_best" else "")
    b.append(("p", f"Target: {tgt}. {am.get('note', '')}"))
    b.append(("table", AMORT_HEAD, [
        [arm, fmt_flops(e["upfront_flops"]), "never" if e["size_to_target"] is None else str(e["size_to_target"]),
         fmt_flops(e["cost_to_target"]), "—" if e["break_even_tasks"] is None else str(e["break_even_tasks"]),
         e["break_even_reason"]] for arm, e in am.get("arms", {}).items()]))
    return b


def _inline(text: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1060px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}h1{font-size:1.7em}h2{margin-top:1.8em;
border-bottom:1px solid #ddd;padding-bottom:.2em}h4{margin-bottom:.3em}table{border-collapse:collapse;
font-size:.82em;margin:.4em 0 1em;display:block;overflow-x:auto}th,td{border:1px solid #ddd;
padding:3px 7px;text-align:right;white-space:nowrap}th{background:#f3f3f3}.l{text-align:left}
tr:nth-child(even) td{background:#fafafa}img{width:900px;max-width:100%;display:block;margin:.5em 0}
li{margin:.2em 0}"""


def _numeric(rows: list[list[str]], j: int) -> bool:
    return all(re.match(r"^([-+−]?[0-9.]|n/a|—|never$)", r[j]) for r in rows) if rows else True


def render_html(blocks: list, images: dict[str, bytes]) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(blocks[0][1])}</title><style>{CSS}</style></head><body>"]
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3", "h4", "p"):
            out.append(f"<{kind}>{_inline(blk[1])}</{kind}>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(t)}</li>" for t in blk[1]) + "</ul>")
        elif kind == "img":
            data = base64.b64encode(images[blk[1]]).decode()
            out.append(f'<img alt="{html.escape(blk[2])}" src="data:image/png;base64,{data}">')
        elif kind == "table":
            left = ['' if _numeric(blk[2], j) else ' class="l"' for j in range(len(blk[1]))]
            head = "".join(f"<th{a}>{html.escape(h)}</th>" for a, h in zip(left, blk[1]))
            body = "".join("<tr>" + "".join(f"<td{a}>{html.escape(c)}</td>" for a, c in zip(left, row)) + "</tr>"
                           for row in blk[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def render_markdown(blocks: list, files_dir: str) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3", "h4"):
            out.append("#" * int(kind[1]) + " " + blk[1])
        elif kind == "p":
            out.append(blk[1])
        elif kind == "ul":
            out.append("\n".join(f"- {t}" for t in blk[1]))
        elif kind == "img":
            out.append(f"![{blk[2]}]({files_dir}/{blk[1]})")
        elif kind == "table":
            def row(cells):
                return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
            align = ["---:" if _numeric(blk[2], j) else "---" for j in range(len(blk[1]))]
            out.append("\n".join([row(blk[1]), "|" + "|".join(align) + "|"]
                                 + [row(r) for r in blk[2]]))
    return "\n\n".join(out) + "\n"


def write_report(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write report.html, report.md (+ report_files/*.png) and results.json into out_dir.

    `results` may be raw (it is analysed first) or the output of `analyse`. Returns the paths by
    name: {"report.html", "report.md", "results.json", "report_files"}.
    """
    if "summary" not in results:
        results = analyse(results)
    out_dir = Path(out_dir)
    files = out_dir / "report_files"
    files.mkdir(parents=True, exist_ok=True)
    blocks, images = _blocks(results)
    for name, png in images.items():
        atomic_write_bytes(files / name, png)
    paths = {"report.html": out_dir / "report.html", "report.md": out_dir / "report.md",
             "results.json": out_dir / "results.json", "report_files": files}
    atomic_write_bytes(paths["report.html"], render_html(blocks, images).encode())
    atomic_write_bytes(paths["report.md"], render_markdown(blocks, files.name).encode())
    text = json.dumps(clean_json(results), indent=1, allow_nan=False, ensure_ascii=False)
    atomic_write_bytes(paths["results.json"], (text + "\n").encode())
    return paths
