"""A pretune model as one GGUF file in the layout llama.cpp reads for the `llama` architecture.

Tensors (numpy shapes as in PyTorch; GGUF stores the dimensions reversed, as llama.cpp expects):

    token_embd.weight            tok_emb.weight
    blk.N.attn_norm.weight       blocks.N.attn_norm.weight
    blk.N.attn_{q,k,v}.weight    blocks.N.attn.{q,k,v}_proj.weight   (q and k PERMUTED, see below)
    blk.N.attn_{q,k,v}.bias      blocks.N.attn.{q,k,v}_proj.bias     (Qwen2-style biases, q/k permuted)
    blk.N.attn_output.weight     blocks.N.attn.o_proj.weight
    blk.N.ffn_norm.weight        blocks.N.mlp_norm.weight
    blk.N.ffn_{gate,up,down}.weight  blocks.N.mlp.{gate,up,down}_proj.weight
    output_norm.weight           norm.weight
    output.weight                lm_head.weight  (left out when tied: llama.cpp reuses token_embd)
    rope_freqs.weight            Llama 3 RoPE scaling, one divisor per frequency (as llama.cpp's converter)

pretune (like transformers) rotates the two halves of a head, (x[i], x[i + D/2]); llama.cpp's `llama`
RoPE rotates neighbours, (x[2i], x[2i+1]). Reordering the rows of W_q and W_k within each head so that
row i goes to 2i and row i + D/2 to 2i + 1 makes both compute the same attention scores; this is the
permutation llama.cpp's convert_hf_to_gguf.py applies to Llama checkpoints.

Tokenizer: byte-level BPE (pretune's `bpe`, Llama 3, Qwen2, SmolLM) is written as model "gpt2" with
its tokens, token types and merges. pretune's character tokenizer is written the same way: each
character's token is spelled in the GPT-2 byte alphabet, and a multi-byte character gets the merges
that join its UTF-8 bytes (lead byte first), so llama.cpp's BPE tokenizer, which never merges across
characters, splits text into characters exactly as pretune does. (A character outside the vocabulary
becomes <|unk|> in pretune and is dropped by llama.cpp.) Other tokenizers are refused: export to hf
and use llama.cpp's converter.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pretune.interop.export_policy import check_no_classifier_head, exported_chat_template, exported_context
from pretune.interop.hf import InteropError, check_out, dtype_name, parse_dtype
from pretune.model.config import ModelConfig

ARCH = "llama"
_LEAF = {"attn_norm.weight": "attn_norm.weight", "mlp_norm.weight": "ffn_norm.weight",
         **{f"attn.{p}_proj.{k}": f"attn_{p}.{k}" for p in "qkv" for k in ("weight", "bias")},
         "attn.o_proj.weight": "attn_output.weight",
         **{f"mlp.{p}_proj.weight": f"ffn_{p}.weight" for p in ("gate", "up", "down")}}
_TOP = {"tok_emb.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
# tokenizer.ggml.pre names llama.cpp knows, recognised from the pre-tokenizer's regex.
_PRE_HINTS = (("\\p{N}{1,3}", "llama-bpe"), ("\\p{L}+|\\p{N}|", "qwen2"))


def gguf_name(name: str) -> str:
    """'blocks.3.attn.q_proj.weight' -> 'blk.3.attn_q.weight'."""
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".", 2)
    if parts[0] == "blocks" and len(parts) == 3 and parts[2] in _LEAF:
        return f"blk.{parts[1]}.{_LEAF[parts[2]]}"
    raise InteropError(f"tensor {name} has no GGUF name")


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half row order -> interleaved, per head: rows (i, i + D/2) become (2i, 2i + 1).
    Works for weights (H*D, in) and biases (H*D,)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of permute_qk."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg: ModelConfig) -> torch.Tensor | None:
    """Per-frequency divisors of Llama 3 RoPE scaling (llama.cpp's rope_freqs), or None."""
    sc = cfg.rope_scaling
    if not sc or sc.get("rope_type", sc.get("type")) != "llama3":
        return None
    factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
    old = sc["original_max_position_embeddings"]
    out = []
    for i in range(0, cfg.head_dim, 2):
        wavelen = 2 * math.pi * cfg.rope_theta ** (i / cfg.head_dim)
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def gguf_tensors(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, np.ndarray]:
    """Every tensor of the GGUF file: matrices in `dtype`, 1-D tensors (norms, biases) in float32."""
    from pretune.model.io import model_state

    cfg = model.cfg
    out = {}
    for name, t in model_state(model).items():
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            t = permute_qk(t, cfg.n_head)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            t = permute_qk(t, cfg.n_kv_head)
        t = t.float() if t.ndim == 1 else t.to(dtype)
        out[gguf_name(name)] = t.contiguous().numpy()
    factors = llama3_rope_factors(cfg)
    if factors is not None:
        out["rope_freqs.weight"] = factors.numpy()
    return out


def _pre_name(spec: dict, log: Callable[[str], None]) -> str:
    pre = json.dumps(spec.get("pre_tokenizer"))
    if '"Digits"' in pre and '"ByteLevel"' in pre:
        return "smollm"
    if '"Split"' not in pre and '"ByteLevel"' in pre and '"use_regex": true' in pre:
        return "gpt-2"
    for hint, name in _PRE_HINTS:
        if json.dumps(hint)[1:-1] in pre:
            return name
    log("warning: the tokenizer's pre-tokenizer is not one llama.cpp names; writing "
        "tokenizer.ggml.pre='default', so llama.cpp may split text differently")
    return "default"


def tokenizer_metadata(tok, vocab_size: int, log: Callable[[str], None] = print) -> dict:
    """tokenizer.ggml.* values: model, pre, tokens, token_type, merges, special ids, and the chat
    template (the tokenizer's own, else pretune's default: see interop.export_policy.exported_chat_template)."""
    import gguf

    T = gguf.TokenType
    spec = json.loads(tok.tok.to_str())
    kind = spec["model"]["type"]
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    n = tok.vocab_size
    if n > vocab_size:
        raise InteropError(f"the tokenizer has {n} tokens but the model only {vocab_size} embeddings")
    tokens = [tok.tok.id_to_token(i) for i in range(n)]
    types = [T.CONTROL if added.get(i, {}).get("special") else T.USER_DEFINED if i in added else T.NORMAL
             for i in range(n)]
    unk = tok.tok.token_to_id(spec["model"].get("unk_token") or "") if kind == "WordLevel" else None
    byte_level = '"ByteLevel"' in json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))
    if kind == "BPE" and byte_level:
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
        pre = _pre_name(spec, log)
    elif kind == "WordLevel" and all(len(t) == 1 for i, t in enumerate(tokens) if i not in added):
        tokens, merges = _char_as_byte_level(tokens, set(added))
        pre = "gpt-2"
        if unk is not None:
            types[unk] = T.UNKNOWN
    else:
        raise InteropError(f"GGUF export writes byte-level BPE and pretune's character tokenizers; this "
                           f"one is {kind}. Export with --format hf and convert that directory with "
                           "llama.cpp's convert_hf_to_gguf.py")
    if not merges:  # llama.cpp requires the key; a merge of two special tokens never applies
        specials = [tokens[i] for i in sorted(added)][:2]
        if len(specials) < 2:
            raise InteropError("a GGUF tokenizer needs at least one merge or two special tokens")
        merges = [" ".join(specials)]
    meta: dict = {"model": "gpt2", "pre": pre, "merges": merges}
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]  # embedding rows the tokenizer never uses
    types += [T.UNUSED] * (vocab_size - n)
    post = json.dumps(spec.get("post_processor"))
    meta.update(tokens=tokens, token_type=[int(t) for t in types], bos_token_id=tok.bos_id,
                eos_token_id=tok.eos_id, padding_token_id=tok.pad_id, unknown_token_id=unk,
                add_bos_token='"SpecialToken"' in post and '"TemplateProcessing"' in post,
                chat_template=exported_chat_template(tok))
    return meta


def _char_as_byte_level(tokens: list[str], special: set[int]) -> tuple[list[str], list[str]]:
    """Character tokens spelled in the GPT-2 byte alphabet, and the merges that build each
    multi-byte character from its bytes."""
    from pretune.data.tokenizer import _bytes_to_unicode

    alphabet = _bytes_to_unicode()
    out, merges, seen = [], [], set()
    for i, t in enumerate(tokens):
        if i in special:
            out.append(t)
            continue
        pieces = [alphabet[b] for b in t.encode("utf-8")]
        out.append("".join(pieces))
        left = pieces[0]
        for piece in pieces[1:]:
            merge = f"{left} {piece}"
            if merge not in seen:
                seen.add(merge)
                merges.append(merge)
            left += piece
    return out, merges


def _write_tokenizer(w, meta: dict) -> None:
    w.add_tokenizer_model(meta["model"])
    w.add_tokenizer_pre(meta["pre"])
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["token_type"])
    w.add_token_merges(meta["merges"])
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("padding_token_id", w.add_pad_token_id), ("unknown_token_id", w.add_unk_token_id)):
        if meta[key] is not None:
            add(meta[key])
    w.add_add_bos_token(meta["add_bos_token"])
    w.add_add_eos_token(False)
    if meta["chat_template"]:
        w.add_chat_template(meta["chat_template"])


def export_gguf(path: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False,
                log: Callable[[str], None] = print, lm_only: bool = False) -> Path:
    """Write a run or model directory as a GGUF file (OUT ending in .gguf, else OUT/model.gguf).
    A classification model is refused unless lm_only=True (see interop.export_policy.check_no_classifier_head)."""
    try:
        import gguf
    except ImportError:
        raise InteropError("--format gguf needs the gguf package: pip install 'pretune[gguf]'") from None
    from pretune.model.io import load_model

    want = parse_dtype(dtype)
    if want not in (torch.float32, torch.float16):
        raise InteropError(f"dtype={dtype} for GGUF: give float32 or float16")
    out = Path(out)
    file = out if out.suffix == ".gguf" else out / "model.gguf"
    check_out(file, overwrite)
    check_no_classifier_head(path, lm_only, log)
    model, tok = load_model(path)
    cfg = model.cfg
    sc = cfg.rope_scaling or {}
    if sc.get("rope_type", sc.get("type")) not in (None, "default", "llama3"):  # read as rope_tables does
        raise InteropError(f"rope_scaling {cfg.rope_scaling} has no GGUF form here")
    if cfg.qkv_bias and cfg.n_head * cfg.head_dim != cfg.d_model:
        raise InteropError("llama.cpp's llama graph sizes the q bias by d_model, but n_head * head_dim = "
                           f"{cfg.n_head * cfg.head_dim} != d_model = {cfg.d_model}; export with --format hf")
    tensors = gguf_tensors(model, want)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), ARCH)
    try:
        w.add_name(Path(path).resolve().name)
        f32 = want == torch.float32
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if f32 else gguf.LlamaFileType.MOSTLY_F16)
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(exported_context(path, cfg.max_seq_len))
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.d_ff)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        if tok is not None:
            _write_tokenizer(w, tokenizer_metadata(tok, cfg.vocab_size, log))
        else:
            log("warning: no tokenizer.json with the model; the GGUF file has no tokenizer")
        for name, array in tensors.items():
            w.add_tensor(name, array)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"exported GGUF ({ARCH}, {dtype_name(want)}, {len(tensors)} tensors) -> {file}")
    return file
