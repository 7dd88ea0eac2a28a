"""`pretune plan [CONFIG.yaml] [KEY=VALUE ...]`: what a run will need before it is launched.

From the config alone (no model is allocated) it prints, per GPU: the memory of parameters,
gradients, AdamW state and activations for the strategy (full, freeze, LoRA), precision, micro-batch
and world size (DDP replicates everything, FSDP divides parameters, gradients and optimiser state by
the number of processes); and for the whole run: FLOPs, time and energy at a given MFU.

How the figures are counted:
- Parameters come from the same names and shapes the model builds (`param_shapes`), so the count
  is exact, and so are gradient (fp32, trainable only) and AdamW state (two fp32 moments per
  trainable element and a 4-byte step counter per trainable tensor) bytes. Under bf16 autocast
  trainable weights stay fp32 (master weights, with a bf16 copy per forward kept for the backward);
  frozen linear weights are stored in bf16 for the run, except under FSDP, whose mixed-precision
  policy casts the fp32 shards as it gathers them.
- Activations are the tensors autograd saves for backward in one micro-batch, listed per block
  from the model's code (`activation_bytes`). What this leaves out is small or transient: norm
  statistics, temporaries freed during the forward pass (logits before their log-softmax), the
  allocator's slack. The test holds the estimate within 25% of what a real forward pass saves
  on the CPU (saved-tensor hooks, each storage counted once) for full, freeze and LoRA.
- FLOPs per token follow the cost meter: 6 per trainable matmul parameter, 4 per frozen one that
  gradients flow through, 2 below the first trainable layer, plus attention 12·H·D·T per layer
  (4 below the first trainable one).
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from pretune.config import Config, load_config, validate_run
from pretune.errors import ConfigError
from pretune.model.config import ModelConfig, resolve_model_config

# Memory (GB) and board power (W) by GPU model; peak bf16 FLOP/s come from train.meter.PEAK_FLOPS.
# Memory per GPU in GiB: the "80 GB" of an H100 is 80 GiB of HBM (about 79.6 GiB usable); a plan fits
# when its total is within 95% of it (the rest: the CUDA context and the allocator's slack).
GPU_MEMORY_GB = {"H200": 141, "H200 NVL": 141, "H100": 80, "H100 NVL": 94, "H100 PCIe": 80, "H800": 80,
                 "GH200": 96, "A100": 80, "A800": 80, "L40S": 48, "L40": 48, "L4": 24, "A10": 24, "RTX 4090": 24,
                 "RTX 3090": 24, "V100": 32, "T4": 16}
GPU_POWER_W = {"H200": 700, "H200 NVL": 600, "H100": 700, "H100 NVL": 400, "H100 PCIe": 350, "H800": 700,
               "GH200": 900, "A100": 400, "A800": 400, "L40S": 350, "L40": 300, "L4": 72, "A10": 150,
               "RTX 4090": 450, "RTX 3090": 350, "V100": 300, "T4": 70}
GIB = 1024 ** 3


@dataclass
class PlanConfig(Config):
    """`pretune plan`: every key of a training run, plus the hardware to plan for."""

    world_size: int = 1
    """Processes (GPUs) the run will use: ddp replicates the model, fsdp divides its state."""
    gpu: str = "H100"
    """GPU model for peak FLOP/s, memory and power (H100, H200, A100, L4, ...), or 'cpu'."""
    mfu: float = 0.4
    """Model FLOPs utilisation to assume for the time estimate (0.3-0.5 is typical)."""
    power_w: float | None = None
    """Power per device in watts for the energy estimate; None uses the GPU's board power."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s per device; None takes the GPU's bf16 datasheet figure (set it for a CPU)."""
    json_out: str | None = None
    """Also write the figures to this JSON file."""


HELP_CONFIG = PlanConfig


# ----------------------------------------------------------------------------- architecture


def resolve_arch(cfg: Config) -> ModelConfig:
    """The architecture the run will build: init_from's config when set, else model.* (the
    vocabulary from data.tokenizer when it is a file, else data.vocab_size for BPE, 256 for char)."""
    if cfg.init_from:
        from pretune.model.io import find_model_dir, is_hf_model_dir, read_model_config

        model_dir = find_model_dir(cfg.init_from)
        if is_hf_model_dir(model_dir):
            from pretune.interop.hf import hf_to_model_config, read_hf_config

            return resolve_model_config(hf_to_model_config(read_hf_config(model_dir)))
        return resolve_model_config(read_model_config(model_dir))
    vocab = cfg.model.vocab_size
    if vocab is None:
        tok = Path(cfg.data.tokenizer)
        if cfg.data.tokenizer not in ("char", "bpe") and (tok.is_file() or (tok / "tokenizer.json").is_file()):
            from pretune.data.tokenizer import Tokenizer

            vocab = Tokenizer.load(tok).vocab_size  # as training counts it (special tokens once)
        else:
            vocab = cfg.data.vocab_size if cfg.data.tokenizer == "bpe" else 256
    return resolve_model_config(replace(cfg.model, vocab_size=vocab))


def param_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, as GPT builds them (a tied output head is not repeated)."""
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_emb.weight": (c.vocab_size, c.d_model)}
    for i in range(c.n_layer):
        b = f"blocks.{i}."
        shapes[b + "attn_norm.weight"] = (c.d_model,)
        for name, out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[f"{b}attn.{name}.weight"] = (out, c.d_model)
            if c.qkv_bias:
                shapes[f"{b}attn.{name}.bias"] = (out,)
        shapes[b + "attn.o_proj.weight"] = (c.d_model, q)
        shapes[b + "mlp_norm.weight"] = (c.d_model,)
        shapes[b + "mlp.gate_proj.weight"] = (c.d_ff, c.d_model)
        shapes[b + "mlp.up_proj.weight"] = (c.d_ff, c.d_model)
        shapes[b + "mlp.down_proj.weight"] = (c.d_model, c.d_ff)
    shapes["norm.weight"] = (c.d_model,)
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.d_model)
    return shapes


def _layer(name: str) -> int:
    parts = name.split(".")
    if "blocks" in parts:
        return int(parts[parts.index("blocks") + 1])
    return -1 if name.startswith("tok_emb") else 10 ** 9


def trainable_shapes(cfg: Config, c: ModelConfig) -> tuple[dict, dict, list[str]]:
    """(all parameters, trainable ones, LoRA-adapted linear layers) for cfg.method.

    Read defensively: the fine-tuning keys (method, lora.*, freeze.*) may be absent."""
    shapes = param_shapes(c)
    method = getattr(cfg, "method", "full") or "full"
    if method == "full":
        return shapes, dict(shapes), []
    if method == "freeze":
        fz = getattr(cfg, "freeze", None)
        patterns = list(getattr(fz, "pattern", []) or [])
        if patterns:
            names = [n for n in shapes if any(fnmatch.fnmatch(n, p) for p in patterns)]
            if c.tie_embeddings and any(fnmatch.fnmatch("lm_head.weight", p) for p in patterns):
                names.append("tok_emb.weight")  # the tied output layer is the embedding, as the run trains it
        else:
            first = c.n_layer - int(getattr(fz, "last_k", 2))
            names = [n for n in shapes if n.startswith(("norm.", "lm_head.")) or 0 <= first <= _layer(n) < 10 ** 9]
        return shapes, {n: shapes[n] for n in names}, []
    if method == "lora":
        lc = getattr(cfg, "lora", None)
        rank = int(getattr(lc, "rank", 8))
        targets = list(getattr(lc, "targets", None) or
                       ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        adapted, extra = [], {}
        for n, shp in shapes.items():
            module = n.rsplit(".", 1)[0]
            if n.endswith(".weight") and len(shp) == 2 and n.startswith("blocks.") and any(
                    module.rsplit(".", 1)[-1] == t or fnmatch.fnmatch(module, t) for t in targets):
                adapted.append(module)
                extra[module + ".lora_a"] = (rank, shp[1])
                extra[module + ".lora_b"] = (shp[0], rank)
        if not adapted:
            raise ConfigError(f"lora.targets={targets} matches no linear layer of the model")
        return {**shapes, **extra}, extra, adapted
    raise ConfigError(f"method={method!r} is not one of full, freeze, lora")


def flops_per_token(c: ModelConfig, shapes: dict, trainable: dict, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token, counted as train.meter counts them on the live model."""
    from pretune.train.meter import matmul_cost

    matmul = {n: s for n, s in shapes.items() if len(s) == 2 and not n.startswith("tok_emb")}
    if c.tie_embeddings:
        matmul["lm_head.weight"] = shapes["tok_emb.weight"]  # the alias is a matmul too
    first = min((_layer(n) for n in trainable), default=10 ** 9)
    if c.tie_embeddings and "tok_emb.weight" in trainable:
        trainable = dict(trainable, **{"lm_head.weight": shapes["tok_emb.weight"]})
    t = f = 0.0
    for n, s in matmul.items():
        cost = matmul_cost(n, n in trainable, first if trainable else None)
        if n in trainable:
            t += cost * math.prod(s)
        else:
            f += cost * math.prod(s)
    unit = c.n_head * c.head_dim * seq_len
    attn = sum((12 if i >= first else 4) * unit for i in range(c.n_layer))
    return {"trainable": t, "frozen": f, "attention": float(attn), "total": t + f + attn}


# ----------------------------------------------------------------------------- memory


def activation_bytes(c: ModelConfig, micro_batch: int, seq_len: int, a: int, device: str, method: str,
                     first_grad_layer: int, adapted: set[str], lora_rank: int, lora_dropout: float,
                     head_trainable: bool, checkpointing: bool) -> dict[str, float]:
    """Bytes autograd saves for backward in one micro-batch (a: bytes per element in compute).

    Per token and block (H heads, Hkv key/value heads, D head width, F the MLP width): both norm
    inputs (the fp32 residual stream); the inputs of projections whose weights train; attention's
    saved inputs (on the CPU up to 256 tokens: copies of q, k, v and the softmax, H·T per token;
    otherwise SDPA's q, k, v buffers, output and log-sum-exp); the MLP's gate, up and silu (3F).
    LoRA keeps each adapter's dropped-out input (plus its mask) and its rank-r activation, and the
    frozen base layers keep nothing. On the CPU the concatenated q/k/v and gate/up weights are kept
    per block (adapted ones too, when no adapter dropout keeps them apart). Blocks below the first
    layer that gradients reach keep nothing. The head keeps the final norm's input, the output
    projection's input when it trains, fp32 log-probabilities and the token ids."""
    d, H, Hkv, D, F, V, r = c.d_model, c.n_head, c.n_kv_head, c.head_dim, c.d_ff, c.vocab_size, lora_rank
    tokens = micro_batch * seq_len
    cpu = device == "cpu"
    train_w = method != "lora"  # plain projections whose weights train save their inputs

    def fused(layers: set[str]) -> bool:
        """Projections sharing an input run as one product on the CPU: all plain, or all adapted
        with no adapter dropout."""
        return cpu and tokens >= 128 and (not adapted & layers or (layers <= adapted and lora_dropout == 0))

    attn_fused, mlp_fused = fused({"q_proj", "k_proj", "v_proj"}), fused({"gate_proj", "up_proj"})

    mask = a if cpu else 1  # dropout masks: in the input's dtype on the CPU, bool on GPUs

    def inputs(width: int, layers: set[str], masked: bool = True) -> float:
        """What the projections in `layers` (sharing one input of `width`) keep of it."""
        if train_w:
            return a * width
        lora = adapted & layers
        if not lora:
            return 0.0
        if lora_dropout > 0:  # each adapter drops its input out on its own: a copy and a mask
            return len(lora) * width * (a + (mask if masked else 0))
        return a * width

    tok = 8 * d  # the two norms' inputs
    tok += inputs(d, {"q_proj", "k_proj", "v_proj"}) + inputs(H * D, {"o_proj"})
    tok += inputs(d, {"gate_proj", "up_proj"}) + inputs(F, {"down_proj"}) + 3 * a * F
    # LoRA's first block: its input needs no gradient (the embedding is frozen), so its first norm
    # and the q/k/v adapters' dropout keep nothing of it
    qkv = {"q_proj", "k_proj", "v_proj"}
    first_less = 0.0 if train_w else 4 * d + inputs(d, qkv) - inputs(d, qkv, masked=False)
    if cpu and seq_len <= 256 and a == 4:  # batched-matmul attention
        kv = H if Hkv != H else Hkv  # grouped keys/values are repeated
        tok += a * (H + 2 * kv) * D + 4 * H * seq_len
    elif attn_fused:  # rotated q/k buffer, the q/k/v buffer (v is a view of it), the output
        tok += a * ((H + Hkv) * D + (H + 2 * Hkv) * D + H * D) + 4 * H
    else:
        tok += a * (2 * H * D + 2 * Hkv * D) + 4 * H
    tok += a * r * len(adapted)
    # the concatenated weights, kept for the input's gradient whether they train or not
    weights = a * d * (((H + 2 * Hkv) * D if attn_fused else 0) + (2 * F if mlp_fused else 0))
    grad_layers = sum(1 for i in range(c.n_layer) if i >= first_grad_layer)
    per_block = tokens * tok + weights
    blocks = grad_layers * per_block - (tokens * first_less if grad_layers else 0)
    recompute = 0.0
    if checkpointing and grad_layers:  # each block keeps its input; one is recomputed at a time
        blocks, recompute = grad_layers * tokens * 4 * d, per_block
    head = tokens * (4 * d + (a * d if head_trainable else 0) + 4 * V + (8 if first_grad_layer < 0 else 0))
    return {"blocks": float(blocks), "head": float(head), "recompute": float(recompute),
            "total": float(blocks + head + recompute)}


def estimate(cfg: PlanConfig) -> dict:
    """Every figure `pretune plan` prints, as a dict (bytes, FLOPs, seconds, joules)."""
    from pretune.train.meter import PEAK_FLOPS

    c = resolve_arch(cfg)
    shapes, trainable, adapted = trainable_shapes(cfg, c)
    world = cfg.world_size
    fsdp = world > 1 and cfg.dist.strategy == "fsdp"
    device = "cpu" if cfg.gpu.lower() == "cpu" else "cuda"
    precision = cfg.train.precision
    bf16 = precision == "bf16" or (precision == "auto" and device == "cuda")
    a = 2 if bf16 else 4
    seq_len = cfg.train.seq_len or c.max_seq_len
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by world_size={world}")
    local = cfg.train.batch_size // world
    micro = min(cfg.train.micro_batch_size or local, local)

    n_params = sum(math.prod(s) for s in shapes.values())
    n_train = sum(math.prod(s) for s in trainable.values())
    shard = world if fsdp else 1
    # bf16 without FSDP: frozen linear weights are stored in bf16 for the run (train/frozen.py)
    linear = {n: math.prod(s) for n, s in shapes.items() if n.endswith(("proj.weight", "proj.bias", "lm_head.weight"))}
    frozen_bf16 = sum(v for n, v in linear.items() if n not in trainable) if bf16 and not fsdp else 0
    params_b = (4 * n_params - 2 * frozen_bf16) / shard
    grads_b = 4 * n_train / shard
    if fsdp and micro < local:  # FSDP2 accumulates unsharded fp32 gradients until the last micro-batch
        grads_b += 4 * n_train
    optim_b = (8 * n_train + 4 * len(trainable)) / shard
    first = min((_layer(n) for n in trainable), default=10 ** 9)
    lc = getattr(cfg, "lora", None)
    head_trainable = "lm_head.weight" in trainable or (c.tie_embeddings and "tok_emb.weight" in trainable)
    acts = activation_bytes(c, micro, seq_len, a, device, getattr(cfg, "method", "full") or "full", first,
                            {m.rsplit(".", 1)[-1] for m in adapted}, int(getattr(lc, "rank", 8)),
                            float(getattr(lc, "dropout", 0.0)), head_trainable, cfg.dist.activation_checkpointing)
    block = sum(math.prod(s) for n, s in shapes.items() if n.startswith("blocks.0."))
    root = n_params - c.n_layer * block
    if fsdp:  # gathered blocks (current and prefetched) and the root's gathered weights, in compute dtype
        transient = a * (2 * block + root) + 4 * block
    elif bf16:  # autocast keeps a bf16 copy of every fp32 (trainable) matmul weight from forward to backward
        transient = 2 * sum(math.prod(s) for n, s in shapes.items()
                            if len(s) == 2 and not n.startswith("tok_emb") and n in trainable)
    else:
        transient = 0.0
    total_mem = params_b + grads_b + optim_b + acts["total"] + transient

    fpt = flops_per_token(c, shapes, trainable, seq_len)
    tokens = cfg.train.max_steps * cfg.train.batch_size * seq_len
    flops = fpt["total"] * tokens
    gpu_key = next((k for k in PEAK_FLOPS if k.lower() == cfg.gpu.lower()), None)
    peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else (PEAK_FLOPS.get(gpu_key) if gpu_key else None)
    seconds = flops / (cfg.mfu * peak * world) if peak else None
    power = cfg.power_w or (GPU_POWER_W.get(gpu_key) if gpu_key else None)
    energy = seconds * power * world if (seconds is not None and power) else None
    capacity = GPU_MEMORY_GB.get(gpu_key) if gpu_key else None
    return {
        "model": {k: getattr(c, k) for k in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff",
                                             "max_seq_len", "tie_embeddings")},
        "method": getattr(cfg, "method", "full"), "strategy": cfg.dist.strategy if world > 1 else "single",
        "world_size": world, "precision": "bf16" if bf16 else "fp32", "device": cfg.gpu,
        "micro_batch": micro, "seq_len": seq_len, "grad_accum": local // micro,
        "params": n_params, "trainable_params": n_train, "trainable_tensors": len(trainable),
        "memory": {"params": params_b, "grads": grads_b, "optimizer": optim_b, "activations": acts["total"],
                   "transient": float(transient), "total": total_mem},
        "activation_parts": acts, "gpu_memory_gb": capacity, "fits": (total_mem <= capacity * GIB * 0.95) if capacity else None,
        "flops_per_token": fpt, "tokens": tokens, "flops": flops, "mfu": cfg.mfu,
        "peak_flops": peak, "time_s": seconds, "power_w": power, "energy_j": energy,
    }


def _gib(x: float) -> str:
    return f"{x / GIB:,.2f} GiB" if x >= GIB / 10 else f"{x / 1024 ** 2:,.2f} MiB"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:,.1f} s"
    if s < 7200:
        return f"{s / 60:,.1f} min"
    return f"{s / 3600:,.1f} h"


def format_plan(p: dict) -> str:
    """The figures as a short report."""
    m, mem = p["model"], p["memory"]
    lines = [
        f"model: {m['n_layer']} layers x {m['d_model']} wide, {m['n_head']} heads ({m['n_kv_head']} kv), "
        f"d_ff {m['d_ff']}, vocab {m['vocab_size']:,}, context {p['seq_len']}",
        f"parameters: {p['params']:,} (trainable {p['trainable_params']:,}, method {p['method']})",
        f"run: {p['strategy']} on {p['world_size']} x {p['device']}, {p['precision']}, micro-batch {p['micro_batch']} "
        f"x {p['grad_accum']} accumulation step(s) per rank",
        "",
        "memory per GPU:" if p["device"].lower() != "cpu" else "memory:",
        f"  parameters   {_gib(mem['params']):>14}",
        f"  gradients    {_gib(mem['grads']):>14}",
        f"  AdamW state  {_gib(mem['optimizer']):>14}",
        f"  activations  {_gib(mem['activations']):>14}   (one micro-batch)",
        f"  transient    {_gib(mem['transient']):>14}   (bf16 weight copies / gathered FSDP blocks)",
        f"  total        {_gib(mem['total']):>14}" + (
            f"   of {p['gpu_memory_gb']} GiB: {'fits' if p['fits'] else 'does NOT fit'}" if p["gpu_memory_gb"] else ""),
        "",
        f"compute: {p['flops_per_token']['total']:.4g} FLOPs/token x {p['tokens']:,} tokens = {p['flops']:.4g} FLOPs",
    ]
    if p["time_s"] is not None:
        lines.append(f"time at MFU {p['mfu']:.0%} of {p['peak_flops'] / 1e12:,.0f} TFLOP/s x {p['world_size']}: "
                     f"{_duration(p['time_s'])}")
    else:
        lines.append(f"time: no peak FLOP/s known for gpu={p['device']}; set peak_tflops=... (or gpu=H100, A100, L4)")
    if p["energy_j"] is not None:
        lines.append(f"energy at {p['power_w']:,.0f} W x {p['world_size']}: {p['energy_j'] / 3.6e6:,.3f} kWh")
    return "\n".join(lines)


def cmd_plan(argv: list[str]) -> int:
    """`pretune plan [CONFIG.yaml] [KEY=VALUE ...]`."""
    from pretune.cli import _split

    yaml_path, extra, overrides = _split(argv)
    if extra is not None:
        raise ConfigError(f"unexpected argument {extra!r}; pretune plan takes [CONFIG.yaml] [KEY=VALUE ...]")
    cfg = load_config(PlanConfig, yaml_path, overrides)
    problems = validate_run(cfg)
    if cfg.world_size < 1:
        problems.append(f"world_size={cfg.world_size} must be >= 1")
    if not 0 < cfg.mfu <= 1:
        problems.append(f"mfu={cfg.mfu} must be in (0, 1]")
    if problems:
        raise ConfigError(problems)
    p = estimate(cfg)
    print(format_plan(p))
    if cfg.json_out:
        Path(cfg.json_out).write_text(json.dumps(p, indent=2))
    return 0
