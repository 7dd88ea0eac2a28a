"""Typed run configuration: dataclasses, YAML + KEY=VALUE overrides, strict validation.

Every field documents itself with a docstring. Loading collects every problem (unknown keys with a
"did you mean" hint, wrong types, impossible values) and reports them all at once, naming the key
and the fix, before any model is built. A KEY=VALUE override is read by the type of its field
(config_io.parse_overrides): text stays text, null or None unsets an optional key; the semantic
checks live in config_checks.validate_run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretune.config_checks import validate_run
from pretune.config_io import deep_merge, from_dict, parse_overrides, read_yaml
from pretune.errors import ConfigError
from pretune.model.config import ModelConfig


@dataclass
class DataConfig:
    """Where the text (or task records) comes from and how it is tokenised."""

    train: list[str] = field(default_factory=list)
    """Training sources: files, globs or directories of .txt / .jsonl / .csv / .tsv."""
    val: list[str] = field(default_factory=list)
    """Validation sources; empty holds out the last `val_fraction` of each training source."""
    weights: list[float] | None = None
    """Mixture weights, one per training source (for example [0.75, 0.25] for 25% replay)."""
    val_fraction: float = 0.1
    """Share of each source's tokens held out (from its end) when `val` is empty."""
    test_fraction: float = 0.0
    """Fine-tuning: share of the training records held out as the test set when `test` is empty (the
    same records whatever the seed, so runs with different seeds are scored on the same examples)."""
    tokenizer: str = "bpe"
    """'char', 'bpe' (byte-level BPE trained on the corpus) or a path to a tokenizer.json."""
    vocab_size: int = 4096
    """Vocabulary size for a BPE tokenizer trained here (at least 260: the 256 byte tokens and the 4
    special tokens)."""
    text_field: str = "text"
    """Field holding the text in JSONL/CSV records."""
    encoding_errors: str = "replace"
    """Bytes that are not UTF-8: 'replace' (U+FFFD, counted and reported) or 'strict' (fail, naming
    the file and byte offset)."""
    cache_dir: str | None = None
    """Where token shards are cached by content hash; default $PRETUNE_CACHE or ~/.cache/pretune."""
    shard_tokens: int = 1 << 27
    """Tokens per shard file (> 0)."""
    test: list[str] = field(default_factory=list)
    """Fine-tuning: test records, evaluated once with the final (or best) model."""
    label_field: str = "label"
    """Classification: field with the label (a name or an integer id)."""
    prompt_field: str = "prompt"
    """Instruction / preference: field with the prompt."""
    response_field: str = "response"
    """Instruction: field with the response."""
    messages_field: str = "messages"
    """Instruction: field with a list of {role, content} messages (used when present)."""
    source_field: str = "source"
    """Text-to-text: field with the input text."""
    target_field: str = "target"
    """Text-to-text: field with the output text."""
    chosen_field: str = "chosen"
    """Preference: field with the preferred response."""
    rejected_field: str = "rejected"
    """Preference: field with the rejected response."""
    labels: list[str] | None = None
    """Classification: the label names in id order; None collects them from the training data. In a YAML
    file, quote words YAML reads as booleans or numbers: ['no', 'yes']."""
    on_error: str = "fail"
    """A malformed task record: 'fail' (name file, line and field) or 'skip' (count it in summary.json)."""
    max_examples: int | None = None
    """Use at most this many training records (the first after a seeded shuffle): data efficiency."""


@dataclass
class TrainConfig:
    """The optimisation loop."""

    max_steps: int = 1000
    """Optimiser steps to run (the schedule is laid over this many)."""
    batch_size: int = 32
    """Sequences per optimiser step, across all ranks (split into micro-batches)."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward pass on one rank; None means the whole batch at once."""
    seq_len: int | None = None
    """Training context length; None means model.max_seq_len."""
    eval_every: int = 250
    """Evaluate on the validation data every N steps (and at the end); 0 turns it off."""
    eval_tokens: int = 1_000_000
    """At most this many validation tokens per evaluation (the first ones, so it is deterministic)."""
    eval_batch_size: int = 64
    """Sequences per evaluation forward pass."""
    log_every: int = 10
    """Write a metrics line every N steps."""
    save_every: int = 500
    """Write a resumable checkpoint every N steps (and at the end); 0 keeps only the final model."""
    keep_last: int = 2
    """How many checkpoints to keep."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""
    precision: str = "auto"
    """'auto' (bf16 autocast on CUDA, fp32 on CPU), 'fp32' or 'bf16'."""
    compile: str | bool = "auto"
    """torch.compile the model: 'auto' (on for CUDA, off for CPU), 'true' or 'false' (a YAML true/false
    is taken as 'true'/'false')."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda' or 'cuda:N'."""
    threads: int | None = None
    """CPU threads for torch (set once); None keeps torch's default."""
    progress: bool = True
    """Show a progress bar."""
    stop_after: int | None = None
    """Stop after this step as if interrupted, keeping the schedule of max_steps (for resume tests)."""
    early_stop_metric: str | None = None
    """Keep the best model by this evaluation figure (val_loss, val_accuracy, val_macro_f1, ...); needs
    evaluations (train.eval_every > 0) and validation data."""
    patience: int | None = None
    """With early_stop_metric: stop after this many evaluations without improvement (>= 1); None
    never stops early (the best model is still kept). Needs evaluations (train.eval_every > 0)."""

    def __post_init__(self):
        if isinstance(self.compile, bool):  # `compile: false` in a YAML file: the text it stands for
            self.compile = "true" if self.compile else "false"


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr`."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (not on norms or biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int | None = None
    """Linear warmup steps; None: a tenth of the run's steps, at most 100."""
    schedule: str = "cosine"
    """'cosine' (warmup then cosine to min), 'wsd' (warmup, stable, linear decay) or 'constant'."""
    decay_fraction: float = 0.2
    """For 'wsd': the share of steps spent decaying linearly to the minimum at the end, in (0, 1]. The
    decay starts no earlier than the end of the warmup, so the lr always reaches its peak: when warmup
    and decay together exceed train.max_steps, the decay is shortened to the steps after the warmup."""


@dataclass
class MeterConfig:
    """How cost is measured."""

    device_power_w: float | None = None
    """The run's power draw in watts, used to estimate energy when no counter is readable; None: a
    per-device guess (on a CPU, 10 W per core the run uses)."""
    grid_gco2_per_kwh: float = 400.0
    """Carbon intensity of the electricity, grams of CO2 per kWh."""


@dataclass
class TrackConfig:
    """Optional experiment trackers; metrics.jsonl and summary.json are always written."""

    tensorboard: bool = False
    """Also write the metrics as TensorBoard events into OUT_DIR/tensorboard (needs pretune[track])."""
    mlflow: bool = False
    """Also log params, metrics and summary to MLflow (needs pretune[track])."""
    mlflow_uri: str | None = None
    """MLflow tracking URI; None uses MLFLOW_TRACKING_URI or a local store in ./mlruns."""
    experiment: str = "pretune"
    """MLflow experiment name."""


@dataclass
class DistConfig:
    """Data parallelism under torchrun (one process is plain training)."""

    strategy: str = "ddp"
    """'ddp' (replicate the model, all-reduce gradients) or 'fsdp' (FSDP2: shard parameters,
    gradients and optimiser state per block)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass to save memory."""


@dataclass
class LoRAConfig:
    """Low-rank adapters (method=lora)."""

    rank: int = 8
    """Adapter rank r."""
    alpha: float = 16.0
    """Scale numerator: the update is (alpha / r) B A."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"])
    """Linear layers to adapt: leaf names or glob patterns on full names."""
    save: str = "merged"
    """What model/ holds: 'merged' weights or the 'adapter' alone (adapter/ is always written)."""


@dataclass
class FreezeConfig:
    """Train only part of the model (method=freeze)."""

    last_k: int = 2
    """Train the last k blocks plus the final norm and the output head (a head tied to the input
    embedding stays frozen: name it in freeze.pattern to train it)."""
    pattern: list[str] = field(default_factory=list)
    """Instead of last_k: train the parameters whose names match these glob patterns
    (blocks.3.*, norm.weight, lm_head.weight; a tied lm_head.weight is the embedding)."""


@dataclass
class FinetuneConfig:
    """Task fine-tuning: formatting, objective and regularisation."""

    classifier: str = "head"
    """Classification: 'head' (linear head on the last token's hidden state) or 'verbalizer'
    (the language model scores each label word)."""
    max_len: int = 256
    """Longest example in tokens; longer ones are truncated (and counted)."""
    truncation: str = "left"
    """Which end of the prompt to cut: 'left' keeps the end of the prompt next to the answer."""
    prompt_loss: bool = False
    """Also train on prompt tokens (by default only response tokens carry loss)."""
    turns: str = "last"
    """Instruction records with several assistant turns: 'last' puts the loss on the last assistant
    turn only; 'all' on every assistant turn (system and user turns stay masked)."""
    epochs: float | None = None
    """Set train.max_steps from this many passes over the training records."""
    l2sp: float = 0.0
    """L2-SP strength: lambda/2 * ||w - w0||^2 pulls weights toward the pre-trained ones."""
    replay: list[str] = field(default_factory=list)
    """General text mixed into training with its language-model loss, against forgetting."""
    replay_text_field: str = "text"
    """Field holding the text in JSONL/CSV replay files (data.text_field names the task records'
    text field, which the replay text need not share); plain-text files do not use it."""
    replay_ratio: float = 0.0
    """Share of each batch's sequences that are replay text."""
    replay_weight: float = 1.0
    """Weight of the replay text's mean token loss beside the task's mean loss (loss = task +
    replay_weight x replay): higher holds on to general text harder."""
    cv: int = 0
    """k-fold cross-validation over the training records (k >= 2); reports mean and std."""
    fold: int | None = None
    """With cv=k: run fold i alone (cross-validation sets it in each fold's config, so a fold resumes
    on its own split); None runs all k."""
    dpo_beta: float = 0.1
    """Preference: DPO temperature beta."""
    max_new_tokens: int = 64
    """Generation tasks: tokens generated per example when scoring."""
    eval_examples: int = 200
    """At most this many validation examples per evaluation of generation metrics."""


@dataclass
class Config:
    """A whole run: `pretune VERB [CONFIG.yaml] [KEY=VALUE ...]`."""

    out_dir: str = "runs/run"
    """Run directory; an existing run there is refused unless overwrite=true or resume is set."""
    seed: int = 1337
    """Seed for data order, initialisation and dropout."""
    init_from: str | None = None
    """Start from this run or model directory's weights (continued pre-training, fine-tuning)."""
    resume: str | None = None
    """Continue the interrupted run in this directory exactly where its last checkpoint stopped."""
    overwrite: bool = False
    """Allow replacing an existing run in out_dir."""
    task: str | None = None
    """Fine-tuning task: 'classification', 'instruction', 'text2text' or 'preference'."""
    method: str = "full"
    """Fine-tuning method: 'full', 'freeze' (last layers) or 'lora'."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    meter: MeterConfig = field(default_factory=MeterConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# ----------------------------------------------------------------------------- loading


def load_config(cls: type = Config, path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None, what: str | None = None):
    """`base`, then the YAML file, then KEY=VALUE overrides (each read by its field's type in `cls`),
    then strict validation: every problem at once, as one ConfigError. `what` names the command the
    keys are for (`pretune generate`), in the answer to a key it does not have."""
    data = dict(base or {})
    if path is not None:
        data = deep_merge(data, read_yaml(path))
    data = deep_merge(data, parse_overrides(overrides or [], cls))  # each value read by its field's type
    cfg = from_dict(cls, data, what=what)
    # Semantic checks: a registered validator, or the config class's own problems() method.
    problems = _VALIDATORS[cls](cfg) if cls in _VALIDATORS else (
        cfg.problems() if callable(getattr(cfg, "problems", None)) else [])
    if problems:
        raise ConfigError(problems)
    return cfg


TASKS = ("classification", "instruction", "text2text", "preference")
# A byte-level BPE vocabulary holds every byte and data.tokenizer.SPECIALS (BOS, EOS, PAD, UNK); a smaller
# data.vocab_size is silently raised to this (not imported here: config stays free of `tokenizers`).
BPE_MIN_VOCAB = 256 + 4


def eval_figures(cfg: Config) -> tuple[str, ...]:
    """The figures a run's evaluations report (what train.early_stop_metric can watch)."""
    if cfg.task == "classification":
        return ("val_accuracy", "val_macro_f1") + (("val_loss",) if cfg.finetune.classifier == "head" else ())
    if cfg.task == "preference":
        return ("val_loss", "val_pref_accuracy", "val_reward_accuracy", "val_reward_margin")
    if cfg.task in ("instruction", "text2text"):
        return ("val_loss", "val_ppl")
    return ("val_loss", "val_ppl", "val_bpb")


# The keys only fine-tuning reads: whole sections, and the task records' data keys.
FINETUNE_SECTIONS = ("lora", "freeze", "finetune")
FINETUNE_DATA_KEYS = ("test", "test_fraction", "label_field", "prompt_field", "response_field", "messages_field",
                      "source_field", "target_field", "chosen_field", "rejected_field", "labels", "on_error",
                      "max_examples")


def is_finetune_key(key: str) -> bool:
    """Whether the dotted key (lora.rank, data.test, task) is read by fine-tuning alone."""
    section, _, name = key.partition(".")
    return (key in ("task", "method") or section in FINETUNE_SECTIONS
            or (section == "data" and name in FINETUNE_DATA_KEYS))


def finetune_only_keys(cfg: Config) -> list[str]:
    """The fine-tuning keys (task, method, lora.*, freeze.*, finetune.*, the task records' data.* keys)
    set away from their defaults: `pretune pretrain` does not read them, so giving them there is a
    mistake worth naming."""
    default = Config()
    keys = [k for k in ("task", "method") if getattr(cfg, k) != getattr(default, k)]
    for section in FINETUNE_SECTIONS:
        mine, base = getattr(cfg, section), getattr(default, section)
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(mine)
                 if getattr(mine, f.name) != getattr(base, f.name)]
    keys += [f"data.{name}" for name in FINETUNE_DATA_KEYS if getattr(cfg.data, name) != getattr(default.data, name)]
    return keys


_VALIDATORS: dict[type, Any] = {Config: validate_run}
