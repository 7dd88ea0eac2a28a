"""The decoder: RoPE, RMSNorm, SwiGLU, grouped-query attention, optional tied embeddings.

Plain PyTorch; it knows nothing of distribution, precision or adapters. Parameter names follow the
Hugging Face Llama layout (q_proj, gate_proj, ...) so checkpoints map onto it one to one.

Initialisation follows GPT-2 as nanoGPT applies it: normal(0, 0.02) for every matrix and embedding,
and the residual output projections (o_proj, down_proj) scaled by 1/sqrt(2 * n_layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretune.model.config import ModelConfig, resolve_model_config


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, (max_seq_len, head_dim), with optional Llama 3 frequency scaling."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
    sc = cfg.rope_scaling
    if sc and sc.get("rope_type", sc.get("type")) == "llama3":
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif sc and sc.get("rope_type", sc.get("type")) not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling {sc}; supported: llama3")
    t = torch.arange(cfg.max_seq_len, dtype=torch.float64, device=device)
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, D): the "rotate half" layout of HF Llama
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: (..., T, D) with cos/sin (T, D), or (B, T, H, D) with cos/sin (T, 1, D) or,
    a position per row, (B, T, 1, D)."""
    x1, x2 = x.chunk(2, dim=-1)  # a split, not two slices: its backward is one cat, not two zero-fills
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


@dataclass
class KVCache:
    """Pre-allocated keys and values for incremental decoding: (L, B, H_kv, T_max, D) each."""

    k: torch.Tensor
    v: torch.Tensor
    pos: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device, dtype) -> "KVCache":
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))


# On the CPU, projections that share their input (q/k/v, gate/up) run as one matrix product over
# concatenated weights when there are at least this many rows (batch x tokens): the copy of the
# weights is repaid by one larger product. Not on GPUs, where the copy would also keep weights
# alive that FSDP frees after each block's forward.
FUSE_MIN_ROWS = 128
# Causal attention on the CPU runs as two batched matrix products up to this length, SDPA's CPU
# kernel above it. Whole training steps, the two alternated in one process (2 threads, 2026-11-26):
# the same speed within 1% at 64, 128 and 256 tokens (the products are slightly ahead at 64), but
# the products keep the T x T probabilities for the backward: 14% more peak memory for a LoRA step
# of the `small` shape at 128 tokens (371 against 318 MiB), 12% at 256 (799 against 703 MiB).
CPU_MATMUL_ATTENTION_MAX_T = 64


def _fuse(x: torch.Tensor, *layers: nn.Module) -> bool:
    """Whether to run `layers` as one product: CPU, enough rows, and layers of one type whose
    weights may be concatenated: plain nn.Linear, or a type that says so itself through the static
    methods `can_fuse(x, layers)` and `fused_linear(x, layers, weight, bias, rows)` (lora.py's adapters; the
    model knows the protocol, not the adapters)."""
    if x.device.type != "cpu" or x.shape[:-1].numel() < FUSE_MIN_ROWS:
        return False
    kind = type(layers[0])
    if any(type(m) is not kind for m in layers):
        return False
    return kind is nn.Linear or (hasattr(kind, "can_fuse") and kind.can_fuse(x, layers))


def fused_linear(x: torch.Tensor, *layers: nn.Module, rows: torch.Tensor | None = None) -> torch.Tensor:
    """x through several linear layers that share their input, as one matrix product (`rows`: an
    order for the output features). Their weights and biases are concatenated here; a layer type
    other than nn.Linear adds its own part through its `fused_linear(x, layers, weight, bias, rows)`."""
    weight = torch.cat([m.weight for m in layers])
    bias = None if layers[0].bias is None else torch.cat([m.bias for m in layers])
    if rows is not None:
        weight, bias = weight.index_select(0, rows), None if bias is None else bias.index_select(0, rows)
    if type(layers[0]) is not nn.Linear:
        return type(layers[0]).fused_linear(x, layers, weight, bias, rows)
    return F.linear(x, weight, bias)


_PAIRED_ROWS: dict = {}


def _paired_rows(H: int, Hkv: int, D: int, device) -> torch.Tensor:
    """Output order of the fused q/k/v product that puts each rotate-half pair (i, i + D/2) of a
    q or k head side by side, so RoPE becomes one complex product; v keeps its order. Attention
    scores are dot products within a head, the same under any order applied to both q and k."""
    key = (H, Hkv, D, str(device))
    if key not in _PAIRED_ROWS:
        half = D // 2
        within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()  # 0, h, 1, h+1, ...
        qk = (torch.arange(H + Hkv)[:, None] * D + within).flatten()
        v = torch.arange((H + Hkv) * D, (H + 2 * Hkv) * D)
        _PAIRED_ROWS[key] = torch.cat([qk, v]).to(device)
    return _PAIRED_ROWS[key]


_CAUSAL_BIAS: dict = {}


def _causal_bias(T: int, device, dtype) -> torch.Tensor:
    """(T, T) additive mask: 0 on and below the diagonal, -inf above (cached per shape)."""
    key = (T, str(device), dtype)
    if key not in _CAUSAL_BIAS:
        _CAUSAL_BIAS[key] = torch.full((T, T), float("-inf"), device=device, dtype=dtype).triu(1)
    return _CAUSAL_BIAS[key]


def matmul_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal mask) v with batched matmuls; q/k/v: (B, H, T, D)."""
    B, H, T, D = q.shape
    scores = torch.baddbmm(_causal_bias(T, q.device, q.dtype), q.reshape(B * H, T, D),
                           k.reshape(B * H, T, D).transpose(1, 2), alpha=D ** -0.5)  # (B*H, T, T)
    return torch.bmm(scores.softmax(-1), v.reshape(B * H, T, D)).view(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.attn_dropout = cfg.attn_dropout

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, mask=None, positions=None):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (T, 1, D) or (B, T, 1, D): broadcast over heads
        if _fuse(x, self.q_proj, self.k_proj, self.v_proj):
            # in fp32 without a cache, RoPE as one complex product on q/k rows ordered in pairs;
            # keys stored in a cache keep the plain order (decoding steps use the unfused path).
            # Not under torch.compile: inductor leaves complex products to eager kernels, and the
            # real rotation it fuses is faster (a compiled step of the shakespeare-char shape at
            # 2 threads: 53.8 against 57.5 ms, 2026-11-26)
            paired = (cache is None and self.q_proj.weight.dtype == x.dtype == torch.float32
                      and not torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling())
            rows = _paired_rows(H, Hkv, D, x.device) if paired else None
            qkv = fused_linear(x, self.q_proj, self.k_proj, self.v_proj, rows=rows).view(B, T, H + 2 * Hkv, D)
            qk, v = qkv.split([H + Hkv, Hkv], dim=2)
            if paired:
                half = D // 2
                rot = torch.complex(cos[..., :half], sin[..., :half])  # (T, 1, D/2)
                qk = torch.view_as_real(torch.view_as_complex(qk.unflatten(-1, (half, 2))) * rot).flatten(-2)
            else:
                qk = apply_rope(qk, cos, sin)  # q and k rotated together
            q, k = qk.split([H, Hkv], dim=2)  # (B, T, H or Hkv, D)
        else:
            q = apply_rope(self.q_proj(x).view(B, T, H, D), cos, sin)
            k = apply_rope(self.k_proj(x).view(B, T, Hkv, D), cos, sin)
            v = self.v_proj(x).view(B, T, Hkv, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or Hkv, T, D)
        is_causal = mask is None
        if cache is not None and positions is not None:  # each token to its own slot (GPT.forward)
            rows = torch.arange(B, device=x.device)[:, None]  # (B, 1) against positions (B, T)
            cache.k[layer][rows, :, positions] = k.transpose(1, 2).to(cache.k.dtype)  # (B, T, Hkv, D)
            cache.v[layer][rows, :, positions] = v.transpose(1, 2).to(cache.v.dtype)
            k, v = cache.k[layer, :B, :, : cache.pos], cache.v[layer, :B, :, : cache.pos]
            is_causal = False
        elif cache is not None:
            start = cache.pos
            cache.k[layer, :B, :, start: start + T] = k
            cache.v[layer, :B, :, start: start + T] = v
            k, v = cache.k[layer, :B, :, : start + T], cache.v[layer, :B, :, : start + T]
            if start > 0 and mask is None:
                is_causal = False
                if T > 1:  # a chunk after a prefix: query i sees keys <= start + i
                    mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
        dropout = self.attn_dropout if self.training else 0.0
        if (x.device.type == "cpu" and cache is None and mask is None and dropout == 0.0
                and T <= CPU_MATMUL_ATTENTION_MAX_T and q.dtype == torch.float32):
            if Hkv != H:
                k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
            y = matmul_causal_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout,
                                               enable_gqa=Hkv != H)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        if _fuse(x, self.gate_proj, self.up_proj):
            gate, up = fused_linear(x, self.gate_proj, self.up_proj).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0, mask=None, positions=None):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache, layer, mask, positions))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    """Decoder-only language model. forward(idx) -> logits (B, T, V), or hidden states on request."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = resolve_model_config(cfg) if cfg.head_dim is None else cfg
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation (see the module docstring)."""
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, mask: torch.Tensor | None = None,
                return_hidden: bool = False, select: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V), or hidden states (B, T, C) with return_hidden. `select`: indices into the
        B * T flattened positions; only those go through the final norm and the output projection,
        and the result is (N, V) (or (N, C)). A fine-tuning batch scores a few response or label
        tokens per row: the projection onto the vocabulary, often the largest product of a small
        model, then runs on those alone.

        `positions` (B, T), with a cache whose rows hold sequences of different lengths (the serving
        engine): token t of row b is at position positions[b, t]; it is rotated by it, written to
        that slot of row b's cache and sees the row's slots up to it. Attention then reads the
        cache's first `cache.pos` slots, which the caller sets above every position and which is
        not advanced here."""
        B, T = idx.shape
        if positions is None:
            start = cache.pos if cache is not None else 0
            if start + T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[start: start + T], self.rope_sin[start: start + T]
        else:
            if cache is None or mask is not None or not 0 < cache.pos <= min(cache.k.shape[3], self.cfg.max_seq_len):
                raise ValueError("positions need a cache, no mask, and cache.pos (the slots read) from 1 to the "
                                 "cache's length")
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, D)
            mask = (torch.arange(cache.pos, device=idx.device) <= positions[..., None])[:, None]  # (B, 1, T, S)
        x = self.drop(self.tok_emb(idx))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i, mask, positions)
        if cache is not None and positions is None:
            cache.pos += T
        if select is not None:
            x = x.flatten(0, 1).index_select(0, select)  # (N, C)
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy in float32, ignoring targets of -100 (token-weighted by design)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
