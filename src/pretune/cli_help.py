"""`pretune VERB --help`: the verb's usage line and the keys it reads, from its config class's
field docstrings. No torch here: help stays fast."""

from __future__ import annotations

from pretune.cli import CONFIG_OF, EVALUATE_DATA_KEYS, EXTERNAL, PREPARE_KEYS, VERBS

# Each verb's command line, the first line of `pretune VERB --help`. A verb takes a YAML file of keys
# when its line names one.
VERB_USAGE = {
    "prepare": "pretune prepare [CONFIG.yaml] [KEY=VALUE ...]",
    "pretrain": "pretune pretrain [CONFIG.yaml] [KEY=VALUE ...]",
    "finetune": "pretune finetune [CONFIG.yaml] [KEY=VALUE ...]",
    "evaluate": "pretune evaluate MODEL [CONFIG.yaml] data.val=FILE [KEY=VALUE ...]",
    "generate": "pretune generate MODEL [CONFIG.yaml] [KEY=VALUE ...]",
    "chat": "pretune chat MODEL [CONFIG.yaml] [KEY=VALUE ...]",
    "study": "pretune study STUDY.yaml [KEY=VALUE ...]",
    "demo": "pretune demo [KEY=VALUE ...]",
    "import": "pretune import SRC OUT [KEY=VALUE ...]  (SRC: a Hugging Face directory or a hub id)",
    "export": "pretune export RUN OUT [--format hf|gguf] [--adapter] [--lm-only] [--overwrite] [KEY=VALUE ...]",
    "serve": "pretune serve MODEL [CONFIG.yaml] [KEY=VALUE ...] [--host H] [--port P] [--api-key K]",
    "plan": "pretune plan [CONFIG.yaml] [KEY=VALUE ...]",
}


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every field, for `pretune VERB --help`."""
    import ast
    import dataclasses
    import inspect
    import typing
    from dataclasses import fields, is_dataclass

    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if is_dataclass(k)]):  # a subclass's fields too
        try:
            tree = ast.parse(inspect.getsource(klass))
            body = tree.body[0].body
            for a, b in zip(body, body[1:]):
                if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                    docs[a.target.id] = " ".join(str(b.value.value).split())
        except (OSError, TypeError):
            pass
    rows = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        if is_dataclass(tp):
            rows += describe(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
        rows.append((f"{prefix}{f.name}", repr(default), docs.get(f.name, "")))
    return rows


# The keys a verb's help lists, where it reads only some of its config class's keys.
def _pretrain_reads(key: str) -> bool:
    """pretrain's keys: all but the fine-tuning ones, which it refuses (config.finetune_only_keys)."""
    from pretune.config import is_finetune_key

    return not is_finetune_key(key)


HELP_KEYS = {
    "prepare": PREPARE_KEYS,
    "pretrain": _pretrain_reads,
    "evaluate": lambda key: not key.startswith("data.") or key[len("data."):] in EVALUATE_DATA_KEYS,
    "import": ("dtype", "max_seq_len", "revision", "overwrite"),
    "export": ("format", "adapter", "dtype", "overwrite", "lm_only"),
}

# A key's help where the verb reads it otherwise than its docstring (written for training) says.
HELP_DOCS = {
    ("evaluate", "data.val"): "The text or task records to evaluate on: files, globs or directories.",
    ("prepare", "init_from"): "Tokenise with this run or model's tokenizer, as pretrain init_from=... will.",
    ("prepare", "resume"): "Tokenise with this run's tokenizer (and its config.yaml's data keys).",
    ("prepare", "train.seq_len"): "The validation text must hold one sequence of this many tokens; None: 1.",
}


def verb_help(verb: str) -> str:
    """`pretune VERB --help`: its usage line, what it does, and the keys it reads."""
    import importlib

    module, name = CONFIG_OF.get(verb) or (EXTERNAL[verb][0], "HELP_CONFIG")
    mod = importlib.import_module(module)
    cls = getattr(mod, name, None)  # an external verb's module names its config class HELP_CONFIG
    head = [f"usage: {VERB_USAGE[verb]}", "", f"pretune {verb}: {VERBS[verb]}"]
    if cls is None:
        return "\n".join(head) + "\n\n" + (mod.__doc__ or "")
    rows = describe(cls)
    shown = HELP_KEYS.get(verb)
    if shown is not None:
        rows = [r for r in rows if (shown(r[0]) if callable(shown) else r[0] in shown)]
    rows = [(k, v, HELP_DOCS.get((verb, k), d)) for k, v, d in rows]
    width = max(len(k) for k, _, _ in rows)
    where = "KEY=VALUE, or in the YAML file" if ".yaml" in VERB_USAGE[verb] else "KEY=VALUE"
    if verb == "prepare":
        where += "; a pretrain config file and command line work too: prepare reads only these keys of them"
    lines = [*head, "", f"keys ({where}):"]
    lines += [f"  {k:<{width}}  {d}  [default {v}]" for k, v, d in rows]
    return "\n".join(lines)
