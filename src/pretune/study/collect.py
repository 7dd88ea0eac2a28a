"""Reading a study's run directories into the rows of results.json: score and per-example scores
(predictions.jsonl), cost, forgetting and bias (summary.json), each against its starting model.
Only the files a run wrote are read, so every number in the report traces back to one.
"""

from __future__ import annotations

import json
from pathlib import Path

from pretune.study.config import TASK_METRICS, Study

DONE = ("completed", "early_stopped")


def read_summary(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def _example_scores(run_dir: Path, metric: str) -> list[float] | None:
    path = run_dir / "predictions.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [float(r[metric]) for r in rows] if rows and metric in rows[0] else None


def _cost(summary: dict) -> dict:
    fpt = summary.get("flops_per_token") or {}
    total = sum(fpt.get(k, 0.0) for k in ("trainable", "frozen", "attention")) or 1.0
    flops = float(summary.get("flops") or 0.0)
    return {"flops": flops, "flops_trainable": flops * fpt.get("trainable", 0.0) / total,
            "flops_frozen": flops * fpt.get("frozen", 0.0) / total,
            "flops_attention": flops * fpt.get("attention", 0.0) / total,
            "wall_s": summary.get("wall_s"), "tokens": summary.get("tokens"),
            "target_tokens": summary.get("target_tokens"), "peak_mem_bytes": summary.get("peak_mem_bytes"),
            "energy_j": summary.get("energy_j"), "energy_source": summary.get("energy_source"),
            "co2_g": summary.get("co2_g")}


def collect(study: Study, planned: list, stage_info: dict) -> list[dict]:
    """The rows of results.json: one per planned run (see stats.py for the schema), read from disk."""
    runs = []
    root = Path(study.cfg.out_dir)
    for p in planned:
        t, arm = study.tasks[p.task], study.arm(p.arm)
        summary = read_summary(p.run_dir) or {}
        status = summary.get("status") if summary.get("status") in DONE and "probe" in summary else "failed"
        probe = summary.get("probe", {})
        start = stage_info.get(arm.init) if arm.init != "scratch" else None
        row = {"task": p.task, "arm": p.arm, "size": p.size, "size_label": p.size_label, "seed": p.seed,
               "run_dir": str(p.run_dir.relative_to(root)), "status": status}
        if status == "failed":
            runs.append(row)
            continue

        def change(key):
            if start is None or probe.get(key) is None or start.get(key) is None:
                return None
            return probe[key] - start[key]

        row.update(score=summary.get(t.metric), metrics={m: summary.get(m) for m in TASK_METRICS[t.task]
                                                           if summary.get(m) is not None},
                   example_scores=_example_scores(p.run_dir, t.metric), cost=_cost(summary),
                   params=summary.get("params"), trainable_params=summary.get("trainable_params"),
                   steps=summary.get("steps"), general_bpb=probe.get("general_bpb"),
                   forgetting=change("general_bpb"), bias=probe.get("bias"), bias_change=change("bias"),
                   bias_pair_changes=_pair_changes(probe, start))
        runs.append(row)
    return runs


def _pair_changes(probe: dict, start: dict | None) -> list[float] | None:
    """Per bias pair, the run's preference for sent_more minus its starting model's (each 1, 0, or 0.5
    for a tie: a change in -1..1 by halves), for intervals that resample the pairs as well as the
    seeds. Pairs that either model left out (too long for its context: None) are left out."""
    after, before = probe.get("bias_prefers"), (start or {}).get("bias_prefers")
    if not after or not before or len(after) != len(before):
        return None
    return [a - b for a, b in zip(after, before) if a is not None and b is not None] or None


def stage_entry(kind: str, run_dir: Path, probe: dict, trained: bool) -> dict:
    summary = read_summary(run_dir) if trained else None
    return {"run_dir": str(run_dir), "kind": kind, "cost": _cost(summary) if summary else None,
            "general_bpb": probe.get("general_bpb"), "bias": probe.get("bias"),
            "bias_by_type": probe.get("bias_by_type"), "bias_n": probe.get("bias_n"),
            "bias_skipped": probe.get("bias_skipped"), "steps": (summary or {}).get("steps")}
