"""`pretune VERB [CONFIG.yaml] [KEY=VALUE ...]`. Each verb imports its module only when it runs, so
`pretune --help` stays fast and never imports torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

USAGE = """usage: pretune VERB [CONFIG.yaml] [KEY=VALUE ...]
       pretune VERB --help        (the verb's keys, their defaults and meaning)

Pre-train, continue pre-training or fine-tune a language model, and measure which pays off.

verbs:
{verbs}

Examples:
  pretune pretrain configs/shakespeare-char.yaml data.train=input.txt out_dir=runs/shakespeare
  pretune pretrain init_from=runs/base data.train=[domain.txt,general.txt] data.weights=[0.75,0.25] out_dir=runs/cpt
  pretune pretrain resume=runs/shakespeare
  pretune generate runs/shakespeare prompt="ROMEO:" max_new_tokens=200 seed=1
  pretune evaluate runs/shakespeare data.val=held_out.txt

Distributed: torchrun --nproc_per_node N -m pretune pretrain CONFIG.yaml ...
"""

VERBS = {
    "prepare": "tokenise the corpus into cached token shards (pretrain does this itself)",
    "pretrain": "pre-train from scratch; with init_from=RUN it is continued pre-training",
    "finetune": "fine-tune for a task: full, last layers (freeze) or LoRA",
    "evaluate": "loss, perplexity and bits per byte on text; a fine-tuned model's task figures on records",
    "generate": "sample text from a model (temperature, top-k, top-p, seed)",
    "chat": "talk to a model in the terminal",
    "study": "compare strategies on quality, forgetting, data efficiency, cost and bias",
    "demo": "the main job: generate a world, pre-train on it, run a study of strategies, write the report",
    "import": "convert a Hugging Face checkpoint into a pretune model directory",
    "export": "write a run as a Hugging Face (or PEFT adapter, or GGUF) model",
    "serve": "serve a model behind an OpenAI-compatible API",
    "plan": "estimate memory, FLOPs, time and energy of a run before launching it",
}

# Verbs whose code lives in other modules: (module, function). Each function takes argv and returns
# None or an exit code. Modules are imported only when their verb runs.
EXTERNAL = {
    "finetune": ("pretune.finetune", "cmd_finetune"),
    "chat": ("pretune.serve.chat", "cmd_chat"),
    "study": ("pretune.study.runner", "cmd_study"),
    "import": ("pretune.interop.commands", "cmd_import"),
    "export": ("pretune.interop.commands", "cmd_export"),
    "serve": ("pretune.serve.server", "cmd_serve"),
    "plan": ("pretune.plan", "cmd_plan"),
}


def split_args(argv: list[str]) -> tuple[str | None, str | None, list[str]]:
    """(config yaml, positional model path, KEY=VALUE overrides)."""
    yaml_path = model = None
    rest = []
    for i, a in enumerate(argv):
        flag = argv[i - 1] if i else ""  # --temperature 0: a flag and its value, as other tools take them
        if flag.startswith("-") and "=" not in flag and "=" not in a and not a.startswith("-"):
            from pretune.errors import ConfigError

            name = flag.lstrip("-").replace("-", "_")
            raise ConfigError(f"{flag} {a}: options are KEY=VALUE, without dashes: write {name}={a}")
        if "=" in a or a.startswith("-"):
            rest.append(a)
        elif a.endswith((".yaml", ".yml")) and yaml_path is None:
            yaml_path = a
        elif model is None:
            model = a
        else:
            from pretune.errors import ConfigError
            raise ConfigError(f"unexpected argument {a!r}; give KEY=VALUE pairs after the config file")
    return yaml_path, model, rest


def run_config(argv: list[str]):
    """Config from YAML + overrides; `resume=DIR` (given either way) starts from DIR's saved config.yaml.

    Layers, lowest first: the resumed run's config.yaml, the YAML file, the overrides. A YAML file
    that repeats the run's own values (a copy of its config.yaml) asks nothing of them, so a resume
    from it clears the saved train.stop_after as `resume=DIR` does."""
    from pretune.config import Config, load_config
    from pretune.config_io import deep_merge, flat_keys, parse_overrides, read_yaml
    from pretune.errors import ConfigError

    yaml_path, extra, overrides = split_args(argv)
    if extra is not None:
        raise ConfigError(f"unexpected argument {extra!r}; this verb takes [CONFIG.yaml] [KEY=VALUE ...]")
    from_file = read_yaml(yaml_path) if yaml_path else {}
    given = parse_overrides(overrides, Config)
    resume = given["resume"] if "resume" in given else from_file.get("resume")
    if not resume:
        return load_config(Config, None, overrides, base=from_file)
    resume = str(resume)
    from pretune.stages import recover_interrupted

    recover_interrupted(resume)  # an interrupted overwrite=true puts back the run it replaced
    saved = Path(resume) / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"resume={resume}: no config.yaml there; is it a run directory?")
    before = read_yaml(saved)
    kept, unset = flat_keys(before), object()
    from_file = {k: v for k, v in flat_keys(from_file).items() if k != "resume" and kept.get(k, unset) != v}
    asked = deep_merge(_nest(from_file), given)
    # a stop asked of the first part is not asked again
    base = deep_merge(before, {"init_from": None, "resume": resume, "out_dir": resume, "overwrite": False,
                               "train": {"stop_after": None}})
    base = deep_merge(base, _nest({k: v for k, v in from_file.items() if k != "out_dir"}))
    overrides = [o for o in overrides if not o.startswith("out_dir=")]
    cfg = load_config(Config, None, overrides, base=base)
    _check_resume_changes(before, cfg, asked, resume)
    return cfg


def _nest(flat: dict) -> dict:
    """{dotted.key: value} as a nested mapping (flat_keys' inverse)."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


# Keys a resumed run may change and still give the losses of a run that never stopped (to float
# rounding: another strategy computes the same step, and either checkpoint format loads under either,
# docs/distributed.md).
RESUME_SAFE = ("train.eval_every", "train.log_every", "train.save_every", "train.keep_last",
               "train.progress", "train.threads", "train.stop_after", "train.eval_tokens", "track",
               "dist.strategy", "dist.activation_checkpointing")
# Keys a resumed run cannot change: its checkpoint holds a model (and optimiser) built with them.
RESUME_FIXED = ("model.", "method", "task", "lora.rank", "lora.targets", "finetune.classifier", "data.tokenizer",
                "data.vocab_size", "data.labels")
RESUME_FIXED_EXCEPT = ("model.dropout", "model.attn_dropout")


def _check_resume_changes(saved: dict, cfg, given: dict, resume: str) -> None:
    """Refuse overrides a resumed run cannot take (the architecture, the method: before anything in
    the run is touched), and say which change it so it no longer matches one that never stopped.
    Values are compared as the config resolves them (optim.lr=3e-4 is the run's 0.0003)."""
    from pretune.config_io import flat_keys, to_dict
    from pretune.errors import ConfigError

    before, now, asked = flat_keys(saved), flat_keys(to_dict(cfg)), flat_keys(given)
    changed = [k for k in asked if k not in ("resume", "out_dir") and before.get(k) != now.get(k)]
    fixed = [k for k in changed if k.startswith(RESUME_FIXED) and not k.startswith(RESUME_FIXED_EXCEPT)]
    if fixed:
        raise ConfigError([f"resume={resume}: {k}={now.get(k)!r} cannot change (the run has {before.get(k)!r}): "
                           f"its checkpoint holds a model built with it; start a new run instead" for k in fixed])
    if "out_dir" in asked and str(given["out_dir"]) != str(resume):
        print(f"warning: out_dir={given['out_dir']} is ignored: a resumed run continues in {resume}",
              file=sys.stderr)
    for key in changed:
        if not key.startswith(RESUME_SAFE):
            print(f"warning: resume with {key}={now.get(key)!r} (the run had {before.get(key)!r}): the resumed "
                  "run will not give the losses of one that never stopped", file=sys.stderr)


# The keys `pretune prepare` reads: the sources, how they are tokenised and cached, and where the
# tokenizer comes from (a resumed run's or init_from's own).
PREPARE_KEYS = ("data.train", "data.val", "data.val_fraction", "data.tokenizer", "data.vocab_size",
                "data.text_field", "data.encoding_errors", "data.cache_dir", "data.shard_tokens", "train.seq_len",
                "init_from", "resume")


def _check_prepare_keys(argv: list[str], cfg) -> None:
    """Refuse the fine-tuning keys (pretrain refuses them too); name the other run keys given as
    KEY=VALUE, which prepare accepts so that the pretrain command line prepares its data, but does not
    read."""
    from pretune.config import Config, finetune_only_keys
    from pretune.config_io import flat_keys, parse_overrides
    from pretune.errors import ConfigError

    stray = finetune_only_keys(cfg)
    if stray:
        raise ConfigError(f"{', '.join(stray)}: fine-tuning keys, which pretune prepare does not read; it only "
                          f"tokenises a pre-training corpus, with the keys {', '.join(PREPARE_KEYS)}")
    unread = [k for k in flat_keys(parse_overrides(split_args(argv)[2], Config)) if k not in PREPARE_KEYS]
    if unread:
        print(f"note: pretune prepare only tokenises the corpus; it does not read {', '.join(unread)} "
              "(pretrain will)")


def cmd_prepare(argv):
    from pretune.data.corpus import load_corpus

    cfg = run_config(argv)
    _check_prepare_keys(argv, cfg)
    tok = _prepare_tokenizer(cfg)
    corpus = load_corpus(cfg.data, tok, cfg.train.seq_len or 1)
    for split, stores in (("train", corpus.train), ("val", corpus.val)):
        for s in stores:
            print(f"{split}: {s.name}: {s.n_tokens:,} tokens")
    print(f"tokenizer: {tok.vocab_size} tokens")


def _prepare_tokenizer(cfg):
    """The tokenizer `pretune pretrain` will use with this config, picked as stages.run_pretrain picks
    it (the resumed run's own, the init_from parent's, or data.tokenizer), so the shards prepared here
    are the ones pretrain finds in the cache."""
    from pretune.data.corpus import build_tokenizer
    from pretune.data.tokenizer import Tokenizer
    from pretune.errors import ConfigError

    if cfg.resume:
        if not (Path(cfg.resume) / "tokenizer.json").is_file():
            raise ConfigError(f"resume={cfg.resume}: no tokenizer.json there; the run stopped before it "
                              "saved one, so start it again instead of resuming")
        return Tokenizer.load(cfg.resume)
    if cfg.init_from:
        from pretune.stages import parent_tokenizer

        return parent_tokenizer(cfg.init_from)
    return build_tokenizer(cfg.data)


def cmd_pretrain(argv):
    from pretune.stages import run_pretrain

    summary = run_pretrain(run_config(argv))
    print_summary(summary, ("status", "steps", "train_loss", "val_loss", "val_bpb", "wall_s", "tokens_per_s"))


def print_summary(summary: dict, keys: tuple[str, ...]) -> None:
    """One line of a run's headline figures: `summary: status=completed, steps=200, val_loss=1.234, ...`."""
    def show(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return json.dumps(v, default=str) if isinstance(v, dict) else str(v)

    print("summary: " + ", ".join(f"{k}={show(summary[k])}" for k in keys if k in summary))


def model_arg(model: str | None, verb: str) -> str:
    from pretune.errors import ConfigError

    if not model:
        raise ConfigError(f"pretune {verb} needs a model: pretune {verb} RUN_OR_MODEL_DIR [KEY=VALUE ...]")
    return model


def cmd_generate(argv):
    from pretune.config import load_config
    from pretune.data.templates import start_ids, stop_ids
    from pretune.eval.generate import PREFIX_TOKENS, TextStream, stream_tokens
    from pretune.eval.options import GenerateConfig
    from pretune.model.io import load_model
    from pretune.train.dist import pick_device

    yaml_path, model_path, overrides = split_args(argv)
    g = load_config(GenerateConfig, yaml_path, overrides, what="pretune generate")
    model, tok = load_model(model_arg(model_path, "generate"), pick_device(g.device))
    if tok is None:
        raise SystemExit(f"error: no tokenizer.json found with {model_path}")
    prompt = tok.encode_prompt(g.prompt) or start_ids(tok)  # BOS as the tokenizer adds it; no prompt: a document's start
    if len(prompt) >= model.cfg.max_seq_len:
        print(f"warning: the prompt has {len(prompt)} tokens, the model's context {model.cfg.max_seq_len}: "
              f"it sees the last {model.cfg.max_seq_len - 1}", file=sys.stderr)
    for i in range(g.num_samples):
        seed = None if g.seed is None else g.seed + i
        sys.stdout.write(g.prompt)
        text = TextStream(tok, [], prefix=prompt[-PREFIX_TOKENS:])  # whole characters, leading spaces kept
        for t in stream_tokens(model, prompt, g.max_new_tokens, g.temperature, g.top_k, g.top_p, seed,
                               stop_ids=stop_ids(tok)):
            sys.stdout.write(text.push(t)[0])
            sys.stdout.flush()
        sys.stdout.write(text.flush() + "\n" + ("-" * 40 + "\n" if i + 1 < g.num_samples else ""))


# The data keys `pretune evaluate` reads: the text or records (data.val), how text is read and cached,
# and the task records' field names and labels (as pretune finetune reads them).
EVALUATE_DATA_KEYS = ("val", "text_field", "encoding_errors", "cache_dir", "shard_tokens", "label_field",
                      "prompt_field", "response_field", "messages_field", "source_field", "target_field",
                      "chosen_field", "rejected_field", "labels", "on_error")


def _check_evaluate_data_keys(e) -> None:
    """Refuse data keys evaluate would ignore (data.train, data.weights, data.tokenizer, ...): the
    figures would not change, and the user would think they had."""
    import dataclasses

    from pretune.errors import ConfigError

    default = type(e.data)()
    stray = [f"data.{f.name}={getattr(e.data, f.name)!r}" for f in dataclasses.fields(e.data)
             if f.name not in EVALUATE_DATA_KEYS and getattr(e.data, f.name) != getattr(default, f.name)]
    if stray:
        raise ConfigError(f"{', '.join(stray)}: pretune evaluate does not read {'it' if len(stray) == 1 else 'them'} "
                          "(it scores the model, with its own tokenizer, on all of data.val); leave "
                          f"{'it' if len(stray) == 1 else 'them'} out. Its data keys: data.val, the records' field "
                          "names (data.text_field, data.label_field, ...), data.labels, data.on_error, "
                          "data.encoding_errors, data.cache_dir and data.shard_tokens")


def cmd_evaluate(argv):
    import json

    from pretune.config import load_config
    from pretune.eval.options import EvaluateConfig
    from pretune.data.corpus import load_corpus
    from pretune.errors import ConfigError
    from pretune.eval.evaluate import lm_metrics, lm_windows
    from pretune.eval.task_eval import evaluate_on_task, read_task_info
    from pretune.model.io import load_model
    from pretune.train.dist import pick_device

    yaml_path, model_path, overrides = split_args(argv)
    e = load_config(EvaluateConfig, yaml_path, overrides, what="pretune evaluate")
    _check_evaluate_data_keys(e)
    if not e.data.val:
        raise ConfigError("pretune evaluate needs the text or records to evaluate on: data.val=FILE (or a glob)")
    device = pick_device(e.device)
    model_path = model_arg(model_path, "evaluate")
    info = read_task_info(model_path) if e.task != "lm" else {}
    if e.task != "lm" and (e.task or info.get("task")):
        r = evaluate_on_task(model_path, e, device, info)
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
        if e.out:
            Path(e.out).write_text(json.dumps(r, indent=2))
        return
    model, tok = load_model(model_path, device)
    seq_len = e.seq_len if e.seq_len is not None else model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise ConfigError(f"seq_len={seq_len} is longer than the model's context ({model.cfg.max_seq_len} tokens); "
                          f"set seq_len <= {model.cfg.max_seq_len} or leave it unset")
    e.data.train, e.data.val_fraction = list(e.data.val), 0.0
    e.data.val = []
    corpus = load_corpus(e.data, tok, seq_len)
    if max(s.n_tokens for s in corpus.train) < 2:
        raise ConfigError("data.val holds fewer than 2 tokens per source: there is nothing to predict; give more text")

    # every token scored once, the text's tail too (a last window that ends with it), e.max_tokens at most
    r = lm_metrics(model, lm_windows(corpus.train, seq_len, e.max_tokens), tok.token_bytes, device, e.batch_size)
    print(f"loss {r['loss']:.4f}  perplexity {r['ppl']:.3f}  bits/byte {r['bpb']:.4f}  ({r['tokens']:,} tokens)")
    if e.out:
        Path(e.out).write_text(json.dumps(r, indent=2))


def cmd_demo(argv):
    from pretune.demo import run_demo

    run_demo(argv)


HANDLERS = {"prepare": cmd_prepare, "pretrain": cmd_pretrain, "evaluate": cmd_evaluate,
            "generate": cmd_generate, "demo": cmd_demo}
# The config class a verb reads, for `pretune VERB --help`: (module, class).
CONFIG_OF = {"prepare": ("pretune.config", "Config"), "pretrain": ("pretune.config", "Config"),
             "generate": ("pretune.eval.options", "GenerateConfig"), "evaluate": ("pretune.eval.options", "EvaluateConfig"),
             "demo": ("pretune.demo", "DemoConfig")}


def _handler(verb: str):
    if verb in HANDLERS:
        return HANDLERS[verb]
    import importlib

    module, name = EXTERNAL[verb]
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # `pretune ... | head` closed the pipe: stop quietly, as other tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(verbs="\n".join(f"  {v:<10} {d}" for v, d in VERBS.items())))
        return 0
    if argv[0] in ("-V", "--version"):
        from pretune import __version__
        print(f"pretune {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        import difflib
        hint = difflib.get_close_matches(verb, VERBS, n=1)
        print(f"error: unknown verb {verb!r}" + (f"; did you mean {hint[0]}?" if hint else "") +
              "\nrun `pretune --help` for the list", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        from pretune.cli_help import verb_help

        print(verb_help(verb))
        return 0
    from pretune.errors import UserError

    try:
        code = _handler(verb)(rest)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if type(e).__name__ == "TrainingDiverged" else 2
    except KeyboardInterrupt:
        print("\ninterrupted; a run resumes from its last checkpoint with resume=OUT_DIR", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
