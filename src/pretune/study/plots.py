"""The plots of the study report: learning curves, cost vs quality, forgetting, amortisation.

Each `plot_*` function takes the analysed results, a task and `arm_styles(results)` (one colour and
marker per arm, the same in every plot) and returns PNG bytes, or None when there is nothing to
draw; draw them inside `plot_style()`. matplotlib is imported only when plotting, through its
object-oriented API with the Agg canvas (no pyplot, no global backend switch).
"""

from __future__ import annotations

import math

from pretune.study.decide import FORGETTING_BPB, fmt_flops, fmt_score
from pretune.study.stats import is_inference, scratch_arm

# Okabe-Ito (colour-blind safe, yellow left out: too pale on white), then Tol's muted colours.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#882255", "#44AA99",
           "#999933", "#AA4499", "#661100", "#6699CC"]
SCRATCH_COLOUR = "#333333"
MARKERS = "osD^vPXh<>p*"
FIG_W, AX_H, FIG_DPI = 7.5, 3.3, 120  # 900 pixels wide; axes 3.3 inches high
REFERENCE_LABELS = {"Pareto front", "target", "majority class", "no forgetting"}
RC = {"font.size": 10.5, "axes.titlesize": 11.5, "axes.labelsize": 10.5, "legend.fontsize": 9.5,
      "xtick.labelsize": 9.5, "ytick.labelsize": 9.5, "axes.spines.top": False,
      "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.6,
      "legend.frameon": False, "figure.facecolor": "white"}


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


def plot_style():
    """A context manager that applies the rc settings of every plot (`RC`)."""
    from matplotlib import rc_context

    return rc_context(RC)


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
        ax.axhline(spec["chance"], color="#777777", ls=":", lw=1.5, label="majority class")


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
                shots = results.get("arms", {}).get(arm, {}).get("shots")
                k = s if shots is None else min(shots, s)  # as the runner plans it: at most the data size
                lab = arm if "shot" in arm.lower() else f"{arm} ({'zero' if k == 0 else k}-shot)"
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
            left = up or k > k_max ** 0.85  # near the right edge the label goes left of its mark, inside
            marks.append(k)
            ax.annotate(f"K*={k:,}", (k, y), xytext=(-8 if left else 8, 9 if up else -15),
                        textcoords="offset points", ha="right" if left else "left", fontsize=9, color=colour,
                        fontweight="bold")
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
    elif am.get("scratch_unknown"):
        title += "\n(" + am["scratch_unknown"] + ")"
    elif scratch in am["arms"] and not curve.get(scratch):
        title += "\n(scratch never reaches it: pre-training is the only way)"
    ax.set_title(title)
    return _finish(fig, ax)
