"""`pretune import SRC OUT` and `pretune export RUN OUT [--format hf|gguf] [--adapter] [--lm-only]`.

    pretune import meta-llama/Llama-3.2-1B models/llama-1b           # a hub id (online) ...
    pretune import path/to/hf_checkpoint models/tiny dtype=bfloat16  # ... or a local directory
    pretune export runs/cpt exports/cpt                              # transformers directory
    pretune export runs/lora exports/lora-adapter --adapter          # PEFT adapter of a LoRA run
    pretune export runs/lora exports/lora-adapter --adapter base=exports/base  # ... naming its base
    pretune export runs/cpt exports/cpt.gguf --format gguf dtype=float16
    pretune export runs/cls exports/cls-lm --lm-only                 # a classifier's LM, without its head

A Hugging Face directory can also be given directly to every verb that takes a model (generate,
evaluate, init_from=...): it is converted in memory. See docs/interop.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretune.errors import ConfigError


@dataclass
class InteropConfig:
    """Keys of `pretune import` and `pretune export` (positional: source, then output)."""

    format: str = "hf"
    """export: 'hf' (a transformers model directory) or 'gguf' (one file for llama.cpp);
    also --format X."""
    adapter: bool = False
    """export: write a LoRA run's adapter as a PEFT adapter instead of the merged model;
    also --adapter."""
    dtype: str = "float32"
    """Weights' type on disk: float32, bfloat16 or float16 (gguf: float32 or float16);
    import also takes 'auto' (as stored)."""
    max_seq_len: int | None = None
    """import: context length the RoPE tables are built for; None takes max_position_embeddings
    (capped to a sliding window in use)."""
    revision: str | None = None
    """import: branch, tag or commit of a hub id."""
    overwrite: bool = False
    """Replace an existing output."""
    base: str | None = None
    """export --adapter: the base model named in adapter_config.json's base_model_name_or_path (a hub id
    or the base's `pretune export` directory), so that peft's AutoPeftModelForCausalLM finds it; None:
    the hub id or directory the base was imported from, else the base's pretune path."""
    lm_only: bool = False
    """export: for a classification run (a language model plus a head), export the language model
    alone, without the head (which has no exact transformers or GGUF form); without it such a run is
    refused. Also --lm-only."""


HELP_CONFIG = InteropConfig


def _parse(argv: list[str], verb: str) -> tuple[str, str, InteropConfig]:
    """Positionals SRC OUT, `--format X` / `--format=X` / `--adapter` flags, KEY=VALUE keys."""
    from pretune.config import load_config

    positional, overrides = [], []
    args = list(argv)
    while args:
        a = args.pop(0)
        if a == "--format":
            if not args:
                raise ConfigError("--format needs a value: --format hf or --format gguf")
            overrides.append(f"format={args.pop(0)}")
        elif a.startswith("--format="):
            overrides.append(f"format={a.split('=', 1)[1]}")
        elif a == "--adapter":
            overrides.append("adapter=true")
        elif a == "--overwrite":
            overrides.append("overwrite=true")
        elif a == "--lm-only":
            overrides.append("lm_only=true")
        elif a.startswith("-"):
            raise ConfigError(f"unknown option {a}; options are --format hf|gguf, --adapter, --lm-only, "
                              "--overwrite")
        elif "=" in a:
            overrides.append(a)
        else:
            positional.append(a)
    usage = ("pretune import SRC OUT [dtype=float32]" if verb == "import" else
             "pretune export RUN OUT [--format hf|gguf] [--adapter] [--lm-only] [dtype=float32]")
    if len(positional) != 2:
        raise ConfigError(f"pretune {verb} takes two paths, got {len(positional)}: {usage}")
    cfg = load_config(InteropConfig, None, overrides)
    if cfg.format not in ("hf", "gguf"):
        raise ConfigError(f"format={cfg.format!r} is not one of hf, gguf")
    return positional[0], positional[1], cfg


def cmd_import(argv: list[str]) -> None:
    """Convert a Hugging Face checkpoint (directory or hub id) into a pretune model directory."""
    from pretune.interop.hf import import_hf

    src, out, cfg = _parse(argv, "import")
    if cfg.adapter or cfg.format != "hf" or cfg.lm_only or cfg.base is not None:
        raise ConfigError("pretune import reads Hugging Face checkpoints only (no format=/adapter=/lm_only=/"
                          "base= keys)")
    import_hf(src, out, cfg.dtype, cfg.max_seq_len, cfg.revision, cfg.overwrite)


def cmd_export(argv: list[str]) -> None:
    """Write a run or model directory as a transformers model, a PEFT adapter or a GGUF file."""
    run, out, cfg = _parse(argv, "export")
    if cfg.max_seq_len is not None or cfg.revision is not None:
        raise ConfigError("max_seq_len= and revision= are keys of pretune import, not export")
    if cfg.base is not None and not cfg.adapter:
        raise ConfigError("base= names the base model of a PEFT adapter: it goes with --adapter")
    if cfg.adapter:
        if cfg.format != "hf":
            raise ConfigError("--adapter writes a PEFT adapter (Hugging Face format); drop --format gguf")
        from pretune.interop.peft import export_peft_adapter

        export_peft_adapter(run, out, cfg.dtype, cfg.overwrite, lm_only=cfg.lm_only, base=cfg.base)
    elif cfg.format == "gguf":
        from pretune.interop.gguf import export_gguf

        export_gguf(run, out, cfg.dtype, cfg.overwrite, lm_only=cfg.lm_only)
    else:
        from pretune.interop.hf import export_hf

        export_hf(run, out, cfg.dtype, cfg.overwrite, lm_only=cfg.lm_only)
