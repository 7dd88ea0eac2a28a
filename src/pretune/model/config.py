"""Model architecture config and presets (plain data, no torch).

One decoder family, the one Llama, Mistral, Qwen2 and SmolLM share: RoPE, RMSNorm, SwiGLU,
grouped-query attention, optional tied embeddings and optional q/k/v biases.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from pretune.errors import ConfigError


@dataclass
class ModelConfig:
    """Architecture of the decoder. Fields left as None are taken from `preset`."""

    preset: str = "tiny"
    """Named size: 'tiny', 'mini', 'small', '125m', '350m' or '1b' (PRESETS), or 'custom' with every
    size field set; explicit fields below override it."""
    vocab_size: int | None = None
    """Vocabulary size; None takes it from the tokenizer."""
    n_layer: int | None = None
    """Number of transformer blocks."""
    n_head: int | None = None
    """Attention (query) heads."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention); equal to n_head for multi-head attention."""
    d_model: int | None = None
    """Width of the residual stream."""
    d_ff: int | None = None
    """Hidden width of the SwiGLU MLP."""
    head_dim: int | None = None
    """Width of one attention head; None means d_model // n_head."""
    max_seq_len: int | None = None
    """Longest context the RoPE tables are built for."""
    rope_theta: float | None = None
    """RoPE base frequency."""
    rope_scaling: dict | None = None
    """Optional Llama 3 style RoPE scaling: {factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings}."""
    norm_eps: float | None = None
    """Epsilon of RMSNorm."""
    tie_embeddings: bool | None = None
    """Share the input embedding with the output projection."""
    qkv_bias: bool | None = None
    """Biases on the q/k/v projections (Qwen2)."""
    dropout: float = 0.0
    """Dropout on the residual branches (attention output and MLP output)."""
    attn_dropout: float = 0.0
    """Dropout on the attention probabilities."""


# Literal data: named sizes. Parameter counts (with a 32k vocabulary, untied unless stated) are
# what `pretune plan` prints; the small ones are for tests and CPU runs.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=192, max_seq_len=256,
                 tie_embeddings=True),
    "mini": dict(n_layer=4, n_head=4, n_kv_head=4, d_model=128, d_ff=384, max_seq_len=256,
                 tie_embeddings=True),
    "small": dict(n_layer=6, n_head=6, n_kv_head=6, d_model=384, d_ff=1024, max_seq_len=512,
                  tie_embeddings=True),
    "125m": dict(n_layer=12, n_head=12, n_kv_head=12, d_model=768, d_ff=2048, max_seq_len=2048,
                 tie_embeddings=True),
    "350m": dict(n_layer=24, n_head=16, n_kv_head=16, d_model=1024, d_ff=2816, max_seq_len=2048,
                 tie_embeddings=True),
    "1b": dict(n_layer=16, n_head=32, n_kv_head=8, d_model=2048, d_ff=8192, max_seq_len=2048,
               tie_embeddings=True, rope_theta=500000.0),
}

DEFAULTS = dict(rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, qkv_bias=False)


def resolve_model_config(cfg: ModelConfig, vocab_size: int | None = None) -> ModelConfig:
    """Return a copy with every architecture field filled in (preset, then defaults, then checks)."""
    if cfg.preset not in PRESETS and cfg.preset != "custom":
        raise ConfigError(f"unknown model.preset {cfg.preset!r}; choose one of {', '.join(PRESETS)} "
                         "or 'custom' with every size field set")
    base = dict(DEFAULTS)
    base.update(PRESETS.get(cfg.preset, {}))
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    for name, value in values.items():
        if value is None and name in base:
            values[name] = base[name]
    if values["vocab_size"] is None:
        values["vocab_size"] = vocab_size
    if values["n_kv_head"] is None:
        values["n_kv_head"] = values["n_head"]
    out = replace(cfg, **values)
    missing = [n for n in ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "max_seq_len")
               if getattr(out, n) is None]
    if missing:
        raise ConfigError("model config lacks " + ", ".join(f"model.{m}" for m in missing))
    if out.head_dim is None:
        if out.d_model % out.n_head:
            raise ConfigError(f"model.d_model={out.d_model} is not divisible by model.n_head={out.n_head}; "
                             "change one of them or set model.head_dim")
        out.head_dim = out.d_model // out.n_head
    if out.n_head % out.n_kv_head:
        raise ConfigError(f"model.n_head={out.n_head} is not a multiple of model.n_kv_head={out.n_kv_head}")
    if out.head_dim % 2:
        raise ConfigError(f"head dimension {out.head_dim} must be even for RoPE")
    return out


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from the config alone (no allocation): total, embedding, and per block."""
    c = resolve_model_config(cfg) if cfg.head_dim is None else cfg
    q = c.n_head * c.head_dim
    kv = c.n_kv_head * c.head_dim
    attn = c.d_model * (q + 2 * kv) + q * c.d_model + ((q + 2 * kv) if c.qkv_bias else 0)
    mlp = 3 * c.d_model * c.d_ff
    block = attn + mlp + 2 * c.d_model
    emb = c.vocab_size * c.d_model
    head = 0 if c.tie_embeddings else emb
    total = emb + head + c.n_layer * block + c.d_model
    block_matmul = c.d_model * (q + 2 * kv) + q * c.d_model + mlp
    return {"total": total, "embedding": emb, "lm_head": head, "block": block,
            "block_matmul": block_matmul, "non_embedding": total - emb}


def flops_per_token(cfg: ModelConfig, seq_len: int, trainable: str = "all") -> dict[str, float]:
    """Training FLOPs per token (nanoGPT / PaLM convention: 6N + 12·L·H·Q·T).

    N counts the parameters used in matrix multiplies: every block and the output projection
    (tied or not), not the embedding lookup. `trainable` says how the backward pass is counted:
    "all" (6 per parameter), or "none" for inference (2 per parameter). Mixed cases (LoRA, freezing)
    are counted by `pretune.train.meter` from the live model.
    """
    counts = count_params(cfg)
    n_matmul = cfg.n_layer * counts["block_matmul"] + cfg.vocab_size * cfg.d_model
    attn = cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
    mult = 6 if trainable == "all" else 2
    return {"per_token": mult * n_matmul + 2 * mult * attn, "matmul_params": n_matmul}
