"""Semantic checks of a run's config (`validate_run`): every problem is collected, each naming the
key, the value and the fix, before any data is read or any model is built."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pretune.config import Config


def validate_run(cfg: Config) -> list[str]:
    """Semantic checks of a training run; every problem is returned, each naming key and fix."""
    from pretune.config import BPE_MIN_VOCAB, TASKS, OptimConfig, eval_figures

    p: list[str] = []
    t, o, d = cfg.train, cfg.optim, cfg.data

    def positive(key: str, value, allow_zero=False, fix: str = ""):
        """`value` (None: unset, not checked) must be a finite number > 0 (>= 0 with allow_zero):
        NaN fails both `< 0` and `== 0`, so it is named apart."""
        if value is not None and (not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero)):
            p.append(f"{key}={value} must be {'a finite number ' if not math.isfinite(value) else ''}"
                     f"{'>= 0' if allow_zero else '> 0'}" + (f"; {fix}" if fix else ""))

    positive("train.max_steps", t.max_steps)
    positive("train.batch_size", t.batch_size)
    positive("train.micro_batch_size", t.micro_batch_size)
    positive("train.seq_len", t.seq_len)
    positive("train.eval_every", t.eval_every, allow_zero=True)
    positive("train.save_every", t.save_every, allow_zero=True)
    positive("train.log_every", t.log_every)
    positive("train.keep_last", t.keep_last)
    positive("train.grad_clip", t.grad_clip, allow_zero=True)
    positive("train.eval_batch_size", t.eval_batch_size)
    positive("train.eval_tokens", t.eval_tokens, fix="set train.eval_every=0 to turn evaluations off")
    positive("train.threads", t.threads, fix="leave train.threads unset (null) for torch's default")
    positive("optim.lr", o.lr)
    positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    positive("optim.eps", o.eps, fix="AdamW's epsilon, for example 1e-8")
    positive("optim.weight_decay", o.weight_decay, allow_zero=True, fix="0 turns weight decay off")
    for key in ("beta1", "beta2"):
        beta = getattr(o, key)
        if not 0 <= beta < 1:
            p.append(f"optim.{key}={beta} must be in [0, 1): AdamW's moment decay "
                     f"(for example {getattr(OptimConfig, key)})")
    positive("meter.device_power_w", cfg.meter.device_power_w, allow_zero=True,
             fix="leave it unset (null) for a per-device guess")
    positive("meter.grid_gco2_per_kwh", cfg.meter.grid_gco2_per_kwh, allow_zero=True)
    p += _model_problems(cfg)
    if t.micro_batch_size and t.batch_size % t.micro_batch_size:
        p.append(f"train.batch_size={t.batch_size} is not a multiple of train.micro_batch_size="
                 f"{t.micro_batch_size}; pick a micro-batch size that divides it")
    choices = {"train.precision": (t.precision, ("auto", "fp32", "bf16")),
               "train.compile": (t.compile, ("auto", "true", "false")),
               "optim.schedule": (o.schedule, ("cosine", "wsd", "constant")),
               "data.encoding_errors": (d.encoding_errors, ("replace", "strict")),
               "dist.strategy": (cfg.dist.strategy, ("ddp", "fsdp")),
               "method": (cfg.method, ("full", "freeze", "lora")),
               "finetune.classifier": (cfg.finetune.classifier, ("head", "verbalizer")),
               "finetune.truncation": (cfg.finetune.truncation, ("left", "right")),
               "finetune.turns": (cfg.finetune.turns, ("last", "all")),
               "lora.save": (cfg.lora.save, ("merged", "adapter")),
               "data.on_error": (d.on_error, ("fail", "skip"))}
    if cfg.task is not None and cfg.task not in TASKS:
        p.append(f"task={cfg.task!r} is not one of {', '.join(TASKS)}")
    if cfg.finetune.cv == 1 or cfg.finetune.cv < 0:
        p.append(f"finetune.cv={cfg.finetune.cv}: give k >= 2 folds, or 0 for no cross-validation")
    f = cfg.finetune
    if not 0 <= f.replay_ratio < 1:
        p.append(f"finetune.replay_ratio={f.replay_ratio} must be in [0, 1)")
    elif f.replay and t.batch_size:
        n_replay = round(t.batch_size * f.replay_ratio)  # whole rows of each batch
        if n_replay >= t.batch_size:
            p.append(f"finetune.replay_ratio={f.replay_ratio} leaves no task rows in a batch of "
                     f"train.batch_size={t.batch_size}; lower it or raise the batch size")
        elif f.replay_ratio > 0 and n_replay == 0:
            p.append(f"finetune.replay_ratio={f.replay_ratio} rounds to no replay rows in a batch of "
                     f"train.batch_size={t.batch_size}; raise one of them (a row needs a ratio of at least "
                     f"{0.5 / t.batch_size:.3g})")
    positive("finetune.replay_weight", f.replay_weight, allow_zero=True)
    if f.replay_ratio > 0 and not f.replay:
        p.append("finetune.replay_ratio > 0 needs finetune.replay (general text files)")
    if d.labels:
        from pretune.data.labels import duplicate_labels

        twice = duplicate_labels(d.labels)
        if twice:
            p.append(f"data.labels={d.labels} lists {', '.join(map(repr, twice))} more than once (labels are compared "
                     "as records' labels are: stripped); name each class once, in id order")
    positive("finetune.epochs", f.epochs)
    positive("finetune.l2sp", f.l2sp, allow_zero=True)
    positive("finetune.dpo_beta", f.dpo_beta)
    positive("finetune.max_new_tokens", f.max_new_tokens)
    positive("finetune.eval_examples", f.eval_examples, allow_zero=True)
    positive("lora.rank", cfg.lora.rank)
    positive("lora.alpha", cfg.lora.alpha, fix="the update is scaled by lora.alpha / lora.rank (for example 16)")
    positive("data.max_examples", d.max_examples)
    positive("data.shard_tokens", d.shard_tokens)
    if d.tokenizer == "bpe" and d.vocab_size < BPE_MIN_VOCAB:
        p.append(f"data.vocab_size={d.vocab_size} is too small for data.tokenizer=bpe: byte-level BPE needs "
                 f"at least {BPE_MIN_VOCAB} (256 byte tokens and 4 special tokens); set "
                 f"data.vocab_size >= {BPE_MIN_VOCAB}")
    if f.max_len < 2:
        p.append(f"finetune.max_len={f.max_len}: an example needs at least 2 tokens (a prompt token and a target)")
    if not 0 <= cfg.lora.dropout < 1:
        p.append(f"lora.dropout={cfg.lora.dropout} must be in [0, 1)")
    if f.fold is not None and not (f.cv and 0 <= f.fold < f.cv):
        p.append(f"finetune.fold={f.fold} needs finetune.cv=k and 0 <= fold < k (cross-validation sets it)")
    if t.patience is not None and not t.early_stop_metric:
        p.append("train.patience needs train.early_stop_metric (for example val_loss or val_accuracy)")
    if t.patience is not None and t.patience < 1:
        p.append(f"train.patience={t.patience} must be >= 1: the evaluations without improvement after which "
                 "the run stops; leave train.patience unset (null) to keep the best model without stopping early")
    if t.early_stop_metric and not t.eval_every:
        p.append(f"train.early_stop_metric={t.early_stop_metric!r} needs evaluations, but train.eval_every=0 "
                 "turns them off; set train.eval_every to N > 0, or unset train.early_stop_metric")
    elif t.early_stop_metric and not d.val and not d.val_fraction and not cfg.finetune.cv:
        p.append(f"train.early_stop_metric={t.early_stop_metric!r} needs validation data, but data.val is empty "
                 "and data.val_fraction=0; give data.val or data.val_fraction > 0, or unset train.early_stop_metric")
    watched = eval_figures(cfg)
    if t.early_stop_metric and t.early_stop_metric not in watched:
        p.append(f"train.early_stop_metric={t.early_stop_metric!r} is not an evaluation figure of this run; "
                 f"one of {', '.join(watched)}")
    for key, (value, options) in choices.items():
        if value not in options:
            p.append(f"{key}={value!r} is not one of {', '.join(options)}")
    if not 0 < o.decay_fraction <= 1:
        p.append(f"optim.decay_fraction={o.decay_fraction} must be in (0, 1]: the share of train.max_steps "
                 "that optim.schedule=wsd spends decaying at the end (for example 0.2)")
    if not 0 <= o.min_lr_ratio <= 1:
        p.append(f"optim.min_lr_ratio={o.min_lr_ratio} must be between 0 and 1")
    if not 0 <= d.test_fraction < 1:
        p.append(f"data.test_fraction={d.test_fraction} must be in [0, 1)")
    if not 0 <= d.val_fraction < 1:
        p.append(f"data.val_fraction={d.val_fraction} must be in [0, 1)")
    if d.weights is not None and len(d.weights) != len(d.train):
        p.append(f"data.weights has {len(d.weights)} entries but data.train has {len(d.train)} sources; "
                 "give one weight per source")
    if d.weights is not None and (any(not (math.isfinite(w) and w >= 0) for w in d.weights) or sum(d.weights) <= 0):
        p.append(f"data.weights={d.weights} must be finite, non-negative and not all zero")
    if cfg.resume and cfg.init_from:
        p.append("resume and init_from are both set: resume continues a run, init_from starts a new "
                 "one from a parent's weights; keep one")
    if t.stop_after is not None and not 0 < t.stop_after <= t.max_steps:
        p.append(f"train.stop_after={t.stop_after} must be in 1..train.max_steps")
    for key in ("dropout", "attn_dropout"):
        value = getattr(cfg.model, key)
        if not 0 <= value < 1:
            p.append(f"model.{key}={value} must be in [0, 1)")
    if cfg.track.tensorboard or cfg.track.mlflow:  # a missing package is found before any work
        from pretune.train.tracking import tracker_problems
        p += tracker_problems(cfg)
    return p


def _model_problems(cfg: Config) -> list[str]:
    """The architecture's sizes (>= 1), then, when this config fixes the architecture (no init_from:
    the parent's own is only known when it is loaded, where finetune.set_trainable checks
    freeze.last_k against it), the preset and the shape checks of resolve_model_config, and
    freeze.last_k against the resolved model.n_layer."""
    from pretune.errors import ConfigError
    from pretune.model.config import resolve_model_config

    m, p = cfg.model, []
    for key in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "head_dim", "max_seq_len"):
        value = getattr(m, key)
        if value is not None and value < 1:
            source = {"vocab_size": "the tokenizer", "head_dim": "model.d_model // model.n_head",
                      "n_kv_head": "model.n_head"}.get(key, "model.preset")
            p.append(f"model.{key}={value} must be >= 1; leave it unset (null) to take it from {source}")
    for key in ("rope_theta", "norm_eps"):
        value = getattr(m, key)
        if value is not None and not (math.isfinite(value) and value > 0):
            p.append(f"model.{key}={value} must be a finite number > 0; leave it unset (null) for the default")
    last_k = cfg.freeze.last_k
    if last_k < 1:
        p.append(f"freeze.last_k={last_k} must be >= 1: the number of last blocks to train (or give freeze.pattern)")
    if p or cfg.init_from:
        return p
    try:
        arch = resolve_model_config(m, m.vocab_size or 1)  # the vocabulary is the tokenizer's: not known yet
    except ConfigError as e:
        return list(e.problems)
    # a resumed fine-tuning run's config.yaml holds the model keys as given, not its parent's architecture
    if cfg.method == "freeze" and not cfg.freeze.pattern and not cfg.resume and last_k > arch.n_layer:
        p.append(f"freeze.last_k={last_k} must be in 1..{arch.n_layer} (model.n_layer, the model's blocks)")
    return p
