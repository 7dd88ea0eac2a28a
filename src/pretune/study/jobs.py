"""The ordinary run configs of a study: the shared stages (base/, cpt/) and one `pretune finetune`
config per task, arm, size and seed, built from the study's mappings (`finetune`, the task's
`config`, `arm_config`, the arm's `config`, the budget).

`run_config_problems` builds every one of them before anything runs, with placeholder paths for the
shared models that do not exist yet, so that a wrong key anywhere in the study is reported at once
(`load_study` calls it), not after hours of pre-training.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pretune.config import Config, load_config
from pretune.config_io import deep_merge
from pretune.errors import ConfigError
from pretune.study.config import Arm, Study


def _stage_config(study: Study, out_dir: Path, mapping: dict, where: str, extra: dict | None = None) -> Config:
    s = study.cfg
    common = {"out_dir": str(out_dir), "train": {"device": s.device, "threads": s.threads, "progress": False},
              "track": dataclasses.asdict(s.track), "meter": dataclasses.asdict(s.meter)}
    try:
        return load_config(Config, None, [], base=deep_merge(deep_merge(common, mapping), extra or {}))
    except ConfigError as e:
        raise ConfigError([f"{where}: {p}" for p in e.problems]) from None


def base_config(study: Study) -> Config:
    return _stage_config(study, Path(study.cfg.out_dir) / "base", study.cfg.base.pretrain or {}, "base.pretrain")


def cpt_config(study: Study, base: Path) -> Config:
    s, c = study.cfg, study.cfg.cpt
    r = c.replay_ratio if s.replay else 0.0
    files = list(c.data) + (list(s.replay) if r > 0 else [])
    weights = [(1 - r) / len(c.data)] * len(c.data) + ([r / len(s.replay)] * len(s.replay) if r > 0 else [])
    mapping = deep_merge({"data": {"train": files, "weights": weights, "val_fraction": 0.0},
                          "train": {"max_steps": c.steps, "eval_every": 0, "save_every": max(50, c.steps // 4)},
                          "optim": {"warmup_steps": max(1, c.steps // 10)}}, c.config)
    return _stage_config(study, Path(s.out_dir) / "cpt", mapping, "cpt", {"init_from": str(base)})


@dataclasses.dataclass
class Planned:
    task: str
    arm: str
    size: int
    size_label: str
    seed: int
    run_dir: Path
    config: Config
    shots: int | None


def task_records(study: Study, name: str) -> tuple[int, int, list[str] | None, float | None]:
    """(training records after the validation split, test records, labels, majority-class share of
    the test set) of a task."""
    from collections import Counter

    from pretune.finetune import _records

    cfg = job_config(study, name, study.arms[0], None, study.cfg.seeds[0], Path("."), None, None)
    train, _, test, labels, _ = _records(cfg)
    counts = Counter(r["label"] for r in test) if labels and test else None
    return len(train), len(test), labels, (max(counts.values()) / len(test) if counts else None)


def resolve_sizes(requested: list, n_train: int) -> list[tuple[int, str]]:
    """[(examples, label)] in increasing order; sizes above the training set collapse into 'all'."""
    out: dict[int, str] = {}
    for s in requested:
        n = n_train if s == "all" or s >= n_train else int(s)
        out[n] = f"all ({n_train})" if n == n_train else str(n)
    return sorted(out.items())


def job_mapping(study: Study, task_name: str, arm: Arm, size: int | None, seed: int, out_dir: Path,
                base: Path | None, cpt: Path | None, n_train: int | None = None, placeholder: bool = False) -> dict:
    """The keys of one run's `pretune finetune` config, merged from the study's layers. With
    `placeholder`, base and cpt are the paths the shared models will have, not yet made: nothing is
    read from them, and what would be read (a scratch arm's architecture, a prompting arm's context)
    is left out; a scratch arm keeps only the model keys that the base's architecture would not set."""
    from dataclasses import fields

    from pretune.model.config import ModelConfig
    from pretune.model.io import find_model_dir, read_model_config
    from pretune.stages import tokenizer_dir

    s, t = study.cfg, study.tasks[task_name]
    start = {"base": base, "cpt": cpt, "scratch": None}[arm.init]
    layers = [
        {"train": {"device": s.device, "threads": s.threads, "progress": False, "save_every": 0, "log_every": 10},
         "track": dataclasses.asdict(s.track), "meter": dataclasses.asdict(s.meter)},
        s.finetune, t.config,
        s.arm_config.get("scratch" if arm.init == "scratch" else ("prompting" if not arm.trains else arm.method), {}),
        s.arm_config.get(arm.name, {}), arm.config,
    ]
    merged: dict = {}
    for layer in layers:
        merged = deep_merge(merged, layer or {})
    forced = {"out_dir": str(out_dir), "seed": seed, "task": t.task, "overwrite": False, "resume": None,
              "method": arm.method if arm.trains else "full", "init_from": str(start) if start else None,
              "data": {"train": list(t.train), "val": list(t.val), "test": list(t.test), "max_examples": size},
              "finetune": {"epochs": None}}
    if arm.replay:
        forced["finetune"].update(replay=list(s.replay), replay_ratio=s.replay_ratio)
    if arm.l2sp:
        forced["finetune"]["l2sp"] = s.l2sp
    if not arm.trains and start is not None:  # what run_prompting will run with
        forced["finetune"]["classifier"] = "verbalizer"
        if not placeholder:
            forced["finetune"]["max_len"] = read_model_config(find_model_dir(start)).max_seq_len
    if arm.init == "scratch" and base is not None:
        kept = ("dropout", "attn_dropout")
        if placeholder:  # the base's architecture replaces every other model key: keep unknown ones (typos)
            known = {f.name for f in fields(ModelConfig)} - set(kept)
            merged["model"] = {k: v for k, v in (merged.get("model") or {}).items() if k not in known}
        else:
            forced["model"] = {k: v for k, v in dataclasses.asdict(read_model_config(find_model_dir(base))).items()
                               if k not in kept}
        forced["data"]["tokenizer"] = str((base if placeholder else tokenizer_dir(base)) / "tokenizer.json")
    merged = deep_merge(merged, forced)
    if n_train is not None and arm.trains:
        batch = merged.get("train", {}).get("batch_size") or Config().train.batch_size
        steps = s.budget.steps(min(size or n_train, n_train), batch)
        train = {"max_steps": steps}
        if s.budget.patience is not None:
            train.update(patience=s.budget.patience, eval_every=s.budget.eval_every,
                         early_stop_metric=f"val_{t.metric}" if t.task == "classification" else "val_loss")
        elif "eval_every" not in merged.get("train", {}):
            train["eval_every"] = 0  # nothing reads the validation figures without early stopping
        merged = deep_merge(merged, {"train": train})
        warm = merged.get("optim", {}).get("warmup_steps")
        if warm is None or warm >= steps:
            merged = deep_merge(merged, {"optim": {"warmup_steps": max(1, steps // 10)}})
    return merged


def _where(task_name: str, arm: Arm) -> str:
    return f"finetune, tasks.{task_name}.config, arm_config" + (" or the arm's config" if arm.config else "")


def job_config(study: Study, task_name: str, arm: Arm, size: int | None, seed: int, out_dir: Path,
               base: Path | None, cpt: Path | None, n_train: int | None = None) -> Config:
    """The ordinary `pretune finetune` config of one run."""
    merged = job_mapping(study, task_name, arm, size, seed, out_dir, base, cpt, n_train)
    try:
        return load_config(Config, None, [], base=merged)
    except ConfigError as e:
        raise ConfigError([f"task {task_name}, arm {arm.name}: {p} (set in {_where(task_name, arm)})"
                           for p in e.problems]) from None


def run_config_problems(study: Study) -> list[str]:
    """Every problem of every run config of the study, found before anything runs: the shared stages
    and one fine-tuning config per task and arm (sizes and seeds change nothing else), built with
    placeholder paths for the base and CPT models. A problem common to several runs (a key of
    `finetune`, say) is reported once, with the runs it concerns."""
    s = study.cfg
    root = Path(s.out_dir)
    problems: list[str] = []
    base = Path(s.base.run) if s.base.run else root / "base"
    stages = [lambda: base_config(study)] if s.base.pretrain else []
    if study.needs_cpt and s.cpt.data:
        stages.append(lambda: cpt_config(study, base))
    for build in stages:
        try:
            build()
        except ConfigError as e:
            problems += e.problems
    found: dict[str, list[tuple[str, Arm]]] = {}
    cpt = root / "cpt" if study.needs_cpt else None
    seed = s.seeds[0] if s.seeds else 0
    for task_name in study.tasks:
        for arm in study.arms:
            mapping = job_mapping(study, task_name, arm, None, seed, root / task_name / arm.name, base, cpt,
                                  n_train=1, placeholder=True)
            try:
                load_config(Config, None, [], base=mapping)
            except ConfigError as e:
                for p in e.problems:
                    found.setdefault(p, []).append((task_name, arm))
    every = len(study.tasks) * len(study.arms)
    for p, runs in found.items():
        if len(runs) == every and every > 1:
            problems.append(f"every task and arm: {p} (set in finetune or the task's config)")
            continue
        by_task: dict[str, list[Arm]] = {}
        for task_name, arm in runs:
            by_task.setdefault(task_name, []).append(arm)
        for task_name, arms in by_task.items():
            where = _where(task_name, arms[0]) if len(arms) == 1 else \
                f"finetune, tasks.{task_name}.config, arm_config or the arms' config"
            problems.append(f"task {task_name}, arm{'s' if len(arms) > 1 else ''} "
                            f"{', '.join(a.name for a in arms)}: {p} (set in {where})")
    return problems


def plan_runs(study: Study, base: Path, cpt: Path | None, counts: dict) -> list[Planned]:
    out = []
    root = Path(study.cfg.out_dir)
    for task_name, t in study.tasks.items():
        n_train = counts[task_name][0]
        sizes = resolve_sizes(t.sizes or study.cfg.sizes, n_train)
        for arm in study.arms:
            if not arm.trains and arm.shots == 0:  # zero-shot: one run, no labelled data
                run_dir = root / task_name / arm.name / f"s{study.cfg.seeds[0]}"
                cfg = job_config(study, task_name, arm, None, study.cfg.seeds[0], run_dir, base, cpt, n_train)
                out.append(Planned(task_name, arm.name, 0, "0", study.cfg.seeds[0], run_dir, cfg, 0))
                continue
            for size, label in sizes:
                for seed in study.cfg.seeds:
                    run_dir = root / task_name / arm.name / f"n{size}" / f"s{seed}"
                    cfg = job_config(study, task_name, arm, size, seed, run_dir, base, cpt, n_train)
                    shots = None if arm.trains else min(arm.shots or 0, size)
                    out.append(Planned(task_name, arm.name, size, label, seed, run_dir, cfg, shots))
    return out
