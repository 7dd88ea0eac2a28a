"""The real-data study: pre-train on books, then fine-tune or train from scratch on SMS spam and SST-2.

Runs `pretune study configs/study-realdata.yaml` (unless OUT_DIR already holds its results.json; a
stopped study continues where it stopped) and renders benchmarks/results/realdata_study.md from the
study's results.json: the base's pre-training figures and, per task and labelled-set size, one row
per arm. The hand-written "Reading" section of an existing result file is kept.

    OMP_NUM_THREADS=1 python benchmarks/realdata_study.py [--out-dir DIR] [--render-only] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/study-realdata.yaml"
DEST = ROOT / "benchmarks" / "results" / "realdata_study.md"
READING = "## Reading"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name  # noqa: E402  (benchmarks/ is not a package)


def run(out_dir: Path, overrides: list[str]) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from pretune.study.config import load_study
    from pretune.study.runner import print_summary, run_study

    os.chdir(ROOT)  # the config's data paths are relative to the repository root
    print_summary(run_study(load_study(CONFIG, [f"out_dir={out_dir}", *overrides])))


def render(results: dict, out_dir: Path, command: str) -> str:
    from pretune.study.report import fmt_ci, fmt_flops, fmt_int, fmt_s
    from pretune.study.stats import find_comparison

    study, stage = results["study"], results["stages"]["base"]
    base = json.loads((out_dir / "base" / "summary.json").read_text())
    cfg = study["config"]
    threads = cfg.get("threads")
    run_wall = sum((r.get("cost") or {}).get("wall_s") or 0 for r in results["runs"])
    md = ["# Real data: pre-train, or train from scratch on the task?", "",
          f"Date: {study['created'][:10]}  ",
          f"Machine: {cpu_name()}, {os.cpu_count()} cores shared with other jobs, {threads} torch thread per run "
          f"(`threads: {threads}`, `parallel: {cfg.get('parallel')}`, OMP_NUM_THREADS=1); pretune "
          f"{study['pretune_version']}  ",
          f"Command: `{command}`  ",
          f"Study wall time: {fmt_s(study['wall_s'])} (the last invocation; pre-training "
          f"{fmt_s(base['wall_s'])} + fine-tuning runs {fmt_s(run_wall)} + probes, evaluation and report); "
          f"{len(results['runs'])} runs, {len(study.get('failed') or {})} failed", "",
          "## The base model", "",
          f"`{cfg['base']['pretrain']['model']['preset']}` preset, {fmt_int(base.get('params'))} parameters, "
          f"trained on {', '.join(cfg['base']['pretrain']['data']['train'])}: {base['steps']} steps, "
          f"{fmt_int(base['tokens'])} tokens, {fmt_s(base['wall_s'])}, {fmt_flops(base.get('flops'))} FLOPs, "
          f"{base['tokens_per_s']:,.0f} tokens/s; validation bits per byte {base['val_bpb']:.3f} (loss "
          f"{base['val_loss']:.3f}) on the held-out last 10% of each source; WikiText-2 test bits per byte "
          f"{stage['general_bpb']:.3f}; CrowS-Pairs bias score {stage['bias']:.3f} (share of pairs where the "
          "stereotypical sentence is preferred; 0.5 = none).", ""]
    head = ["arm", "accuracy [95% CI]", "Δ vs scratch [paired 95% CI]", "macro-F1", "wall time",
            "trainable params", "FLOPs", "forgetting Δbpb", "bias change"]
    for task, arms in results["summary"].items():
        spec = results["tasks"][task]
        md += [f"## {task}", "", f"{spec['n_train']:,} training records, {spec['n_test']:,} test records; "
               f"target {spec['metric']} {spec['target']}; means over seeds {sorted({s for a in arms.values() for c in a.values() for s in c['seeds']})}.", ""]
        sizes = sorted({int(s) for a in arms.values() for s in a}, key=int)
        for size in sizes:
            md += [f"### {size} labelled examples", "", "| " + " | ".join(head) + " |",
                   "|---|" + "---:|" * (len(head) - 1)]
            for arm, cells in arms.items():
                c = cells.get(str(size))
                if c is None:
                    continue
                m = c["metrics"]
                signed = lambda ci: "n/a" if not ci else f"{ci['mean']:+.3f}"  # noqa: E731
                diff = find_comparison(results, task, size, arm, "scratch") if arm != "scratch" else None
                md.append(f"| {arm} | {fmt_ci(m.get('accuracy'))} | {fmt_ci(diff, signed=True) if diff else '—'} | "
                          f"{m['macro_f1']['mean']:.3f} | "
                          f"{fmt_s(c['wall_s']['mean'])} | {fmt_int(c['trainable_params'])} | "
                          f"{fmt_flops(c['flops']['mean'])} | {signed(c.get('forgetting'))} | "
                          f"{signed(c.get('bias_change'))} |")
            md.append("")
    rec = results["recommendation"]
    md += ["## The report's recommendation", ""]
    for task in results["summary"]:
        md += [f"- **{task}**"] + [f"  - {r['text']}" for r in rec.get(task, [])]
    md += ["", "Caveats:", ""] + [f"- {c}" for c in rec.get("caveats", [])] + ["", ""]
    return "\n".join(md)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(ROOT / "runs" / "study-realdata"))
    ap.add_argument("--render-only", action="store_true", help="only render OUT_DIR/results.json")
    ap.add_argument("--command", default=None, help="the command to record (default: this one)")
    ap.add_argument("overrides", nargs="*", help="extra KEY=VALUE overrides of the study")
    args = ap.parse_args()
    out_dir = Path(args.out_dir).resolve()
    if not (ROOT.parent / "shared" / "data").is_dir():
        print("no ../shared/data beside the repository: the real datasets are absent", file=sys.stderr)
        return 2
    if not args.render_only and not (out_dir / "results.json").is_file():
        run(out_dir, args.overrides)
    results = json.loads((out_dir / "results.json").read_text())
    command = args.command or ("OMP_NUM_THREADS=1 python benchmarks/realdata_study.py " + " ".join(sys.argv[1:])).strip()
    md = render(results, out_dir, command)
    old = DEST.read_text() if DEST.is_file() else ""
    md += old[old.index(READING):] if READING in old else f"{READING}\n\n(to be written after reading the report)\n"
    DEST.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
