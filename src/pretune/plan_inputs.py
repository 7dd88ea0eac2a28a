"""What run a `pretune plan` config describes, found as the run itself would find it.

- The config: with `resume=RUN`, the run's own config.yaml as `pretune pretrain|finetune resume=RUN`
  reads it (cli.run_config, which also refuses what a resume cannot change).
- The device: `gpu=` when given; else the CPU when train.device=cpu; else this machine's GPU when
  it is in the peak table (train.meter.PEAK_FLOPS), else an H100 with a note; with no GPU here and
  train.device=auto, the CPU (what the run would use), with a note.
- The architecture and vocabulary: the resumed run's (its config.yaml and tokenizer), init_from's
  (or a resumed fine-tuning run's parent), data.tokenizer's tokenizer.json; a char tokenizer that
  the run would train is counted on data.train as the run counts it (every distinct character of the
  text it trains on, plus the special tokens) when that text is at most CHAR_COUNT_MAX_BYTES, else
  256 is assumed and said; a BPE tokenizer to train is planned at data.vocab_size (its most).
- A classification head (task=classification, finetune.classifier=head): nn.Linear(d_model,
  n_labels) with a bias, n_labels from data.labels, else from the records (as the run collects
  them) when they are small, else 2, said to be assumed.
- The checks of the run that need the architecture: train.seq_len within the model's context, and
  the fine-tuning method applied (finetune.set_trainable) to the model built on the meta device
  (nothing allocated): freeze.last_k in range, a freeze.pattern that matches, lora.targets that do.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pretune.config import Config, load_config
from pretune.errors import ConfigError
from pretune.model.config import ModelConfig, resolve_model_config

# Training text up to this size is read to count a char tokenizer's vocabulary (about a second per
# 64 MiB); a classification task's records up to it are read for their labels.
CHAR_COUNT_MAX_BYTES = 64 * 1024 ** 2
# GPUs without bf16: train.precision=auto runs them in fp32 (train.dist.pick_autocast).
NO_BF16 = ("V100", "T4")


@dataclass
class RunInputs:
    """What the plan is of: architecture, device, task shape; `notes` say what was assumed."""

    arch: ModelConfig
    vocab: str  # where the vocabulary size comes from
    device: str  # "cpu" or a GPU name (a PEAK_FLOPS key when known)
    n_labels: int | None  # a classification head's classes; None: no head
    seq_len: int  # the longest sequence a step runs (fine-tuning: finetune.max_len within the context)
    steps: int  # optimiser steps the run will take (a resumed run: those left)
    notes: list[str] = field(default_factory=list)


def plan_keys(cls: type) -> set[str]:
    """The keys a plan config adds to a run's."""
    return {f.name for f in dataclasses.fields(cls)} - {f.name for f in dataclasses.fields(Config)}


def load_plan_config(cls: type, argv: list[str]):
    """The plan config of `pretune plan [CONFIG.yaml] [KEY=VALUE ...]`; with resume (given either
    way), the run's config as the training verbs load it, plus the plan's own keys."""
    import yaml

    from pretune.cli import run_config, split_args
    from pretune.config_io import read_yaml

    yaml_path, extra, overrides = split_args(argv)
    if extra is not None:
        raise ConfigError(f"unexpected argument {extra!r}; pretune plan takes [CONFIG.yaml] [KEY=VALUE ...]")
    cfg = load_config(cls, yaml_path, overrides)
    if not cfg.resume:
        return cfg
    own = plan_keys(cls)
    run_args = [o for o in overrides if o.split("=", 1)[0] not in own and not o.startswith("resume=")]
    run_args.append(f"resume={cfg.resume}")
    tmp = None
    if yaml_path:
        data = read_yaml(yaml_path)
        if own & data.keys():  # the run's loader does not know the plan's keys: give it the rest
            fd, tmp = tempfile.mkstemp(suffix=".yaml")
            os.close(fd)
            Path(tmp).write_text(yaml.safe_dump({k: v for k, v in data.items() if k not in own}))
        run_args.insert(0, tmp or yaml_path)
    try:
        run = run_config(run_args)
    finally:
        if tmp:
            Path(tmp).unlink()
    return cls(**{f.name: getattr(run, f.name) for f in dataclasses.fields(Config)},
               **{k: getattr(cfg, k) for k in own})


# ----------------------------------------------------------------------------- device


def gpu_key(name: str) -> str | None:
    """The PEAK_FLOPS entry `name` is (case aside), else the longest one it contains
    ("NVIDIA H100 PCIe" -> "H100 PCIe"), else None."""
    from pretune.train.meter import PEAK_FLOPS

    exact = [k for k in PEAK_FLOPS if k.lower() == name.lower()]
    found = exact or [k for k in PEAK_FLOPS if k.lower() in name.lower()]
    return max(found, key=len) if found else None


def detected_gpu() -> str | None:
    """This machine's first CUDA device's name, or None."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def resolve_device(cfg) -> tuple[str, list[str]]:
    """('cpu' or the GPU to plan for, notes)."""
    wanted = cfg.train.device
    if cfg.gpu is not None:
        if cfg.gpu.lower() == "cpu":
            return "cpu", []
        if wanted == "cpu":
            raise ConfigError(f"gpu={cfg.gpu} but train.device=cpu: the run would train on the CPU; drop gpu= "
                              "to plan that, or set train.device=cuda to plan the GPU run")
        return gpu_key(cfg.gpu) or cfg.gpu, []
    if wanted == "cpu":
        return "cpu", []
    name = detected_gpu()
    if name:
        key = gpu_key(name)
        if key:
            return key, [f"gpu: this machine's {name} (give gpu=... to plan for another)"]
        return "H100", [f"gpu: this machine's {name} is not in the peak FLOP/s table; planned for an H100 "
                        "(give gpu=..., or peak_tflops= and power_w= for this one)"]
    if wanted == "auto":
        return "cpu", ["no GPU here and no gpu= given: planned for the CPU, where train.device=auto would run; "
                       "give gpu=H100 (or A100, L4, ...) to plan a GPU run"]
    return "H100", [f"train.device={wanted}, no GPU here and no gpu= given: planned for an H100 (give gpu=...)"]


# ----------------------------------------------------------------------------- architecture


def _source_bytes(specs: list[str], key: str) -> int | None:
    """Total size of the files of `specs`, or None when one is not there."""
    from pretune.data.sources import DataError, expand_source

    try:
        return sum(f.stat().st_size for spec in specs for f in expand_source(spec, key))
    except (DataError, OSError):
        return None


def _start_model(cfg) -> str | None:
    """The model whose weights (and architecture) the run starts from: init_from, or a resumed
    fine-tuning run's parent (its lineage)."""
    if cfg.task and cfg.resume and not cfg.init_from:
        from pretune.finetune import starting_model

        return starting_model(cfg)
    return cfg.init_from


def run_arch(cfg) -> tuple[ModelConfig, str]:
    """The architecture the run will build and where its vocabulary size comes from."""
    start = _start_model(cfg)
    if start:
        from pretune.model.io import find_model_dir, is_hf_model_dir, read_model_config
        from pretune.stages import parent_tokenizer

        model_dir = find_model_dir(start)
        if is_hf_model_dir(model_dir):
            from pretune.interop.hf import hf_to_model_config, read_hf_config

            arch = resolve_model_config(hf_to_model_config(read_hf_config(model_dir)))
        else:
            arch = resolve_model_config(read_model_config(model_dir))
        tokens = parent_tokenizer(start).vocab_size
        if tokens > arch.vocab_size:  # as stages.build_model refuses it
            raise ConfigError(f"init_from={start}: its tokenizer has {tokens} tokens but the model only "
                              f"{arch.vocab_size} embeddings; use the tokenizer it was trained with")
        return arch, f"{start}'s model ({tokens:,} tokenizer tokens)"
    tokens, source, exact = tokenizer_size(cfg)
    arch = resolve_model_config(cfg.model, tokens)
    if cfg.model.vocab_size is not None:
        if exact and arch.vocab_size < tokens:  # as stages.build_model refuses it
            raise ConfigError(f"model.vocab_size={arch.vocab_size} is smaller than the tokenizer's {tokens} "
                              "tokens; leave model.vocab_size unset")
        source = f"model.vocab_size (the tokenizer: {source})" if exact else "model.vocab_size"
    return arch, source


def tokenizer_size(cfg) -> tuple[int, str, bool]:
    """(tokens, where from, whether exact) of the tokenizer of a run from scratch or a resumed run."""
    from pretune.data.tokenizer import Tokenizer

    d = cfg.data
    if cfg.resume:
        if not (Path(cfg.resume) / "tokenizer.json").is_file():
            raise ConfigError(f"resume={cfg.resume}: no tokenizer.json there; the run stopped before it "
                              "saved one, so start it again instead of resuming")
        return Tokenizer.load(cfg.resume).vocab_size, "the resumed run's tokenizer", True
    if d.tokenizer not in ("char", "bpe"):
        from pretune.data.corpus import build_tokenizer

        return build_tokenizer(d).vocab_size, f"data.tokenizer={d.tokenizer}", True
    if cfg.task:
        raise ConfigError("fine-tuning from scratch needs a tokenizer: set data.tokenizer to a tokenizer.json "
                          "(for a fair comparison, the pre-trained model's), or give init_from")
    if d.tokenizer == "bpe":
        return d.vocab_size, (f"data.vocab_size (a BPE tokenizer trained on data.train has at most "
                              f"{d.vocab_size:,} tokens; a small corpus gives fewer)"), False
    size = _source_bytes(d.train, "data.train") if d.train else None
    if size is not None and size <= CHAR_COUNT_MAX_BYTES:
        from pretune.data.corpus import _iter_text
        from pretune.data.tokenizer import SPECIALS, train_char

        tokens = train_char(_iter_text(d)).vocab_size  # the vocabulary the run will train
        return tokens, (f"a char tokenizer of data.train: {tokens - len(SPECIALS)} distinct characters "
                        f"and {len(SPECIALS)} special tokens"), True
    why = ("data.train is not given or not found here" if size is None else
           f"data.train is {size / 1024 ** 2:,.0f} MiB, not counted")
    return 256, (f"assumed 256 for a char tokenizer ({why}; the run's is every distinct character of "
                 "the text plus 4 special tokens; set model.vocab_size to plan another)"), False


def head_labels(cfg) -> tuple[int | None, str | None]:
    """(classes, where from) of a classification head, (None, None) without one."""
    from pretune.eval.scoring import uses_head

    if not uses_head(cfg):
        return None, None
    d = cfg.data
    if d.labels:
        return len(d.labels), "data.labels"
    specs = [(s, key) for key, ss in (("data.train", d.train), ("data.val", d.val), ("data.test", d.test))
             for s in ss]
    sizes = [_source_bytes([s], key) for s, key in specs]
    if specs and None not in sizes and sum(sizes) <= CHAR_COUNT_MAX_BYTES:
        from pretune.data import tasks as T
        from pretune.finetune import label_names

        found = {r["label"] for key, ss in (("data.train", d.train), ("data.val", d.val), ("data.test", d.test))
                 for r in T.read_records(ss, cfg.task, d, T.TaskStats(), key)}
        if found:
            names = label_names(found)
            return len(found), "the records: " + ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return 2, "assumed 2 (give data.labels, or records that can be read here)"


def check_like_the_run(cfg, arch: ModelConfig, n_labels: int | None) -> None:
    """The run's refusals that need the architecture (module docstring)."""
    if not cfg.task and cfg.train.seq_len and cfg.train.seq_len > arch.max_seq_len:  # stages.run_pretrain
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={arch.max_seq_len}")
    if cfg.method == "full" or cfg.method not in ("freeze", "lora"):
        return
    import torch

    from pretune.finetune import set_trainable
    from pretune.model.gpt import GPT
    from pretune.model.heads import ClassifierModel

    with torch.device("meta"):  # the structure alone: no memory
        model = GPT(arch)
        if n_labels is not None:
            model = ClassifierModel(model, n_labels)
        set_trainable(model, cfg)


def resumed_steps(cfg) -> tuple[int, str | None]:
    """Steps the run will take; for a resumed run, those after its last checkpoint."""
    if not cfg.resume:
        return cfg.train.max_steps, None
    from pretune.train.checkpoint import checkpoint_step, latest_checkpoint

    last = latest_checkpoint(cfg.resume)
    done = checkpoint_step(last) if last is not None else 0
    left = max(cfg.train.max_steps - done, 0)
    return left, f"resume: the run's config.yaml; it continues at step {done} of {cfg.train.max_steps} ({left} left)"


def finished_note(cfg) -> str | None:
    """With resume=RUN: why there is nothing left to plan (the run has finished, as `pretune pretrain|
    finetune resume=RUN` finds it: stages.finished_run; or its last checkpoint is at train.max_steps),
    else None."""
    if not cfg.resume:
        return None
    from pretune.stages import finished_run

    summary = finished_run(cfg, log=lambda _: None)
    left, _ = resumed_steps(cfg)
    if summary is None and left > 0:
        return None
    status, steps = (summary or {}).get("status"), (summary or {}).get("steps")
    how = (f"stopped early at step {steps}" if status == "early_stopped" else
           f"completed at step {steps if steps is not None else cfg.train.max_steps}, train.max_steps="
           f"{cfg.train.max_steps}")
    further = "" if status == "early_stopped" else "; raise train.max_steps to plan training it further"
    return f"{cfg.resume} has already finished ({how}): nothing left to plan{further}"


def run_inputs(cfg) -> RunInputs:
    """Everything `estimate` needs to know about the run besides the config's own numbers."""
    device, notes = resolve_device(cfg)
    arch, vocab = run_arch(cfg)
    if "assumed" in vocab or "at most" in vocab:  # the size is not the tokenizer's own
        notes.append(f"vocabulary: {vocab}")
    n_labels, labels_from = head_labels(cfg)
    if n_labels is not None:
        notes.append(f"classification head: {arch.d_model} x {n_labels} + bias, labels from {labels_from}")
    check_like_the_run(cfg, arch, n_labels)
    if cfg.task:
        seq_len = min(cfg.finetune.max_len, arch.max_seq_len)
        notes.append(f"fine-tuning: sequences of at most {seq_len} tokens (finetune.max_len={cfg.finetune.max_len}, "
                     f"context {arch.max_seq_len}); batches are as long as their longest example, so the "
                     "figures are an upper bound")
        if cfg.finetune.max_len > arch.max_seq_len:
            notes.append(f"finetune.max_len={cfg.finetune.max_len} exceeds the context: the run refuses "
                         f"examples longer than {arch.max_seq_len} tokens")
        if cfg.train.seq_len:
            notes.append(f"train.seq_len={cfg.train.seq_len} is not read by fine-tuning (finetune.max_len is)")
    else:
        seq_len = cfg.train.seq_len or arch.max_seq_len
    if not cfg.task and cfg.method != "full":
        notes.append(f"method={cfg.method} without task: planned as language modelling on whole sequences "
                     "(pretune finetune needs task=...)")
    steps, resumed = resumed_steps(cfg)
    if resumed:
        notes.insert(0, resumed)
    return RunInputs(arch, vocab, device, n_labels, seq_len, steps, notes)

