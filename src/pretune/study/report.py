"""The study report: one self-contained HTML file, the same content in Markdown, and results.json.

`write_report(results, out_dir)` writes `report.html` (plots embedded as base64 PNG, no external
CSS, JS or links), `report.md` (plots as PNG files in `report_files/`, linked relatively) and
`results.json` (the analysed results; NaN and infinities become null). Both documents are rendered
from one list of blocks, so they say the same thing. The plots come from `pretune.study.plots`.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path

from pretune.files import atomic_write_bytes
from pretune.study.decide import fmt_flops, fmt_score
from pretune.study.plots import (arm_styles, plot_amortisation, plot_cost_quality, plot_forgetting,
                                 plot_learning_curves, plot_style)
from pretune.study.stats import analyse, candidates, context_sizes, find_comparison, scratch_arm


# ----------------------------------------------------------------------------------- formatting
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
    study, rec = results.get("study", {}), results["recommendation"]
    b = [("h1", f"Study: {study.get('name', 'study')}"),
         ("p", f"Created {study.get('created', '?')} with pretune {study.get('pretune_version', '?')} "
               f"on {study.get('device', '?')}; {len(results.get('runs', []))} runs; "
               f"{fmt_s(study.get('train_s'))} of training in the runs and shared stages; "
               f"this invocation took {fmt_s(study.get('wall_s'))}."),
         ("h2", "Recommendation")]
    for task in results["summary"]:
        b += [("p", f"**{task}**"), ("ul", [r["text"] for r in rec.get(task, [])] or ["No completed runs."])]
    b += [("h2", "Caveats"), ("ul", rec.get("caveats") or ["None raised by the numbers."]),
          ("h2", "How to read this"), ("ul", HOW_TO_READ)]
    styles, images = arm_styles(results), {}
    with plot_style():
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
               f"target {fmt_score(spec.get('target'))}; majority class {fmt_score(spec.get('chance'))}; "
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
    for old in files.glob("*.png"):  # plots of tasks or views this report no longer has
        if old.name not in images:
            old.unlink()
    paths = {"report.html": out_dir / "report.html", "report.md": out_dir / "report.md",
             "results.json": out_dir / "results.json", "report_files": files}
    atomic_write_bytes(paths["report.html"], render_html(blocks, images).encode())
    atomic_write_bytes(paths["report.md"], render_markdown(blocks, files.name).encode())
    text = json.dumps(clean_json(results), indent=1, allow_nan=False, ensure_ascii=False)
    atomic_write_bytes(paths["results.json"], (text + "\n").encode())
    return paths
