"""`pretune study STUDY.yaml`: run every arm x size x seed as an ordinary run, then analyse and report.

The study directory:

    study.yaml        the merged study config that ran last
    base/  cpt/       shared stages, each run once (skipped when finished, resumed from a checkpoint)
    stages.json       forgetting and bias figures of the shared models
    TASK/ARM/nSIZE/sSEED/   one run directory per arm, size and seed (zero-shot: TASK/ARM/s SEED)
    results.json  report.md  report.html  report_files/

Re-running a study skips every finished run, so a study that was stopped continues where it stopped;
a run whose saved config differs from what the study would now run (finished, or stopped with a
checkpoint it would resume from; for a prompting run, its number of demonstrations too) is an error,
not a silent reuse, and a run whose parent (base/ or cpt/) was deleted and made again since is run
again from the start. The per-run configs are built in study/jobs.py.
Runs read only the files of their run directories (summary.json, predictions.jsonl), as DESIGN.md
asks, so every number in the report can be traced back to one.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

from pretune.config import Config, load_config
from pretune.config_io import flat_keys, from_dict, read_yaml, to_dict
from pretune.errors import ConfigError
from pretune.files import atomic_write_bytes, atomic_write_json
from pretune.study.collect import DONE, collect, read_summary, stage_entry
from pretune.study.config import Study, StudyConfig, load_study
from pretune.study.jobs import Planned, base_config, cpt_config, job_config, plan_runs, task_records  # noqa: F401

HELP_CONFIG = StudyConfig
# Keys that may differ between a finished run and the study that finds it (where and how it runs).
VOLATILE = {"out_dir", "resume", "overwrite", "train.threads", "train.device", "train.progress", "track"}


def cmd_study(argv: list[str]) -> int | None:
    from pretune.cli import split_args

    yaml_path, extra, overrides = split_args(argv)
    if extra is not None:
        raise ConfigError(f"unexpected argument {extra!r}; use pretune study STUDY.yaml [KEY=VALUE ...]")
    results = run_study(load_study(yaml_path, overrides))
    print_summary(results)
    failed = results["study"]["failed"]
    if failed:
        print(f"error: {len(failed)} run(s) failed (listed above); the report covers the others", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------- shared stages


def _finished(run_dir: Path) -> bool:
    s = read_summary(run_dir)
    return bool(s) and s.get("status") in DONE


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _lineage(path: Path) -> dict | None:
    """lineage.json of a run, or of the run holding a model directory (as write_lineage looks it up)."""
    return _read_json(path / "lineage.json") or _read_json(path.parent / "lineage.json")


def parent_changed(run_dir: Path) -> str | None:
    """Why a run no longer follows from its parent, or None. A run's lineage.json records its parent's
    lineage, with the time the parent was made (`created`): a parent deleted and made again since has
    another one, and a run started from the old parent must not be reused (nor resumed)."""
    lineage = _read_json(run_dir / "lineage.json")
    was = (lineage or {}).get("parent_lineage")
    if not lineage or not lineage.get("parent") or not isinstance(was, dict) or not was.get("created"):
        return None  # from scratch, or a parent without lineage (a given model): nothing to compare
    now = _lineage(Path(lineage["parent"]))
    if now is None:
        return f"its parent {lineage['parent']} is gone"
    if now.get("created") != was["created"] or now.get("id") != was.get("id"):  # id: since 2026-11-26
        return (f"its parent {lineage['parent']} was made again ({now.get('created')}) after this run "
                f"started from the one made {was['created']}")
    return None


def _continue_or_start(cfg: Config) -> Config:
    """A run that stopped part-way resumes from its last checkpoint, or starts again without one (or
    when its parent was made again since). It resumes only with the config the study now asks for:
    one saved with other settings is refused, as a finished one is (_check_same)."""
    from pretune.train.checkpoint import latest_checkpoint

    run_dir = Path(cfg.out_dir)
    if latest_checkpoint(run_dir) is not None and not parent_changed(run_dir):
        _check_same(cfg, run_dir)
        saved = read_yaml(run_dir / "config.yaml")
        saved.update(init_from=None, resume=str(run_dir), out_dir=str(run_dir), overwrite=False)
        return load_config(Config, None, [], base=saved)
    return dataclasses.replace(cfg, overwrite=run_dir.exists())


def _check_same(cfg: Config, run_dir: Path) -> None:
    """Refuse to reuse a finished run, or to resume a stopped one, that was made with a different config."""
    from pretune.stages import absolute_inputs

    saved = flat_keys(read_yaml(run_dir / "config.yaml"))
    want = flat_keys(json.loads(json.dumps(to_dict(absolute_inputs(cfg)))))  # as save_run_config saved it
    diff = [k for k in sorted(set(saved) | set(want))
            if not any(k == v or k.startswith(v + ".") for v in VOLATILE) and saved.get(k) != want.get(k)
            # the saved model is the resolved architecture: the parent's under init_from
            and not (k.startswith("model.") and (want.get(k) is None or cfg.init_from))]
    if diff:
        k = diff[0]
        raise ConfigError(f"{run_dir} was run with {k}={saved.get(k)!r} but the study now asks for "
                          f"{want.get(k)!r} ({len(diff)} difference(s)); use another out_dir for the changed "
                          "study, or delete that run directory to redo it")


def _check_shots(p: Planned, summary: dict) -> None:
    """Refuse to reuse a prompting run made with another number of demonstrations than the study now
    asks for: run_prompting is given them apart from the config, so _check_same cannot see them."""
    if p.shots is None or summary.get("shots") is None:
        return
    want = min(p.shots, summary.get("train_examples", p.shots))  # at most the labelled examples it had
    if summary["shots"] != want:
        raise ConfigError(f"{p.run_dir} was run with shots={summary['shots']} but the study now asks for {want} "
                          "(1 difference(s)); use another out_dir for the changed study, or delete that run "
                          "directory to redo it")


def check_reuse(p: Planned, summary: dict, probe: dict, log) -> bool:
    """True when the run of `p` finished before and is reused as it is (probed as this study asks).
    A finished run, or one that stopped part-way and would resume, made with settings other than the
    study's is refused (ConfigError) before any run starts; one whose parent was made again since runs
    again from the start."""
    from pretune.train.checkpoint import latest_checkpoint

    finished, stale = summary.get("status") in DONE, parent_changed(p.run_dir)
    if stale:
        if finished:
            log(f"{p.run_dir}: finished before, but {stale}: running it again")
        return False
    if finished:
        _check_same(p.config, p.run_dir)
        _check_shots(p, summary)
        return (summary.get("probe") or {}).get("settings") == probe_settings(probe)
    if latest_checkpoint(p.run_dir) is not None:
        _check_same(p.config, p.run_dir)  # it will resume: only with the config the study asks for
    return False


def run_stage(cfg: Config, log) -> Path:
    """Pre-train (or continue pre-training) once; a finished run is reused."""
    from pretune.stages import run_pretrain

    run_dir = Path(cfg.out_dir)
    stale = parent_changed(run_dir)
    if _finished(run_dir) and not stale:
        _check_same(cfg, run_dir)
        log(f"{run_dir}: finished before, reused")
        return run_dir
    if stale:
        log(f"{run_dir}: {stale}: running it again")
    cfg = _continue_or_start(cfg)
    log(f"{run_dir}: {'resuming' if cfg.resume else 'running'} ({cfg.train.max_steps} steps)")
    summary = run_pretrain(cfg, log=lambda m: None)
    if summary.get("status") not in DONE:
        raise ConfigError(f"{run_dir} ended with status {summary.get('status')}; see its metrics.jsonl")
    bpb = summary.get("val_bpb")
    log(f"{run_dir}: done in {summary['wall_s']:.0f} s" + (f", val_bpb={bpb:.4f}" if bpb is not None else
                                                          " (no validation text: no val_bpb)"))
    return run_dir


def probe_model(path: str | Path, general_eval: list[str], eval_tokens: int, bias_pairs: str | None,
                bias_max_pairs: int, device: str = "auto") -> dict:
    """Bits per byte on held-out general text and the bias-pair score of the model in `path`."""
    from pretune.config import DataConfig
    from pretune.data.corpus import load_corpus
    from pretune.eval.bias import bias_score, read_pairs
    from pretune.eval.evaluate import lm_metrics
    from pretune.model.io import load_model
    from pretune.train.dist import pick_device

    model, tok = load_model(path, pick_device(device))
    dev = next(model.parameters()).device
    out: dict = {"general_bpb": None, "bias": None}
    if general_eval:
        seq = min(256, model.cfg.max_seq_len)
        corpus = load_corpus(DataConfig(train=list(general_eval), val_fraction=0.0), tok, seq, log=lambda m: None)
        windows = (w for store in corpus.train for w in store.windows(seq, eval_tokens // len(corpus.train)))
        out["general_bpb"] = lm_metrics(model, windows, tok.token_bytes, dev)["bpb"]
    if bias_pairs:
        b = bias_score(model, tok, read_pairs(bias_pairs, bias_max_pairs), dev)
        out.update(bias=b["score"], bias_n=b["n"], bias_by_type=b["by_type"], bias_prefers=b["prefers_more"],
                   bias_skipped=b["n_skipped"])
    return out


def _probe_args(study: Study) -> dict:
    s = study.cfg
    return {"general_eval": list(s.general_eval), "eval_tokens": s.eval_tokens, "bias_pairs": s.bias_pairs,
            "bias_max_pairs": s.bias_max_pairs, "device": s.device}


def probe_settings(probe: dict) -> dict:
    """What a probe's figures depend on (not where it ran): changing any of these probes again. With
    bias pairs, the way they are scored too (2: ties count half, long pairs windowed or left out),
    so a study probed by an older pretune is probed again rather than mixing the two."""
    out = {k: v for k, v in probe.items() if k != "device"}
    return {**out, "bias_scoring": 2} if probe.get("bias_pairs") else out


def stage_probes(study: Study, stages: dict[str, Path], log) -> dict:
    """Forgetting and bias figures of the shared models, cached in stages.json."""
    path = Path(study.cfg.out_dir) / "stages.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    settings = probe_settings(_probe_args(study))
    out = {}
    for name, run_dir in stages.items():
        stamp = (read_summary(run_dir) or {}).get("wall_s")
        known = cached.get(name, {})
        if (known.get("run_dir"), known.get("stamp"), known.get("settings")) == (str(run_dir), stamp, settings):
            out[name] = known
            continue
        log(f"probing {name} ({run_dir}): general bits per byte and bias pairs")
        out[name] = {"run_dir": str(run_dir), "stamp": stamp, "settings": settings,
                     **probe_model(run_dir, **_probe_args(study))}
    atomic_write_json(path, out)
    return out


# ----------------------------------------------------------------------------- runs


def run_job(config: dict, shots: int | None, probe: dict, start_probe: dict | None, shared: int = 1) -> dict:
    """One arm x size x seed (in a worker): train or prompt unless finished, then probe the result.
    `shared`: the runs at once on this machine, for the energy meter (meter.shared_by)."""
    import torch

    from pretune.finetune import run_finetune
    from pretune.prompting import run_prompting
    from pretune.train.meter import shared_by

    shared_by(shared)
    cfg = from_dict(Config, config)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.out_dir)
    summary = read_summary(run_dir)
    if not (summary and summary.get("status") in DONE) or parent_changed(run_dir):
        cfg = _continue_or_start(cfg)
        quiet = lambda m: None  # noqa: E731  (runs of a study report through the engine's log)
        summary = run_prompting(cfg, shots, quiet) if shots is not None else run_finetune(cfg, quiet)
    if summary.get("status") not in DONE:  # stopped (train.stop_after), diverged, ...: not a result
        raise RuntimeError(f"{run_dir} ended with status {summary.get('status')!r}, not completed; "
                           "see its metrics.jsonl")
    if (summary.get("probe") or {}).get("settings") != probe_settings(probe):
        if shots is not None and start_probe is not None:  # prompting leaves the model as it was
            summary["probe"] = {k: start_probe.get(k) for k in ("general_bpb", "bias", "bias_n", "bias_by_type",
                                                                "bias_prefers", "bias_skipped")}
        else:
            summary["probe"] = probe_model(run_dir, **probe)
        summary["probe"]["settings"] = probe_settings(probe)
        atomic_write_json(run_dir / "summary.json", summary)
    import gc

    gc.collect()  # runs share a worker process: leave as little behind as possible for the next one
    return {"status": summary["status"]}


def _threads(study: Study) -> int | None:
    if study.cfg.threads:
        return study.cfg.threads
    return max(1, (os.cpu_count() or 1) // study.cfg.parallel) if study.cfg.parallel > 1 else None


# ----------------------------------------------------------------------------- the study


def prepare_study_dir(study: Study) -> Path:
    root = Path(study.cfg.out_dir)
    if root.exists() and any(root.iterdir()) and not (root / "study.yaml").is_file():
        raise ConfigError(f"out_dir {root} holds files but no study.yaml: it is not a study directory; "
                          "choose another out_dir")
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "study.yaml").is_file():  # it marks the directory as a study's from the start
        write_study_yaml(study, root)
    return root


def write_study_yaml(study: Study, root: Path) -> None:
    import yaml

    atomic_write_bytes(root / "study.yaml", yaml.safe_dump(study.raw, sort_keys=False).encode("utf-8"))


def run_study(study: Study, log=print) -> dict:
    """Run (or continue) the study and write results.json, report.md and report.html."""
    from pretune import __version__
    from pretune.study.engines import Job, run_jobs
    from pretune.study.report import write_report
    from pretune.study.stats import analyse

    t0 = time.perf_counter()
    root = prepare_study_dir(study)
    s = study.cfg
    if s.base.run:
        base, stages = Path(s.base.run), {"base": Path(s.base.run)}
    else:
        base = run_stage(base_config(study), log)
        stages = {"base": base}
    cpt = run_stage(cpt_config(study, base), log) if study.needs_cpt else None
    if cpt is not None:
        stages["cpt"] = cpt
    probes = stage_probes(study, stages, log)
    counts = {name: task_records(study, name) for name in study.tasks}
    threads = _threads(study)
    planned = plan_runs(study, base, cpt, counts)
    jobs, probe = [], _probe_args(study)
    for p in planned:
        if threads:
            p.config = dataclasses.replace(p.config, train=dataclasses.replace(p.config.train, threads=threads))
        if check_reuse(p, read_summary(p.run_dir) or {}, probe, log):
            continue  # finished and probed as this study asks
        start = probes.get(study.arm(p.arm).init)
        jobs.append(Job(key=str(p.run_dir.relative_to(root)), fn="pretune.study.runner:run_job",
                        kwargs={"config": to_dict(p.config), "shots": p.shots, "probe": probe, "start_probe": start},
                        gpus=1 if _uses_gpus(s.device) else 0))
    for job in jobs:  # runs at once share the CPU packages that RAPL counts: each is charged its share
        job.kwargs["shared"] = min(s.parallel, len(jobs))
    write_study_yaml(study, root)  # the study that runs now: every finished run agrees with it
    log(f"study {s.name}: {len(planned)} runs, {len(planned) - len(jobs)} finished before, {len(jobs)} to run "
        f"({s.engine}, {s.parallel} at a time)")
    outcome = run_jobs(jobs, engine=s.engine, parallel=s.parallel, log=log, ray_address=s.ray_address) if jobs else {}
    failed = {k: v.get("error") for k, v in outcome.items() if not v.get("ok")}
    tasks = {}
    for name, t in study.tasks.items():
        n_train, n_test, labels, majority = counts[name]
        # the honest floor of a classifier: always answering the most frequent test label
        tasks[name] = {"task": t.task, "metric": t.metric, "target": t.target, "n_train": n_train, "n_test": n_test,
                       "chance": majority if t.metric == "accuracy" else None}
    results = {
        "study": {"name": s.name, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                  "pretune_version": __version__, "device": _device_name(s.device), "wall_s": time.perf_counter() - t0,
                  "config": study.raw, "stats_seed": s.stats_seed, "failed": failed},
        "tasks": tasks,
        "arms": {a.name: {"init": a.init, "method": a.method, "replay": a.replay, "l2sp": s.l2sp if a.l2sp else 0.0,
                          "shots": a.shots, "description": a.describe()} for a in study.arms},
        "stages": {name: stage_entry("existing" if (name == "base" and s.base.run) else
                                      ("cpt" if name == "cpt" else "pretrain"), path, probes[name],
                                      trained=not (name == "base" and s.base.run))
                   for name, path in stages.items()},
        "runs": collect(study, planned, probes),
    }
    costs = [r.get("cost") for r in results["runs"]] + [st.get("cost") for st in results["stages"].values()]
    results["study"]["train_s"] = sum(c.get("wall_s") or 0.0 for c in costs if c)
    results = analyse(results)
    results["study"]["wall_s"] = time.perf_counter() - t0
    paths = write_report(results, root)
    for k, v in failed.items():
        log(f"FAILED {k}: {v}")
    log(f"report: {paths.get('report.html', root / 'report.html')}")
    return results


def _uses_gpus(device: str) -> bool:
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def _device_name(device: str) -> str:
    import platform

    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {name}, {os.cpu_count()} cores"


def print_summary(results: dict) -> None:
    """The recommendation per task, as a few lines on the terminal."""
    for task, rec in (results.get("recommendation") or {}).items():
        if task == "caveats" or not isinstance(rec, list):
            continue
        print(f"\n{task} ({results['tasks'][task]['metric']}):")
        for r in rec:
            print(f"  n={r.get('size')}: {r.get('text')}")

