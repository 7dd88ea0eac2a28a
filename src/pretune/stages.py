"""Stages build the inputs of the one training loop: pre-training from scratch, and continued
pre-training (`init_from`) with optional replay through a data mixture.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch

from pretune.config import Config, finetune_only_keys
from pretune.config_io import save_config
from pretune.errors import ConfigError
from pretune.files import recover_set_aside, settle_aside
from pretune.data.corpus import PretrainData, build_tokenizer, load_corpus
from pretune.data.tokenizer import Tokenizer
from pretune.eval.evaluate import combine_lm_metrics, lm_metrics
from pretune.model.config import resolve_model_config
from pretune.model.gpt import GPT
from pretune.model.io import find_model_dir, is_hf_model_dir, load_model, read_model_config
from pretune.train import checkpoint as ck
from pretune.train import dist
from pretune.train.loop import train
from pretune.train.objectives import LMObjective


# Run directories this process opened for a new run (absolute paths): True where the run made the directory
# (or found only a lock a failed run left there), so that a set-up that fails may take it away again.
_FRESH: dict[str, bool] = {}


def recover_interrupted(run_dir: str | Path) -> None:
    """Settle what a process killed between setting a replaced run aside (overwrite=true) and
    training left beside `run_dir` (files.recover_set_aside). On rank 0 alone: it also runs before
    the process group exists (cli, before a resumed run's config.yaml is read), so RANK decides."""
    if os.environ.get("RANK", "0") != "0":
        return
    try:  # a live run holds the directory's lock while it sets up (on any host that shares the lock):
        ck.refuse_if_locked(Path(run_dir))  # its .replaced-PID is no leftover, whatever its pid says here
    except ck.RunDirError:
        return
    said = recover_set_aside(Path(run_dir), started=("checkpoints/step-*", "summary.json", "model"))
    if said:
        print(f"note: {said}", file=sys.stderr)


def open_run(cfg: Config, rt: dist.Runtime) -> Path:
    """The run directory (checked on rank 0 first, so no process writes into a refused one)."""
    run_dir = Path(cfg.resume or cfg.out_dir)
    if rt.is_main:
        recover_interrupted(run_dir)
        if cfg.overwrite and not cfg.resume and run_dir.exists():
            check_inputs(cfg)  # a mistyped path must not cost the run it would have replaced
        _FRESH.pop(str(run_dir.absolute()), None)
        if not cfg.resume and (not run_dir.exists() or _only_lock(run_dir)):
            _FRESH[str(run_dir.absolute())] = not run_dir.exists() or any(run_dir.iterdir())
        # a replaced run is set aside until this one starts training (train() drops it; a failed
        # set-up gives it back: restore_replaced)
        ck.prepare_out_dir(run_dir, cfg.overwrite, bool(cfg.resume), keep=inputs_of(cfg), until_started=True)
        ck.lock_run_dir(run_dir)  # one process per run: a second resume of a live run is refused
    dist.barrier(rt)
    return run_dir


def finished_run(cfg: Config, log=print) -> dict | None:
    """With resume=RUN: the run's summary when it has already finished (completed at train.max_steps
    or beyond, or stopped early), said in the log; None when there is something to resume."""
    import json

    path = Path(cfg.resume or "") / "summary.json"
    if not cfg.resume or not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except ValueError:
        return None
    status, steps = summary.get("status"), summary.get("steps")
    done = status == "early_stopped" or (status == "completed" and (steps is None or steps >= cfg.train.max_steps))
    if done:
        log(f"{cfg.resume} has already finished ({status}" + (f" at step {steps}" if steps is not None else "")
            + "): nothing to resume" + ("; raise train.max_steps to train it further" if status == "completed"
                                        and steps is not None else ""))
    return summary if done else None


def restore_replaced(run_dir: Path, rt: dist.Runtime) -> None:
    """A run that failed before it started training: the run overwrite=true replaced comes back. A
    new run that wrote nothing but its lock takes the lock away, and the directory when it made it."""
    if rt.is_main:
        ck.unlock_run_dir(run_dir)
        if settle_aside(run_dir, restore=True):
            print(f"note: the run that overwrite=true was replacing is back in {run_dir}", file=sys.stderr)
        made = _FRESH.pop(str(run_dir.absolute()), None)
        if made is not None and _only_lock(run_dir):
            (run_dir / ck.LOCK_FILE).unlink(missing_ok=True)
            if made:
                try:
                    run_dir.rmdir()  # only while empty: never what another process put there meanwhile
                except OSError:
                    pass


def _only_lock(run_dir: Path) -> bool:
    """Whether `run_dir` is a directory holding nothing but (perhaps) a run's lock file."""
    try:
        return run_dir.is_dir() and all(e.name == ck.LOCK_FILE and e.is_file() for e in run_dir.iterdir())
    except OSError:
        return False


def save_run_config(cfg: Config, run_dir: Path) -> None:
    """config.yaml: the resolved config that ran, safe to run again. Neither resume nor overwrite is
    saved (a rerun asks for them itself, so it never replaces or continues a run unasked), and a
    resumed run keeps the parent (init_from) it was first saved with."""
    parent = cfg.init_from
    if cfg.resume and not parent:
        from pretune.config_io import read_yaml

        saved = run_dir / "config.yaml"
        parent = (read_yaml(saved) if saved.is_file() else {}).get("init_from") or lineage_parent(run_dir)
    save_config(absolute_inputs(dataclasses.replace(cfg, resume=None, overwrite=False, init_from=parent)),
                run_dir / "config.yaml")


def absolute_inputs(cfg: Config) -> Config:
    """`cfg` with the local paths it reads made absolute (data sources, a tokenizer file, an init_from
    that is a path rather than a hub id), so that its config.yaml reads the same files wherever it is
    run from again."""
    def absolute(path: str) -> str:
        return str(Path(path).absolute()) if path else path

    d, ft = cfg.data, cfg.finetune
    data = dataclasses.replace(d, train=[absolute(x) for x in d.train], val=[absolute(x) for x in d.val],
                               test=[absolute(x) for x in d.test],
                               tokenizer=d.tokenizer if d.tokenizer in ("char", "bpe") else absolute(d.tokenizer))
    local = cfg.init_from and Path(cfg.init_from).exists()
    return dataclasses.replace(cfg, data=data, finetune=dataclasses.replace(ft, replay=[absolute(x) for x in ft.replay]),
                               init_from=absolute(cfg.init_from) if local else cfg.init_from)


SOURCE_KEYS = ("data.train", "data.val", "data.test", "finetune.replay")
"""Keys whose values are data sources: files, directories or globs (data.sources.expand_source)."""


def _inputs(cfg: Config) -> list[tuple[str, str]]:
    """(key, path) of everything a run reads: its parent model, its data sources, a tokenizer file."""
    d = cfg.data
    sources = [(key, spec) for key, specs in zip(SOURCE_KEYS, (d.train, d.val, d.test, cfg.finetune.replay))
               for spec in specs]
    tokenizer = [] if d.tokenizer in ("char", "bpe") else [("data.tokenizer", d.tokenizer)]
    return [(k, p) for k, p in [("init_from", cfg.init_from), *sources, *tokenizer] if p]


def check_inputs(cfg: Config) -> None:
    """Stop (DataError, ConfigError) when a path the run reads is not there (a data source: no file,
    directory or glob match)."""
    from pretune.data.sources import expand_source

    for key, path in _inputs(cfg):
        if key in SOURCE_KEYS:
            expand_source(path, key)
        elif not Path(path).exists():
            raise ConfigError(f"{key}={path} does not exist")


def lineage_parent(run_dir: str | Path) -> str | None:
    """The model a run started from, as its lineage.json records it (None: from scratch, or no lineage)."""
    import json

    lineage = Path(run_dir) / "lineage.json"
    return json.loads(lineage.read_text()).get("parent") if lineage.is_file() else None


def inputs_of(cfg: Config) -> tuple:
    """The paths a run reads (its parent model, its data), which replacing its out_dir must not delete."""
    return tuple(path for _, path in _inputs(cfg))


def tokenizer_dir(path: str | Path) -> Path:
    """The directory holding the tokenizer.json of a run or model directory (a Hugging Face
    directory's tokenizer files lie beside its config.json)."""
    model_dir = find_model_dir(path)
    for candidate in (model_dir, Path(path), model_dir.parent):
        if (candidate / "tokenizer.json").is_file():
            return candidate
    hint = (" (a Hugging Face directory with only a sentencepiece tokenizer.model: convert it once with "
            f"`pretune import {path} OUT` and use OUT)" if (model_dir / "tokenizer.model").is_file() else "")
    raise ck.RunDirError(f"init_from={path} has no tokenizer.json beside its model{hint}")


def parent_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of the model that `init_from=path` starts from.

    A Hugging Face directory is read exactly as `pretune import` reads it (interop.hf.load_hf_tokenizer):
    its chat template (tokenizer_config.json, chat_template.jinja or chat_template.json), the EOS of
    generation_config.json when tokenizer_config.json names none, and a sentencepiece tokenizer.model
    converted when there is no tokenizer.json. The stage saves this tokenizer into its run, so the run
    keeps the parent's chat template."""
    model_dir = find_model_dir(path)
    if is_hf_model_dir(model_dir):
        from pretune.interop.hf import load_hf_tokenizer

        tok = load_hf_tokenizer(model_dir)
        if tok is None:
            raise ck.RunDirError(f"init_from={path} is a Hugging Face directory without a usable tokenizer "
                                 "(no tokenizer.json, and its tokenizer.model could not be converted: is "
                                 "transformers with sentencepiece installed?)")
        return tok
    return Tokenizer.load(tokenizer_dir(path))


def parent_model(cfg: Config, path: str | Path) -> GPT:
    """The model at `path` (init_from, or a resumed fine-tuning run's parent) with the run's dropouts.

    On the ranks that build on the meta device (dist.builds_on_meta: all but rank 0 under FSDP) its
    structure alone, from its config, the weights left unread: rank 0 sends them after sharding."""
    overrides = {"dropout": cfg.model.dropout, "attn_dropout": cfg.model.attn_dropout}
    if not dist.builds_on_meta(cfg):
        return load_model(path, **overrides)[0]
    model_dir = find_model_dir(path)
    if (model_dir / "lora.json").is_file():  # an adapter alone: its base model's shape (io.load_model)
        import json

        return parent_model(cfg, json.loads((model_dir / "lora.json").read_text())["base"])
    if is_hf_model_dir(model_dir):
        from pretune.interop.hf import hf_to_model_config, read_hf_config

        arch = hf_to_model_config(read_hf_config(model_dir))
    else:
        arch = read_model_config(model_dir)
    for key, value in overrides.items():
        setattr(arch, key, value)
    with torch.device("meta"):
        return GPT(arch)


def build_model(cfg: Config, tok: Tokenizer, log=print) -> GPT:
    """The parent's weights for init_from; otherwise a fresh, seeded model (a resumed run then loads
    its checkpoint in train(); its config.yaml already holds the resolved architecture).

    Under FSDP only rank 0 builds or loads the weights; the other ranks build the same structure on
    the meta device and get their shards from rank 0 in train() (dist.shard_model)."""
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        model = parent_model(cfg, cfg.init_from)
        if tok.vocab_size > model.cfg.vocab_size:
            raise ConfigError(f"init_from={cfg.init_from}: its tokenizer has {tok.vocab_size} tokens but the "
                              f"model only {model.cfg.vocab_size} embeddings; use the tokenizer it was trained with")
        ignored = ignored_model_keys(cfg.model, model.cfg)
        if ignored:
            log(f"warning: {', '.join(ignored)} ignored: init_from={cfg.init_from} fixes the architecture "
                f"(only model.dropout and model.attn_dropout apply)")
        default = type(cfg.data)()
        ignored = [f"data.{k}={getattr(cfg.data, k)!r}" for k in ("tokenizer", "vocab_size")
                   if getattr(cfg.data, k) != getattr(default, k)]
        if ignored:
            log(f"warning: {', '.join(ignored)} ignored: the run keeps the tokenizer of init_from={cfg.init_from}")
        return model
    arch = resolve_model_config(cfg.model, tok.vocab_size)
    if arch.vocab_size < tok.vocab_size:
        raise ConfigError(f"model.vocab_size={arch.vocab_size} is smaller than the tokenizer's "
                         f"{tok.vocab_size} tokens; leave model.vocab_size unset")
    with dist.init_device(cfg):
        return GPT(arch)


def ignored_model_keys(asked, used) -> list[str]:
    """`model.KEY=VALUE` for the architecture keys set away from their defaults and from the model
    actually used (an init_from model's own): the dropouts apply, everything else is the parent's."""
    from pretune.model.config import ModelConfig

    default = ModelConfig()
    return [f"model.{f.name}={getattr(asked, f.name)!r}" for f in dataclasses.fields(asked)
            if f.name not in ("dropout", "attn_dropout") and getattr(asked, f.name) != getattr(default, f.name)
            and getattr(asked, f.name) != getattr(used, f.name, None)]


def run_stage(run_dir: Path, cfg: Config) -> str:
    """'pretrain' or 'cpt' (continued pre-training), from lineage.json when resuming."""
    if cfg.resume and (run_dir / "lineage.json").is_file():
        import json
        return json.loads((run_dir / "lineage.json").read_text())["stage"]
    return "cpt" if cfg.init_from else "pretrain"


def run_pretrain(cfg: Config, log=print) -> dict:
    """Pre-training from scratch, or continued pre-training when init_from is set."""
    stray = finetune_only_keys(cfg)
    if stray:
        raise ConfigError(f"{', '.join(stray)}: fine-tuning keys, which pretrain does not read. Use `pretune "
                          f"finetune` for a task; for replay in continued pre-training, list the general text in "
                          f"data.train with data.weights (data.train=[domain.txt,general.txt] "
                          f"data.weights=[0.75,0.25])")
    done = finished_run(cfg, log)
    if done is not None:
        return done
    rt = dist.setup(cfg.train.device, cfg.train.precision, cfg.train.threads)
    run_dir = open_run(cfg, rt)
    try:
        return _pretrain(cfg, rt, run_dir, log)
    except BaseException:
        restore_replaced(run_dir, rt)  # does nothing once training has started
        raise
    finally:
        ck.unlock_run_dir(run_dir)
        dist.teardown()


def _pretrain(cfg: Config, rt: dist.Runtime, run_dir: Path, log) -> dict:
    """run_pretrain's set-up (tokenizer, model, data, run files) and training."""
    if cfg.resume:
        if not (run_dir / "tokenizer.json").is_file():
            raise ConfigError(f"resume={cfg.resume}: no tokenizer.json there; the run stopped before it saved "
                              "one, so start it again instead of resuming")
        tok = Tokenizer.load(run_dir)
    elif cfg.init_from:
        tok = parent_tokenizer(cfg.init_from)
    else:
        tok = build_tokenizer(cfg.data, log)
    model = build_model(cfg, tok, log)
    stage = run_stage(run_dir, cfg)
    cfg = dataclasses.replace(cfg, model=model.cfg)
    seq_len = cfg.train.seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise ConfigError(f"train.seq_len={seq_len} exceeds model.max_seq_len={model.cfg.max_seq_len}")
    corpus = load_corpus(cfg.data, tok, seq_len, log)
    if corpus.val and cfg.train.eval_every and cfg.train.eval_tokens // len(corpus.val) < seq_len:
        raise ConfigError(f"train.eval_tokens={cfg.train.eval_tokens} leaves each of the {len(corpus.val)} "
                          f"validation source(s) less than one sequence of {seq_len} tokens; raise it to at "
                          f"least {len(corpus.val) * seq_len}, or set train.eval_every=0")
    data = PretrainData(corpus, seq_len, cfg.train.batch_size, cfg.train.micro_batch_size, cfg.seed, rt.world)
    if rt.is_main:
        save_run_config(cfg, run_dir)
        tok.save(run_dir)
        if not cfg.resume:
            ck.write_lineage(run_dir, stage, cfg.init_from,
                             data=corpus.describe())

    def evaluate(m: torch.nn.Module) -> dict:
        if not corpus.val:
            return {}
        parts = [(label, lm_metrics(m, windows, tok.token_bytes, rt.device, cfg.train.eval_batch_size,
                                    rt.autocast_dtype, rt))
                 for label, windows in corpus.val_sets(seq_len, cfg.train.eval_tokens) if windows]
        r = combine_lm_metrics([p for _, p in parts])
        out = {"val_loss": r["loss"], "val_ppl": r["ppl"], "val_bpb": r["bpb"]}
        if len(parts) > 1:  # each source's own, continued pre-training's forgetting among them
            for label, p in parts:
                out.update({f"val_loss/{label}": p["loss"], f"val_bpb/{label}": p["bpb"]})
        return out

    n_params = sum(p.numel() for p in model.parameters())
    log(f"{'continued pre-training' if stage == 'cpt' else 'pre-training'}: {n_params:,} parameters, "
        f"{sum(s.n_tokens for s in corpus.train):,} training tokens, device {rt.device}")
    return train(model, cfg, rt, run_dir, data, LMObjective(), evaluate, tok, log, {"stage": stage})
