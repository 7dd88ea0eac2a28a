"""GGUF export (llama.cpp): round trips through the gguf reader and transformers' GGUF loader with
the same logits and llama.cpp's RoPE, and the pre-tokenizer names llama.cpp knows."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from interop_models import LLAMA3, TEMPLATE, TOL, bpe, char, pretune_model, save_run  # noqa: F401 (fixtures)

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")


def rope_interleaved(x: torch.Tensor, pos: torch.Tensor, theta: float, factors=None) -> torch.Tensor:
    """llama.cpp's `llama` RoPE: rotate neighbouring pairs (x[2i], x[2i+1]) by pos * theta^(-2i/D) / f_i."""
    d = x.shape[-1]
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    if factors is not None:
        freq = freq / factors.double()
    ang = pos[:, None].double() * freq  # (T, D/2)
    cos, sin = ang.cos().float(), ang.sin().float()
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


@pytest.mark.parametrize("tok_kind, dtype, kw", [
    ("char", "float32", dict(tie_embeddings=False)),
    ("bpe", "float32", dict(tie_embeddings=True)),
    ("bpe", "float16", dict(tie_embeddings=True, qkv_bias=True, rope_scaling=LLAMA3)),
])
def test_gguf_export_round_trips_and_matches_llama_rope(tmp_path, request, tok_kind, dtype, kw):
    gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed")
    from pretune.interop.gguf import gguf_name, llama3_rope_factors, unpermute_qk
    from pretune.model.gpt import apply_rope
    from pretune.model.io import model_state

    tok = request.getfixturevalue(tok_kind)
    model = pretune_model(tok, **kw)
    run = save_run(model, tok, tmp_path / "run")
    assert run_cli("export", run, tmp_path / "out", "--format", "gguf", f"dtype={dtype}") == 0
    reader = gguf.GGUFReader(tmp_path / "out" / "model.gguf")
    cfg = model.cfg

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama"
    expect = {"llama.context_length": cfg.max_seq_len, "llama.embedding_length": cfg.d_model,
              "llama.block_count": cfg.n_layer, "llama.feed_forward_length": cfg.d_ff,
              "llama.attention.head_count": cfg.n_head, "llama.attention.head_count_kv": cfg.n_kv_head,
              "llama.rope.dimension_count": cfg.head_dim, "llama.vocab_size": cfg.vocab_size,
              "tokenizer.ggml.bos_token_id": tok.bos_id, "tokenizer.ggml.eos_token_id": tok.eos_id}
    assert {k: field(k) for k in expect} == expect
    assert field("llama.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size == len(field("tokenizer.ggml.token_type"))
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    if tok_kind == "bpe":
        assert tokens[:tok.vocab_size] == [tok.tok.id_to_token(i) for i in range(tok.vocab_size)]
        merges = json.loads(tok.tok.to_str())["model"]["merges"]
        assert field("tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
        assert field("tokenizer.chat_template") == TEMPLATE
    else:  # characters in the byte alphabet: ' ' -> 'Ġ', '\n' -> 'Ċ', 'é' -> 'Ã©' built by a merge
        assert [tokens[tok.encode(c)[0]] for c in " \nqé"] == ["\u0120", "\u010a", "q", "\u00c3\u00a9"]
        assert "\u00c3 \u00a9" in field("tokenizer.ggml.merges")
    assert field("tokenizer.ggml.token_type")[tok.eos_id] == gguf.TokenType.CONTROL

    # Every tensor, values included (q and k after undoing llama.cpp's permutation).
    sd = model_state(model)
    got = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    assert len(got) == len(sd) + (1 if kw.get("rope_scaling") else 0)
    assert ("output.weight" in got) != cfg.tie_embeddings
    assert "blk.1.attn_q.weight" in got and "blk.1.ffn_down.weight" in got and "output_norm.weight" in got
    for name, ref in sd.items():
        t = got[gguf_name(name)]
        assert t.dtype == (torch.float32 if ref.ndim == 1 else getattr(torch, dtype)), name
        assert tuple(t.shape) == tuple(ref.shape), name
        heads = cfg.n_head if ".q_proj." in name else cfg.n_kv_head if ".k_proj." in name else None
        t = unpermute_qk(t.float(), heads) if heads else t.float()
        assert torch.allclose(t, ref.float(), atol=1e-3 if dtype == "float16" else 0.0), name
    factors = llama3_rope_factors(cfg)
    if factors is not None:
        assert torch.equal(got["rope_freqs.weight"], factors)
        # pretune's scaled frequencies are llama.cpp's base frequencies divided by rope_freqs
        inv = cfg.rope_theta ** (-torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
        expect_cos = torch.cos(inv / factors.double()).float()
        assert torch.allclose(model.rope_cos[1, : cfg.head_dim // 2], expect_cos, atol=1e-6)

    # Attention scores with llama.cpp's neighbour RoPE on the permuted weights equal pretune's.
    x = torch.randn(12, cfg.d_model)
    pos = torch.arange(12)
    wq, wk = sd["blocks.0.attn.q_proj.weight"], sd["blocks.0.attn.k_proj.weight"]
    gq, gk = got["blk.0.attn_q.weight"].float(), got["blk.0.attn_k.weight"].float()
    if cfg.qkv_bias:
        q_ref = x @ wq.T + sd["blocks.0.attn.q_proj.bias"]
        k_ref = x @ wk.T + sd["blocks.0.attn.k_proj.bias"]
        q_gg, k_gg = x @ gq.T + got["blk.0.attn_q.bias"], x @ gk.T + got["blk.0.attn_k.bias"]
    else:
        q_ref, k_ref, q_gg, k_gg = x @ wq.T, x @ wk.T, x @ gq.T, x @ gk.T
    def heads(t, n):  # (T, n * D) -> (n, T, D)
        return t.view(12, n, cfg.head_dim).transpose(0, 1)

    cos, sin = model.rope_cos[:12], model.rope_sin[:12]
    q_ref = apply_rope(heads(q_ref, cfg.n_head), cos, sin)
    k_ref = apply_rope(heads(k_ref, cfg.n_kv_head), cos, sin)
    q_gg = rope_interleaved(heads(q_gg, cfg.n_head), pos, cfg.rope_theta, factors)
    k_gg = rope_interleaved(heads(k_gg, cfg.n_kv_head), pos, cfg.rope_theta, factors)
    rep = cfg.n_head // cfg.n_kv_head
    scores_ref = q_ref @ k_ref.repeat_interleave(rep, 0).transpose(1, 2)
    scores_gg = q_gg @ k_gg.repeat_interleave(rep, 0).transpose(1, 2)
    tol = 2e-2 if dtype == "float16" else 1e-4
    assert torch.allclose(scores_gg, scores_ref, atol=tol, rtol=tol)

    # An independent reader: transformers' own GGUF loader un-permutes q/k and builds a Llama.
    # (It ignores llama-arch q/k/v biases and rope_freqs, which llama.cpp reads, so those are
    # checked above only.)
    if not cfg.qkv_bias and not cfg.rope_scaling:
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model.gguf",
                                                               dtype=torch.float32).eval()
        idx = torch.randint(0, tok.vocab_size, (1, 30))
        with torch.no_grad():
            assert (hf(idx).logits - model(idx)).abs().max().item() <= TOL
        if tok_kind == "bpe":  # (its BPE builder wants every merge's halves in the vocabulary)
            hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file="model.gguf")
            text = "the quick café fox\nhello"
            assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.mark.parametrize("pre, name", [
    ("split:" + LLAMA3_SPLIT, "llama-bpe"),
    ("split:" + LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}"), "qwen2"),
    ("digits", "smollm"),
    ("bytelevel", "gpt-2"),
    ("split:[a-z]+", "default"),
])
def test_gguf_names_the_pre_tokenizer_llama_cpp_knows(pre, name):
    from tokenizers import Regex, pre_tokenizers

    from pretune.interop.gguf import _pre_name

    if pre.startswith("split:"):
        p = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pre[6:]), "isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre == "digits":
        p = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        p = pre_tokenizers.ByteLevel(add_prefix_space=False)
    warnings = []
    assert _pre_name({"pre_tokenizer": json.loads(p.__getstate__())}, warnings.append) == name
    assert bool(warnings) == (name == "default")


@pytest.mark.parametrize("scaling, freqs", [
    ({"type": "llama3", **{k: v for k, v in LLAMA3.items() if k != "rope_type"}}, True),  # the legacy key
    ({"rope_type": "default"}, False),
    ({"type": "default"}, False),
])
def test_gguf_export_reads_rope_scaling_as_the_model_does(tmp_path, char, scaling, freqs):
    """The keys the model's RoPE tables accept (rope_type or the legacy type; default or llama3)."""
    gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed")
    from pretune.interop.gguf import export_gguf, llama3_rope_factors

    run = save_run(pretune_model(char, rope_scaling=scaling), char, tmp_path / "run")
    export_gguf(run, tmp_path / "m.gguf", log=lambda s: None)
    got = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert ("rope_freqs.weight" in got) == freqs
    if freqs:
        expect = llama3_rope_factors(pretune_model(char, rope_scaling=LLAMA3).cfg)
        assert torch.equal(torch.from_numpy(got["rope_freqs.weight"].data.copy()), expect)
