"""Hugging Face checkpoints <-> pretune models, for the Llama family.

Supported on the way in: `model_type` llama (Llama 2/3 including Llama 3 RoPE scaling, SmolLM,
TinyLlama), mistral and qwen2 (Qwen2/2.5, q/k/v biases), from a local directory or a hub id.
Everything else, or an option pretune's decoder does not implement (MLP or output biases, other RoPE
scalings, partial rotary, quantised weights), is refused with a message that names it.

The two layouts differ only in names, so a conversion is a rename:

    model.embed_tokens                     tok_emb
    model.layers.{i}.input_layernorm       blocks.{i}.attn_norm
    model.layers.{i}.self_attn.{q,k,v,o}_proj    blocks.{i}.attn.{q,k,v,o}_proj
    model.layers.{i}.post_attention_layernorm    blocks.{i}.mlp_norm
    model.layers.{i}.mlp.{gate,up,down}_proj     blocks.{i}.mlp.{gate,up,down}_proj
    model.norm                             norm
    lm_head                                lm_head   (absent when the embeddings are tied)

Both use the "rotate half" RoPE layout, so q and k need no permutation (GGUF does; see gguf.py).
This module needs neither transformers nor huggingface_hub: huggingface_hub is imported for a hub
id, transformers only to convert a sentencepiece tokenizer.model that has no tokenizer.json.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from pretune.errors import UserError
from pretune.files import atomic_dir
from pretune.interop.source import resolve_source
from pretune.model.config import ModelConfig
from pretune.model.io import is_hf_model_dir, model_state, save_model_dir

# model_type -> the architecture class transformers builds for it.
SUPPORTED = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_TOP = {"model.embed_tokens.weight": "tok_emb.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight"}
_LAYER = {"input_layernorm.weight": "attn_norm.weight",
          "post_attention_layernorm.weight": "mlp_norm.weight",
          **{f"self_attn.{p}_proj.{k}": f"attn.{p}_proj.{k}" for p in "qkv" for k in ("weight", "bias")},
          "self_attn.o_proj.weight": "attn.o_proj.weight",
          **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_PT_LAYER = re.compile(r"^blocks\.(\d+)\.(.+)$")


class InteropError(UserError, ValueError):
    """A checkpoint or run that cannot be converted; the message says why and what to do."""


class UnsupportedModelError(InteropError):
    """An architecture or option that pretune's decoder does not implement."""


def parse_dtype(name: str, allow_auto: bool = False) -> torch.dtype | None:
    """'float32' | 'bfloat16' | 'float16' (or fp32/bf16/fp16); 'auto' (None: keep) where allowed."""
    if allow_auto and name == "auto":
        return None
    if name not in DTYPES:
        choices = "float32, bfloat16, float16" + (", auto" if allow_auto else "")
        raise InteropError(f"dtype={name!r} is not one of {choices}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_hf_config(directory: Path) -> dict:
    try:
        return json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InteropError(f"cannot read {directory}/config.json: {e}") from None


# ----------------------------------------------------------------------------- configs


def _rope(hf: dict, problems: list[str]) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either the classic keys or transformers 5's rope_parameters."""
    params = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    if params and all(isinstance(v, dict) for v in params.values()):  # per layer type
        params = params.get("full_attention", {})
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = hf.get("rope_scaling") or params or None
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        problems.append(f"rope_scaling of type {kind!r} (pretune implements the default RoPE and "
                        "'llama3' scaling)")
        return theta, None
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    absent = [k for k in keys if k not in scaling]
    if absent:
        problems.append(f"rope_scaling 'llama3' lacks {', '.join(absent)}")
        return theta, None
    return theta, {"rope_type": "llama3", **{k: scaling[k] for k in keys}}


def hf_to_model_config(hf: dict, max_seq_len: int | None = None,
                       log: Callable[[str], None] | None = None) -> ModelConfig:
    """A pretune ModelConfig from a transformers config.json, refusing what the decoder lacks."""
    mt = hf.get("model_type")
    archs = hf.get("architectures") or []
    if mt not in SUPPORTED:
        raise UnsupportedModelError(
            f"model_type {mt!r} ({', '.join(archs) or 'no architectures'}) is not supported; pretune "
            "imports the Llama family: llama (Llama 2/3, SmolLM, TinyLlama), mistral, qwen2")
    problems = []
    if archs and archs[0] != SUPPORTED[mt]:
        problems.append(f"architectures={archs} (only the causal LM {SUPPORTED[mt]} is imported)")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        problems.append(f"hidden_act={act!r} (the SwiGLU MLP uses silu)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=true (biases on the MLP projections)")
    if hf.get("attention_bias") and mt != "qwen2":
        problems.append("attention_bias=true (biases on q/k/v and o_proj; pretune has q/k/v biases "
                        "only, as Qwen2 does)")
    if hf.get("quantization_config"):
        problems.append("quantization_config (a quantised checkpoint; import the full-precision one)")
    if float(hf.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        problems.append(f"partial_rotary_factor={hf['partial_rotary_factor']} (RoPE on part of a head)")
    theta, scaling = _rope(hf, problems)
    try:
        d_model, n_head = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        sizes = dict(vocab_size=int(hf["vocab_size"]), n_layer=int(hf["num_hidden_layers"]),
                     d_ff=int(hf["intermediate_size"]))
    except KeyError as e:
        raise InteropError(f"config.json lacks {e.args[0]}") from None
    limit = int(hf.get("max_position_embeddings") or 2048)
    window = hf.get("sliding_window")
    uses_window = window is not None and (mt == "mistral" or hf.get("use_sliding_window")
                                          or "sliding_attention" in (hf.get("layer_types") or []))
    if uses_window and int(window) < limit:
        limit = int(window)
        if max_seq_len is None and log:
            log(f"note: sliding_window={window} < max_position_embeddings="
                f"{hf.get('max_position_embeddings')}: max_seq_len is capped to {window}, where the "
                "window never takes effect, so full attention is exact")
    if max_seq_len is not None and uses_window and max_seq_len > limit:
        problems.append(f"max_seq_len={max_seq_len} with sliding_window={window} in use (pretune's "
                        f"attention is full; give max_seq_len <= {window})")
    if problems:
        raise UnsupportedModelError(f"cannot import this {mt} checkpoint: " + "; ".join(problems))
    return ModelConfig(
        preset="custom", d_model=d_model, n_head=n_head,
        n_kv_head=int(hf.get("num_key_value_heads") or n_head),
        head_dim=int(hf.get("head_dim") or d_model // n_head),
        max_seq_len=int(max_seq_len or limit), rope_theta=theta, rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=mt == "qwen2", **sizes)


def model_config_to_hf(cfg: ModelConfig, tok=None, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for transformers: LlamaForCausalLM, or Qwen2ForCausalLM when q/k/v have biases.

    RoPE is written with the classic keys (rope_theta, rope_scaling) that every transformers
    version reads."""
    mt = "qwen2" if cfg.qkv_bias else "llama"
    out = {"architectures": [SUPPORTED[mt]], "model_type": mt, "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer,
           "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
           "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len,
           "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
           "tie_word_embeddings": bool(cfg.tie_embeddings), "hidden_act": "silu",
           "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True,
           "torch_dtype": dtype_name(dtype)}
    if mt == "llama":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    if tok is not None:
        out.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    return out


# ----------------------------------------------------------------------------- weights


def hf_to_pretune_name(name: str) -> str | None:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blocks.3.attn.q_proj.weight'; None if unknown."""
    if name in _TOP:
        return _TOP[name]
    m = _HF_LAYER.match(name)
    if m and m.group(2) in _LAYER:
        return f"blocks.{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


def pretune_to_hf_name(name: str) -> str:
    """The inverse of hf_to_pretune_name."""
    if name in _TOP_BACK:
        return _TOP_BACK[name]
    m = _PT_LAYER.match(name)
    if m and m.group(2) in _LAYER_BACK:
        return f"model.layers.{m.group(1)}.{_LAYER_BACK[m.group(2)]}"
    raise InteropError(f"tensor {name} has no Hugging Face name")


def read_hf_state(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: model.safetensors, sharded safetensors with their index, or
    (older checkpoints) pytorch_model.bin, sharded or not."""
    d = Path(directory)
    for index_name, single, kind in (("model.safetensors.index.json", "model.safetensors", "st"),
                                     ("pytorch_model.bin.index.json", "pytorch_model.bin", "pt")):
        if (d / index_name).is_file():
            weight_map = json.loads((d / index_name).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (d / single).is_file():
            files = [single]
        else:
            continue
        missing = [f for f in files if not (d / f).is_file()]
        if missing:
            raise InteropError(f"{d} lacks the weight shards {', '.join(missing[:3])} named in its index")
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(d / f)) if kind == "st" else
                      torch.load(d / f, map_location="cpu", weights_only=True, mmap=True))
        return sd
    raise InteropError(f"{d} holds no weights (expected model.safetensors, model.safetensors.index.json "
                       "with its shards, or pytorch_model.bin)")


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Parameter shapes of GPT(cfg) without allocating it (built on the meta device)."""
    from pretune.model.gpt import GPT

    with torch.device("meta"):
        ref = GPT(cfg)
    shapes = {k: v.shape for k, v in ref.state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def convert_hf_state(sd: dict[str, torch.Tensor], cfg: ModelConfig,
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Rename an HF state dict to pretune names, checking that it fits `cfg` exactly."""
    out, unknown = {}, []
    for name, tensor in sd.items():
        new = hf_to_pretune_name(name)
        if new is None:
            if not name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints carry
                unknown.append(name)
            continue
        out[new] = tensor if dtype is None else tensor.to(dtype)
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)  # transformers ignores a stored copy when tied too
    shapes = expected_shapes(cfg)
    missing = sorted(set(shapes) - set(out))
    wrong = [f"{k} {tuple(out[k].shape)} != {tuple(s)}" for k, s in shapes.items()
             if k in out and out[k].shape != s]
    problems = []
    if unknown:
        problems.append("tensors pretune's decoder has no place for (an unsupported option?): "
                        + ", ".join(unknown[:4]) + (" ..." if len(unknown) > 4 else ""))
    if missing:
        hint = " (tie_word_embeddings is false but there is no lm_head.weight)" if \
            missing == ["lm_head.weight"] else ""
        problems.append("missing tensors " + ", ".join(pretune_to_hf_name(m) for m in missing[:4]) + hint)
    if wrong:
        problems.append("shapes that do not match config.json: " + "; ".join(wrong[:3]))
    if problems:
        raise InteropError("the checkpoint does not fit its config: " + "; ".join(problems))
    return {k: v.contiguous() for k, v in out.items()}


def hf_state_from_model(model: torch.nn.Module,
                        dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A pretune model's weights under Hugging Face names (a tied lm_head is left out)."""
    return {pretune_to_hf_name(k): v.to(dtype).contiguous() for k, v in model_state(model).items()}


# ----------------------------------------------------------------------------- tokenizer


def load_hf_tokenizer(directory: Path, log: Callable[[str], None] | None = None):
    """pretune Tokenizer from tokenizer.json + tokenizer_config.json (special tokens), with the chat
    template from tokenizer_config.json, chat_template.jinja or chat_template.json. A directory with
    only a sentencepiece tokenizer.model is converted through transformers when it is installed."""
    from tokenizers import Tokenizer as HFTokenizer

    from pretune.data.tokenizer import Tokenizer, read_chat_template, role_tokens

    d = Path(directory)
    meta = _read_json(d / "tokenizer_config.json")
    if (d / "tokenizer.json").is_file():
        backend = HFTokenizer.from_file(str(d / "tokenizer.json"))
    else:
        try:
            from transformers import AutoTokenizer

            backend = AutoTokenizer.from_pretrained(str(d)).backend_tokenizer
        except Exception as e:  # transformers absent, or no tokenizer at all
            if log:
                log(f"warning: {d} has no tokenizer.json and it could not be converted ({e}); "
                    "the model is imported without a tokenizer")
            return None

    roles = role_tokens(meta)
    gen_eos = _read_json(d / "generation_config.json").get("eos_token_id")
    if roles["eos"] is None and gen_eos is not None:
        roles["eos"] = backend.id_to_token(gen_eos[0] if isinstance(gen_eos, list) else gen_eos)
    return Tokenizer(backend, **roles, chat_template=read_chat_template(d, meta))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def export_generation_config(model_dir: Path | None, tok) -> dict:
    """generation_config.json for an export: the one in `model_dir` when it has one (the imported
    original's, found through the lineage: export_policy.generation_config_dir, so a model trained
    from it keeps its sampling defaults and stop ids), with eos_token_id listing every token
    that ends generation in pretune as well: EOS and the chat template's end-of-turn token
    (data/templates.stop_ids); a list when there are several, as transformers reads it."""
    from pretune.data.templates import stop_ids

    gen = (_read_json(model_dir / "generation_config.json") if model_dir else {}) or {"_from_model_config": True}
    if tok is not None:
        old = gen.get("eos_token_id")
        old = old if isinstance(old, list) else [] if old is None else [old]
        eos = sorted(stop_ids(tok) | set(old))
        gen.update(bos_token_id=tok.bos_id, eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
                   pad_token_id=tok.pad_id)
    return gen


# ----------------------------------------------------------------------------- the operations


def load_hf_model(path: str | Path, device: str | torch.device = "cpu", **overrides):
    """(GPT, Tokenizer or None) straight from a Hugging Face directory, converted in memory."""
    from pretune.model.gpt import GPT
    from pretune.model.io import load_model_state

    d = Path(path)
    cfg = hf_to_model_config(read_hf_config(d), overrides.pop("max_seq_len", None))
    for key, value in overrides.items():
        setattr(cfg, key, value)
    tok = load_hf_tokenizer(d)
    check_vocab(tok, cfg.vocab_size, d)
    model = GPT(cfg)
    load_model_state(model, convert_hf_state(read_hf_state(d), cfg, torch.float32))
    return model.to(device), tok


def check_vocab(tok, n_embeddings: int, where) -> None:
    """Refuse a tokenizer with ids past the model's embeddings (they would fail in the first forward)."""
    if tok is not None and tok.vocab_size > n_embeddings:
        raise InteropError(f"{where}: the tokenizer has {tok.vocab_size} tokens but the model only "
                           f"{n_embeddings} embeddings; use the tokenizer the model was trained with")


def _module_from_state(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A GPT that holds `sd`'s tensors themselves (built on the meta device, nothing copied)."""
    from pretune.model.gpt import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse to replace an existing, non-empty output unless overwrite=true."""
    if out.exists() and (out.is_file() or any(out.iterdir())) and not overwrite:
        raise InteropError(f"{out} already exists; choose another output or pass overwrite=true")


def import_hf(src: str | Path, out: str | Path, dtype: str = "float32", max_seq_len: int | None = None,
              revision: str | None = None, overwrite: bool = False,
              log: Callable[[str], None] = print) -> Path:
    """Convert a Hugging Face checkpoint (directory or hub id) into a pretune model directory."""
    out = Path(out)
    check_out(out, overwrite)
    want = parse_dtype(dtype, allow_auto=True)
    d = resolve_source(src, revision)
    hf = read_hf_config(d)
    if not is_hf_model_dir(d):
        raise InteropError(f"{d}/config.json is not a Hugging Face model config (no model_type; or it "
                           "is a pretune model already, which needs no import)")
    cfg = hf_to_model_config(hf, max_seq_len, log)
    sd = convert_hf_state(read_hf_state(d), cfg, want)
    tok = load_hf_tokenizer(d, log)
    check_vocab(tok, cfg.vocab_size, d)
    save_model_dir(_module_from_state(cfg, sd), out, tok,
                   extra_config={"hf_source": str(d.resolve()) if Path(src).expanduser().is_dir() else str(src),
                                 "hf_revision": revision, "hf_model_type": hf["model_type"],
                                 # the original's context (a sliding window caps it), for exports
                                 "hf_context": hf_to_model_config(hf).max_seq_len})
    if (d / "generation_config.json").is_file():
        shutil.copyfile(d / "generation_config.json", out / "generation_config.json")
    n = sum(t.numel() for t in sd.values())
    log(f"imported {hf['model_type']} ({n / 1e6:.1f}M parameters, {cfg.n_layer} layers, "
        f"max_seq_len {cfg.max_seq_len}) -> {out}")
    return out


def export_hf(path: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False,
              log: Callable[[str], None] = print, lm_only: bool = False) -> Path:
    """Write a run or model directory as a transformers model directory (no custom code needed):
    config.json, model.safetensors, generation_config.json and the tokenizer files, whose chat
    template is the tokenizer's own or pretune's default (see export_policy.exported_chat_template).

    A classification model (one with a head) is refused unless lm_only=True, which exports its
    language model alone (see export_policy.check_no_classifier_head)."""
    from pretune.interop.export_policy import (check_no_classifier_head, exported_context, generation_config_dir,
                                               tokenizer_for_export)
    from pretune.model.io import load_model

    out = Path(out)
    check_out(out, overwrite)
    want = parse_dtype(dtype)
    check_no_classifier_head(path, lm_only, log)
    model, tok = load_model(path)
    cfg = model.cfg
    gen = export_generation_config(generation_config_dir(path), tok)
    hf_cfg = model_config_to_hf(cfg, tok, want)
    hf_cfg["max_position_embeddings"] = exported_context(path, cfg.max_seq_len)
    if tok is not None:
        hf_cfg["eos_token_id"] = gen["eos_token_id"]  # the same stop ids in both files
    with atomic_dir(out) as tmp:
        save_file(hf_state_from_model(model, want), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        if tok is not None:
            tokenizer_for_export(tok).save(tmp)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tok is None:
        log(f"warning: {path} has no tokenizer.json; the export has none either")
    log(f"exported {SUPPORTED['qwen2' if cfg.qkv_bias else 'llama']} ({dtype_name(want)}) -> {out}")
    return out
