"""`pretune finetune`: adapt a model to a task through the one training loop.

Methods differ only in what is trainable (full, the last k blocks, LoRA adapters), tasks only in
their examples and objective. Regularisers: weight decay and dropout (config), early stopping on a
validation figure with the best model kept, L2-SP toward the initial weights, replay of general text
with its LM loss, and k-fold cross-validation.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import random
import statistics
from pathlib import Path

import torch

from pretune.config import Config
from pretune.data import tasks as T
from pretune.data.corpus import build_tokenizer
from pretune.data.labels import ids_to_names, label_names  # plan_inputs imports label_names from here
from pretune.data.shards import BatchSampler, load_source
from pretune.data.tokenizer import Tokenizer
from pretune.errors import ConfigError
from pretune.eval.scoring import evaluate_task, uses_head, write_predictions
from pretune.files import atomic_dir, atomic_write_json
from pretune.model.config import resolve_model_config
from pretune.model.gpt import GPT
from pretune.model.heads import ClassifierModel
from pretune.model.io import save_model_dir
from pretune.model.lora import apply_lora, lora_layers, lora_state_dict, merged_state
from pretune.stages import (finished_run, ignored_model_keys, inputs_of, lineage_parent, open_run, parent_model,
                            parent_tokenizer, restore_replaced, save_run_config)
from pretune.train import checkpoint as ck
from pretune.train import dist
from pretune.train.loop import MetricsLog, _round, train
from pretune.train.objectives import L2SP, ClassifierObjective, DPOObjective, LMObjective

HELP_CONFIG = Config


def cmd_finetune(argv: list[str]) -> None:
    from pretune.cli import run_config, print_summary

    summary = run_finetune(run_config(argv))
    figures = ("accuracy", "macro_f1", "rouge_l", "chrf", "exact_match", "pref_accuracy")
    if "cv" in summary and "mean" not in summary:  # a fold stopped part-way: nothing to average yet
        print(f"summary: {summary['cv']}-fold cross-validation {summary['status']} in fold {summary['stopped_fold']}")
        return
    if "cv" in summary:  # k folds: each figure's mean and standard deviation across them
        mean, std = summary["mean"], summary["std"]
        print(f"summary: {summary['cv']}-fold cross-validation, " + ", ".join(
            f"{k}={mean[k]:.4g} ± {std[k]:.2g}" for k in (*figures, "val_loss") if k in mean)
            + (f", scored_on={summary['scored_on']}" if summary.get("scored_on") else ""))
        return
    print_summary(summary, ("status", "steps", *figures, "scored_on", "val_loss", "wall_s", "trainable_params"))


# ----------------------------------------------------------------------------- model and method


def set_trainable(model: torch.nn.Module, cfg: Config) -> None:
    """full: everything; freeze: the last k blocks (or name patterns) + final norm and output layers;
    lora: adapters only (plus a classification head)."""
    lm = model.lm if isinstance(model, ClassifierModel) else model
    if cfg.method == "lora":
        apply_lora(lm, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
    elif cfg.method == "freeze":
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg.freeze.pattern:
            names = _matching_parameters(model, cfg.freeze.pattern)
        else:
            k = cfg.freeze.last_k
            if not 0 < k <= lm.cfg.n_layer:
                raise ConfigError(f"freeze.last_k={k} must be in 1..{lm.cfg.n_layer} (the model's blocks)")
            first = lm.cfg.n_layer - k
            names = [n for n, _ in lm.named_parameters()
                     if n.startswith(("norm.", "lm_head.")) or (n.startswith("blocks.") and int(n.split(".")[1]) >= first)]
            names = [("lm." + n if lm is not model else n) for n in names]
        params = dict(model.named_parameters(remove_duplicate=False))  # lm_head.weight too when tied
        for n in names:
            params[n].requires_grad_(True)
    if isinstance(model, ClassifierModel):
        model.head.requires_grad_(True)


def _matching_parameters(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Parameter names matching freeze.pattern globs. A tied output layer answers to lm_head.weight
    as well as tok_emb.weight, and under a classification head "blocks.1.*" matches "lm.blocks.1.*"."""
    names = []
    for n, _ in model.named_parameters(remove_duplicate=False):
        short = n[3:] if isinstance(model, ClassifierModel) and n.startswith("lm.") else n
        if any(fnmatch.fnmatch(n, pat) or fnmatch.fnmatch(short, pat) for pat in patterns):
            names.append(n)
    if not names:
        some = [n for n, _ in model.named_parameters()]
        raise ConfigError(f"freeze.pattern={patterns} matches no parameter; names look like "
                          f"{', '.join(some[:2] + some[-3:])}")
    return names


def starting_model(cfg: Config) -> str | None:
    """Where the weights start: init_from, or for a resumed run the parent its lineage.json names.
    A resume rebuilds that model before loading its checkpoint: it gives the architecture, and the
    starting weights are the L2-SP anchor and the DPO reference."""
    if cfg.init_from or not cfg.resume:
        return cfg.init_from
    parent = lineage_parent(cfg.resume)
    if parent and not Path(parent).exists():
        raise ConfigError(f"resume={cfg.resume}: this run started from {parent}, which is gone; resuming "
                          f"needs those weights again (they shape the model and anchor L2-SP and DPO)")
    return parent


def _base_path(cfg: Config) -> str | None:
    """The adapter's base model, resolved: init_from, or a resumed run's parent (its lineage)."""
    parent = starting_model(cfg)
    return str(Path(parent).resolve()) if parent else None


def build_task_model(cfg: Config, tok: Tokenizer, n_labels: int) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    start = starting_model(cfg)
    with dist.init_device(cfg):  # under FSDP, ranks > 0 build on the meta device (stages.parent_model)
        lm = parent_model(cfg, start) if start else GPT(resolve_model_config(cfg.model, tok.vocab_size))
        model = ClassifierModel(lm, n_labels) if uses_head(cfg) else lm
        set_trainable(model, cfg)
    return model


def save_final_factory(cfg: Config, tok: Tokenizer, labels: list[str] | None):
    """How model/ is written: a plain model directory (LoRA merged, adapter/ beside it), plus the
    classification head and the label names when there is one. Each directory is written whole under
    a temporary name and then renamed into place (files.atomic_dir): never there with files missing."""

    def task_files(model: torch.nn.Module, directory: Path) -> None:
        """task.json (task, label names, classifier), and head.safetensors when there is a head."""
        if isinstance(model, ClassifierModel):
            from safetensors.torch import save_file
            save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()},
                      str(directory / "head.safetensors"))
        atomic_write_json(directory / "task.json", T.task_info(cfg, labels))

    def save(model: torch.nn.Module, model_dir: Path) -> None:
        lm = model.lm if isinstance(model, ClassifierModel) else model
        state = None
        if lora_layers(lm):
            from safetensors.torch import save_file
            with atomic_dir(model_dir.parent / "adapter") as adapter:
                save_file(lora_state_dict(lm), str(adapter / "adapter.safetensors"))
                atomic_write_json(adapter / "lora.json", {
                    "rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                    "targets": list(cfg.lora.targets), "base": _base_path(cfg)})
                task_files(model, adapter)
            if cfg.lora.save == "adapter":
                return
            state = merged_state(lm)  # the model itself stays unmerged: a DPO reference still works
        save_model_dir(lm, model_dir, tok, state=state, extra_files=lambda d: task_files(model, d))
    return save


# ----------------------------------------------------------------------------- running


def _objective(cfg: Config, model):
    if cfg.task == "preference":
        obj = DPOObjective(model, cfg.finetune.dpo_beta)
    elif uses_head(cfg):
        obj = ClassifierObjective()
    else:
        obj = LMObjective()
    obj.weights = {"replay": cfg.finetune.replay_weight}  # the loop's weight per kind of micro-batch
    return L2SP(obj, model, cfg.finetune.l2sp) if cfg.finetune.l2sp > 0 else obj


def _replay_sampler(cfg: Config, tok: Tokenizer, seq_len: int):
    if not cfg.finetune.replay or cfg.finetune.replay_ratio <= 0:
        return None
    # replay text is read with its own field name: data.text_field names the task records' text field
    stores = [load_source(s, tok, cfg.finetune.replay_text_field, cfg.data.encoding_errors, cfg.data.cache_dir,
                          key="finetune.replay", field_key="finetune.replay_text_field") for s in cfg.finetune.replay]
    return BatchSampler(stores, None, seq_len, cfg.seed + 7)


def run_one(cfg: Config, tok: Tokenizer, train_recs, val_recs, test_recs, labels, log=print,
            teardown: bool = True) -> dict:
    """One fine-tuning run (one fold) in cfg.out_dir. Under torchrun the process group ends with it,
    unless `teardown` is False (cross-validation keeps it for the next fold)."""
    rt = dist.setup(cfg.train.device, cfg.train.precision, cfg.train.threads)
    run_dir = open_run(cfg, rt)
    try:
        return _run_one(cfg, rt, run_dir, tok, train_recs, val_recs, test_recs, labels, log, teardown)
    except BaseException:
        restore_replaced(run_dir, rt)  # does nothing once training has started
        raise


def _run_one(cfg: Config, rt: dist.Runtime, run_dir: Path, tok: Tokenizer, train_recs, val_recs, test_recs,
             labels, log, teardown: bool = True) -> dict:
    """run_one's set-up (model, examples, batches, run files), training and scoring."""
    stats = T.TaskStats()
    model = build_task_model(cfg, tok, len(labels or []))
    lm = model.lm if isinstance(model, ClassifierModel) else model
    ignored = ignored_model_keys(cfg.model, lm.cfg) if starting_model(cfg) else []
    if ignored and rt.is_main:
        log(f"warning: {', '.join(ignored)} ignored: fine-tuning keeps the architecture of "
            f"{starting_model(cfg)} (only model.dropout and model.attn_dropout apply)")
    if rt.is_main:
        _warn_ignored_data_keys(cfg, log)
    if cfg.finetune.max_len > lm.cfg.max_seq_len:  # every split is cut to what the model can read
        if rt.is_main:
            log(f"warning: finetune.max_len={cfg.finetune.max_len} is longer than the model's context; examples "
                f"are cut to {lm.cfg.max_seq_len} tokens (and counted in truncated_examples)")
        cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, max_len=lm.cfg.max_seq_len))
    train_ex = T.encode(train_recs, cfg, tok, labels, stats)
    truncated_train = stats.truncated
    val_ex, test_ex = T.encode(val_recs, cfg, tok, labels, stats), T.encode(test_recs, cfg, tok, labels, stats)
    replay = _replay_sampler(cfg, tok, cfg.finetune.max_len)
    data = T.TaskBatches(train_ex, cfg, tok.pad_id, replay)
    if data.n_replay % rt.world:
        raise ConfigError(f"finetune.replay_ratio={cfg.finetune.replay_ratio} gives {data.n_replay} replay rows "
                          f"per batch, which the {rt.world} processes cannot share evenly; pick a ratio whose "
                          f"rows (train.batch_size x ratio) are a multiple of {rt.world}")
    if cfg.finetune.epochs:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, max_steps=max(1, math.ceil(cfg.finetune.epochs * data.steps_per_epoch))))
        data.cfg = cfg
    objective = _objective(cfg, model)
    device = rt.device
    if rt.is_main:
        save_run_config(cfg, run_dir)
        tok.save(run_dir)
        if not cfg.resume:
            # the labels in the order of the head's outputs: a checkpoint loads as a classifier with them
            ck.write_lineage(run_dir, "finetune", cfg.init_from, task=cfg.task, method=cfg.method, labels=labels,
                             examples={"train": len(train_ex), "val": len(val_ex), "test": len(test_ex)})

    if rt.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"fine-tuning ({cfg.task}, {cfg.method}): {len(train_ex):,} train / {len(val_ex):,} val / "
            f"{len(test_ex):,} test examples, " + (f"labels [{', '.join(labels)}], " if labels else "")
            + f"{n_trainable:,} of {n_params:,} parameters trainable, device {device}")

    def evaluate(m):
        figures = evaluate_task(m, val_ex, cfg, tok, labels, device, objective=objective, rt=rt)
        return {f"val_{k}": v for k, v in figures.items()}

    extra = {"stage": "finetune", "task": cfg.task, "method": cfg.method, "train_examples": len(train_ex),
             "skipped_records": stats.skipped, "truncated_examples": truncated_train}
    # the trackers (TensorBoard, MLflow) are closed once summary.json holds the test figures
    metrics = MetricsLog(run_dir / "metrics.jsonl", rt.is_main, cfg)
    try:
        summary = train(model, cfg, rt, run_dir, data, objective, evaluate if val_ex else None, tok, log, extra,
                        save_final_factory(cfg, tok, labels), scored_after=True, metrics=metrics)
        summary = _score(cfg, rt, run_dir, dist.final_model(model), summary, val_ex, test_ex, tok, labels, objective)
    except BaseException:
        metrics.close(None)  # an error or an interrupt: the trackers' runs end as failed
        raise
    metrics.close(summary)
    ck.unlock_run_dir(run_dir)
    if teardown:
        dist.teardown()
    return summary


def _warn_ignored_data_keys(cfg: Config, log) -> None:
    """The data keys fine-tuning does not read, set away from their defaults: a warning, as continued
    pre-training warns for the tokenizer keys (stages.build_model)."""
    default = type(cfg.data)()
    if cfg.init_from:
        ignored = [f"data.{k}={getattr(cfg.data, k)!r}" for k in ("tokenizer", "vocab_size")
                   if getattr(cfg.data, k) != getattr(default, k)]
        if ignored:
            log(f"warning: {', '.join(ignored)} ignored: the run keeps the tokenizer of init_from={cfg.init_from}")
    if cfg.data.weights != default.weights:
        log(f"warning: data.weights={cfg.data.weights!r} ignored: fine-tuning draws its examples from all the "
            "records of data.train alike; to mix general text in, use finetune.replay=[FILE] with "
            "finetune.replay_ratio")


def _score(cfg: Config, rt, run_dir: Path, model, summary: dict, val_ex, test_ex, tok, labels, objective) -> dict:
    """Score the final model (`model`: under FSDP rank 0's plain copy) on the test set, or on val, with
    generation; write predictions.jsonl and the finished summary.json."""
    device = rt.device
    if summary["status"] in ("completed", "early_stopped") and rt.is_main:
        final, per_example = {}, {}
        plain = "test" if test_ex else "val"
        # the loop's last evaluation scored the final model on val, unless early stopping went back to
        # an earlier (best) model: then val is scored again, so its figures are the final model's
        scored = any(k.startswith("val_") for k in summary) and summary.get("best_step") in (None, summary["steps"])
        for split, ex in (("val", val_ex), ("test", test_ex)):
            if split == "val" and test_ex and scored:
                continue  # the test set is what is reported
            # every test example is generated for; finetune.eval_examples bounds the validation set's cost
            cfg_split = cfg if split == "val" else dataclasses.replace(
                cfg, finetune=dataclasses.replace(cfg.finetune, eval_examples=len(ex)))
            final.update({f"{split}_{k}": v for k, v in evaluate_task(
                model, ex, cfg_split, tok, labels, device, generation=True, objective=objective,
                per_example=per_example if split == plain else None).items()})
        write_predictions(run_dir / "predictions.jsonl", per_example)
        final.update({k[len(plain) + 1:]: v for k, v in final.items() if k.startswith(plain + "_")})
        if test_ex or val_ex:
            final["scored_on"] = plain  # the split of the plain-named figures (accuracy, ...)
        summary = _round({**summary, **final})  # as summary.json holds it (what a study reads back)
        atomic_write_json(run_dir / "summary.json", summary)
    return summary


def hold_out(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held-out) record indices, a seeded `fraction` of n held out (at least one, never all).
    A fraction 1/k holds out the first of the k folds that cross-validation with the seed makes."""
    k = round(1 / fraction)
    if k >= 2 and abs(k * fraction - 1) < 1e-9:
        return T.split_folds(n, k, seed)[0]
    order = list(range(n))
    random.Random(seed).shuffle(order)
    m = min(max(1, round(n * fraction)), n - 1)
    return sorted(order[m:]), sorted(order[:m])


def _records(cfg: Config, log=print) -> tuple[list, list, list, list[str] | None, T.TaskStats]:
    stats = T.TaskStats()
    d = cfg.data
    train_recs = T.read_records(d.train, cfg.task, d, stats, "data.train", log)
    val_recs = T.read_records(d.val, cfg.task, d, stats, "data.val", log)
    test_recs = T.read_records(d.test, cfg.task, d, stats, "data.test", log)
    if not test_recs and d.test_fraction > 0:  # a fixed split: the test set does not depend on the seed
        rest, held = hold_out(len(train_recs), d.test_fraction, 0)
        train_recs, test_recs = [train_recs[i] for i in rest], [train_recs[i] for i in held]
    if not val_recs and d.val_fraction > 0 and not cfg.finetune.cv:
        tr, va = hold_out(len(train_recs), d.val_fraction, cfg.seed)
        train_recs, val_recs = [train_recs[i] for i in tr], [train_recs[i] for i in va]
    labels = None
    if cfg.task == "classification":  # the task's label set, whatever subset of it is used for training
        everything = train_recs + val_recs + test_recs
        labels = list(d.labels) if d.labels else label_names({r["label"] for r in everything})
        if d.labels:
            ids_to_names(everything, labels, d.on_error)
    train_recs = T.subsample(train_recs, d.max_examples, cfg.seed)
    return train_recs, val_recs, test_recs, labels, stats


def run_finetune(cfg: Config, log=print) -> dict:
    """Fine-tune (or cross-validate) as the config says; returns the summary."""
    if cfg.task is None:
        raise ConfigError("pretune finetune needs task=classification|instruction|text2text|preference")
    if not cfg.data.train:
        raise ConfigError("pretune finetune needs data.train (JSONL, CSV or TSV records)")
    done = finished_run(cfg, log)
    if done is not None:
        return done
    if cfg.resume:
        tok = Tokenizer.load(cfg.resume)
    elif cfg.init_from:
        tok = parent_tokenizer(cfg.init_from)
    elif cfg.data.tokenizer in ("char", "bpe"):
        raise ConfigError("fine-tuning from scratch needs a tokenizer: set data.tokenizer to a tokenizer.json "
                          "(for a fair comparison, the pre-trained model's), or give init_from")
    else:
        tok = build_tokenizer(cfg.data, log)
    train_recs, val_recs, test_recs, labels, stats = _records(cfg, log)
    k, fold = cfg.finetune.cv, cfg.finetune.fold
    if k:
        folds = T.split_folds(len(train_recs), k, cfg.seed)
        if fold is None:
            return _cross_validate(cfg, tok, train_recs, folds, test_recs, labels, stats, log)
        tr, va = folds[fold]  # one fold (a fold's own config, as when it is resumed by itself)
        train_recs, val_recs = [train_recs[j] for j in tr], [train_recs[j] for j in va]
    summary = run_one(cfg, tok, train_recs, val_recs, test_recs, labels, log)
    return _count_read(summary, stats, Path(cfg.resume or cfg.out_dir))


def _count_read(summary: dict, stats: T.TaskStats, run_dir: Path) -> dict:
    """Add what reading the records found to summary.json: the records skipped while reading
    (data.on_error=skip) to those skipped while encoding, and the invalid UTF-8 byte sequences
    replaced by U+FFFD (replaced_chars, as pre-training's token shards count them). Under torchrun
    only rank 0 writes it: the other ranks' summaries lack the test figures, which rank 0 alone scores."""
    if (stats.skipped or stats.replaced) and int(os.environ.get("RANK", "0")) == 0:
        summary = dict(summary, skipped_records=summary.get("skipped_records", 0) + stats.skipped)
        if stats.replaced:
            summary["replaced_chars"] = stats.replaced
        summary = _round(summary)
        atomic_write_json(run_dir / "summary.json", summary)
    return summary


def _cross_validate(cfg: Config, tok: Tokenizer, train_recs, folds, test_recs, labels, stats, log) -> dict:
    """k folds in out_dir/fold-i, then each figure's mean and standard deviation across them.

    The root holds the run's config.yaml, tokenizer and lineage, so `resume=ROOT` continues: finished
    folds are read back, an interrupted one resumes from its checkpoint, the rest start afresh. Each
    fold's config names its fold (finetune.fold), so `resume=ROOT/fold-i` finds the same split too.
    A fold that stops before it finishes (train.stop_after) stops the cross-validation there, as an
    interruption would: the root summary says "stopped", names the fold, and has no mean or std.

    Under torchrun every rank runs every fold together; rank 0 alone writes the root (its set-up and
    summary.json) and decides what each fold does (read back, resumed or started), for all of them."""
    root = Path(cfg.resume or cfg.out_dir)
    parent = starting_model(cfg)
    rt = dist.setup(cfg.train.device, cfg.train.precision, cfg.train.threads)  # one process group for all folds
    if rt.is_main:
        if cfg.data.val:
            log(f"warning: finetune.cv={len(folds)} validates on folds of data.train; data.val is not used")
        if not cfg.resume:
            ck.prepare_out_dir(root, cfg.overwrite, False, keep=inputs_of(cfg))
            save_run_config(cfg, root)
            tok.save(root)
            ck.write_lineage(root, "finetune", parent, task=cfg.task, method=cfg.method, cv=len(folds))
    dist.barrier(rt)  # the root is there before any rank looks into it
    results = []
    for i, (tr, va) in enumerate(folds):
        fold_dir = root / f"fold-{i}"
        done, started, exists = dist.broadcast_object(_fold_state(fold_dir) if rt.is_main else None, rt)
        if done:
            log(f"fold {i}: finished earlier, read from {fold_dir}")
            results.append(done)
            continue
        fold_cfg = dataclasses.replace(
            cfg, out_dir=str(fold_dir), resume=str(fold_dir) if started else None,
            init_from=None if started else parent, overwrite=exists and not started,
            finetune=dataclasses.replace(cfg.finetune, fold=i))
        summary = run_one(fold_cfg, tok, [train_recs[j] for j in tr], [train_recs[j] for j in va], test_recs,
                          labels, log, teardown=False)
        if summary.get("status") not in ("completed", "early_stopped"):
            log(f"fold {i}: {summary.get('status')} at step {summary.get('steps')}; resume={root} continues "
                f"the cross-validation from there")
            summary = {"status": "stopped", "cv": len(folds),
                       "folds": [str(root / f"fold-{j}") for j in range(len(folds))], "finished_folds": i,
                       "stopped_fold": i, "stopped_fold_status": summary.get("status"),
                       "fold_validation_sizes": [len(va) for _, va in folds]}
            return _root_summary(root, _round(summary), rt)
        results.append(_count_read(summary, stats, fold_dir))
    names = [n for n, v in results[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
             and all(isinstance(r.get(n), (int, float)) for r in results)]
    summary = {"status": "completed", "cv": len(folds), "folds": [str(root / f"fold-{i}") for i in range(len(folds))],
               "mean": {n: statistics.fmean(r[n] for r in results) for n in names},
               "std": {n: statistics.stdev([r[n] for r in results]) for n in names},
               "fold_validation_sizes": [len(va) for _, va in folds]}
    if results[0].get("scored_on"):  # each fold's figures: the test set's, or its own validation fold's
        summary["scored_on"] = results[0]["scored_on"]
    return _root_summary(root, _round(summary), rt)


def _fold_state(fold_dir: Path) -> tuple[dict, bool, bool]:
    """(its summary when the fold has finished else {}, whether it has started, whether its directory exists)."""
    done = json.loads((fold_dir / "summary.json").read_text()) if (fold_dir / "summary.json").is_file() else {}
    if done.get("status") in ("completed", "early_stopped"):
        return done, False, True
    started = ck.latest_checkpoint(fold_dir) is not None and (fold_dir / "config.yaml").is_file()
    return {}, started, fold_dir.exists()


def _root_summary(root: Path, summary: dict, rt: dist.Runtime) -> dict:
    """Write the cross-validation's summary.json (rank 0), then end the process group of its folds.
    Under torchrun the other ranks' fold figures lack the test set's (rank 0 alone scores): every rank
    returns rank 0's summary."""
    if rt.is_main:
        atomic_write_json(root / "summary.json", summary)
    summary = dist.broadcast_object(summary, rt)
    dist.teardown()
    return summary
