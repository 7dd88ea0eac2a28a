"""`pretune plan [CONFIG.yaml] [KEY=VALUE ...]`: what a run will need before it is launched.

From the config alone (no model is allocated) it prints, per GPU: the memory of parameters,
gradients, AdamW state and activations for the strategy (full, freeze, LoRA), precision, micro-batch
and world size (DDP replicates everything, FSDP divides parameters, gradients and optimiser state by
the number of processes); and for the whole run: FLOPs, time and energy at a given MFU.

What run the config describes (the resumed run's config, the tokenizer's vocabulary, a classification
head, fine-tuning's finetune.max_len, the device, the run's own refusals) is found in plan_inputs.

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
from dataclasses import dataclass
from pathlib import Path

from pretune.config import Config, validate_run
from pretune.errors import ConfigError
from pretune.model.config import ModelConfig
from pretune.plan_inputs import NO_BF16, finished_note, load_plan_config, run_arch, run_inputs

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
    gpu: str | None = None
    """GPU model for peak FLOP/s, memory and power (H100, H200, A100, L4, ...), or 'cpu'. None: the CPU
    with train.device=cpu, else this machine's GPU (an H100, with a note, when it is not in the table or
    train.device=cuda and there is none here), else the CPU (where train.device=auto would run)."""
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
    """The architecture the run will build (plan_inputs.run_arch: the resumed run's, init_from's, or
    model.* with the vocabulary of the tokenizer the run will use)."""
    return run_arch(cfg)[0]


def param_shapes(c: ModelConfig, n_labels: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, as GPT builds them (a tied output head is not repeated),
    and a classification head's (model.heads.ClassifierModel: nn.Linear(d_model, n_labels))."""
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
    if n_labels is not None:
        shapes["head.weight"], shapes["head.bias"] = (n_labels, c.d_model), (n_labels,)
    return shapes


def _layer(name: str) -> int:
    parts = name.split(".")
    if "blocks" in parts:
        return int(parts[parts.index("blocks") + 1])
    return -1 if name.startswith("tok_emb") else 10 ** 9


def trainable_shapes(cfg: Config, c: ModelConfig, n_labels: int | None = None) -> tuple[dict, dict, list[str]]:
    """(all parameters, trainable ones, LoRA-adapted linear layers) for cfg.method; a
    classification head always trains (finetune.set_trainable).

    Read defensively: the fine-tuning keys (method, lora.*, freeze.*) may be absent."""
    shapes = param_shapes(c, n_labels)
    method = getattr(cfg, "method", "full") or "full"
    head = {n: s for n, s in shapes.items() if n.startswith("head.")}
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
        return shapes, {**{n: shapes[n] for n in names}, **head}, []
    if method == "lora":
        lc = getattr(cfg, "lora", None)
        rank = int(getattr(lc, "rank", 8))
        targets = list(getattr(lc, "targets", None) or [])  # none matches nothing, as apply_lora says
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
        return {**shapes, **extra}, {**extra, **head}, adapted
    raise ConfigError(f"method={method!r} is not one of full, freeze, lora")


def flops_per_token(c: ModelConfig, shapes: dict, trainable: dict, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token, counted as train.meter counts them on the live model: `lm_head` is
    the vocabulary projection's part (in total, as if it ran at every token) and `cls_head` a
    classification head's (not in total: it runs once per example); `forward`, `forward_attention`
    and `lm_head_forward` are a forward pass's (DPO's reference model)."""
    from pretune.train.meter import matmul_cost

    matmul = {n: s for n, s in shapes.items() if len(s) == 2 and not n.startswith("tok_emb")}
    if c.tie_embeddings:
        matmul["lm_head.weight"] = shapes["tok_emb.weight"]  # the alias is a matmul too
    first = min((_layer(n) for n in trainable), default=10 ** 9)
    if c.tie_embeddings and "tok_emb.weight" in trainable:
        trainable = dict(trainable, **{"lm_head.weight": shapes["tok_emb.weight"]})
    t = f = lm_head = cls_head = forward = 0.0
    for n, s in matmul.items():
        cost = matmul_cost(n, n in trainable, first if trainable else None)
        if n in trainable:
            t += cost * math.prod(s)
        else:
            f += cost * math.prod(s)
        if n.startswith("lm_head."):
            lm_head += cost * math.prod(s)
        elif n.startswith("head."):
            cls_head += cost * math.prod(s)
        else:
            forward += 2 * math.prod(s)
    unit = c.n_head * c.head_dim * seq_len
    attn = sum((12 if i >= first else 4) * unit for i in range(c.n_layer))
    return {"trainable": t, "frozen": f, "attention": float(attn), "total": t + f + attn - cls_head,
            "lm_head": lm_head, "cls_head": cls_head, "forward": forward,
            "forward_attention": float(4 * unit * c.n_layer), "lm_head_forward": 2.0 * c.vocab_size * c.d_model}


# ----------------------------------------------------------------------------- memory


def activation_bytes(c: ModelConfig, micro_batch: int, seq_len: int, a: int, device: str, method: str,
                     first_grad_layer: int, adapted: set[str], lora_rank: int, lora_dropout: float,
                     head_trainable: bool, checkpointing: bool, n_labels: int | None = None) -> dict[str, float]:
    """Bytes autograd saves for backward in one micro-batch (a: bytes per element in compute).

    Per token and block (H heads, Hkv key/value heads, D head width, F the MLP width): both norm
    inputs (the fp32 residual stream); the inputs of projections whose weights train; attention's
    saved inputs (on the CPU up to 256 tokens: copies of q, k, v and the softmax, H·T per token;
    otherwise SDPA's q, k, v buffers, output and log-sum-exp); the MLP's gate, up and silu (3F).
    LoRA keeps each adapter's dropped-out input (plus its mask) and its rank-r activation, and the
    frozen base layers keep nothing. On the CPU the concatenated q/k/v and gate/up weights are kept
    per block (adapted ones too, when no adapter dropout keeps them apart). Blocks below the first
    layer that gradients reach keep nothing. The head keeps the final norm's input, the output
    projection's input when it trains, fp32 log-probabilities and the token ids; a classification
    head (n_labels) instead the final norm's input and, per sequence, its last position's hidden
    state and the classes' fp32 log-probabilities (no vocabulary projection runs)."""
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
    ids = 8 if first_grad_layer < 0 else 0  # the embedding's backward keeps the token ids
    if n_labels is None:
        head = tokens * (4 * d + (a * d if head_trainable else 0) + 4 * V + ids)
    else:
        head = tokens * (4 * d + ids) + micro_batch * (a * d + 4 * n_labels)
    return {"blocks": float(blocks), "head": float(head), "recompute": float(recompute),
            "total": float(blocks + head + recompute)}


def estimate(cfg: PlanConfig) -> dict:
    """Every figure `pretune plan` prints, as a dict (bytes, FLOPs, seconds, joules)."""
    from pretune.train.meter import PEAK_FLOPS

    run = run_inputs(cfg)
    c, seq_len, n_labels = run.arch, run.seq_len, run.n_labels
    shapes, trainable, adapted = trainable_shapes(cfg, c, n_labels)
    world = cfg.world_size
    fsdp = world > 1 and cfg.dist.strategy == "fsdp"
    cpu = run.device == "cpu"
    precision = cfg.train.precision
    bf16 = precision == "bf16" or (precision == "auto" and not cpu and run.device not in NO_BF16)
    a = 2 if bf16 else 4
    # a step's rows: the task's examples (a preference example is two sequences) and replay text
    f = cfg.finetune
    n_replay = round(cfg.train.batch_size * f.replay_ratio) if cfg.task and f.replay and f.replay_ratio > 0 else 0
    task_rows = cfg.train.batch_size - n_replay
    if cfg.task:  # each rank gets as many rows (tasks.TaskBatches fills a short share up)
        if n_replay % world:
            raise ConfigError(f"finetune.replay_ratio={f.replay_ratio} gives {n_replay} replay rows per batch, "
                              f"which the {world} processes cannot share evenly")
        local = -(-task_rows // world)
    elif cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by world_size={world}")
    else:
        local = cfg.train.batch_size // world
    micro = min(cfg.train.micro_batch_size or local, local)
    per_row = 2 if cfg.task == "preference" else 1

    # a classification head's task batches never run the (untied) vocabulary projection: no gradient
    unused = {"lm_head.weight"} if n_labels is not None and not n_replay and not c.tie_embeddings else set()
    learning = {n: s for n, s in trainable.items() if n not in unused}
    n_params = sum(math.prod(s) for s in shapes.values())
    n_train = sum(math.prod(s) for s in trainable.values())
    n_learn = sum(math.prod(s) for s in learning.values())
    shard = world if fsdp else 1
    # bf16 without FSDP: frozen linear weights are stored in bf16 for the run (train/frozen.py)
    linear = {n: math.prod(s) for n, s in shapes.items() if n.endswith(("proj.weight", "proj.bias", "lm_head.weight"))}
    frozen_bf16 = sum(v for n, v in linear.items() if n not in trainable) if bf16 and not fsdp else 0
    params_b = (4 * n_params - 2 * frozen_bf16) / shard
    grads_b = 4 * n_learn / shard
    if fsdp and micro < local:  # FSDP2 accumulates unsharded fp32 gradients until the last micro-batch
        grads_b += 4 * n_learn
    optim_b = (8 * n_learn + 4 * len(learning)) / shard
    first = min((_layer(n) for n in trainable), default=10 ** 9)
    lc = getattr(cfg, "lora", None)
    head_trainable = "lm_head.weight" in trainable or (c.tie_embeddings and "tok_emb.weight" in trainable)

    def acts_of(rows: int, labels: int | None) -> dict[str, float]:
        return activation_bytes(c, rows, seq_len, a, "cpu" if cpu else "cuda", getattr(cfg, "method", "full") or "full",
                                first, {m.rsplit(".", 1)[-1] for m in adapted}, int(getattr(lc, "rank", 8)),
                                float(getattr(lc, "dropout", 0.0)), head_trainable, cfg.dist.activation_checkpointing,
                                labels)

    acts = acts_of(micro * per_row, n_labels)
    if n_replay:  # the replay rows are a micro-batch of their own, of language modelling
        acts = max(acts, acts_of(n_replay // world, None), key=lambda x: x["total"])
    block = sum(math.prod(s) for n, s in shapes.items() if n.startswith("blocks.0."))
    root = n_params - c.n_layer * block
    if fsdp:  # gathered blocks (current and prefetched) and the root's gathered weights, in compute dtype
        transient = a * (2 * block + root) + 4 * block
    elif bf16:  # autocast keeps a bf16 copy of every fp32 (trainable) matmul weight from forward to backward
        transient = 2 * sum(math.prod(s) for n, s in shapes.items()
                            if len(s) == 2 and not n.startswith("tok_emb") and n in learning)
    else:
        transient = 0.0
    total_mem = params_b + grads_b + optim_b + acts["total"] + transient

    fpt = flops_per_token(c, shapes, trainable, seq_len)
    if cfg.task:  # per sequence of at most seq_len tokens (meter.batch_flops counts the real batches)
        per_seq = seq_len * (fpt["total"] - fpt["lm_head"]) + (
            fpt["cls_head"] if n_labels is not None else seq_len * fpt["lm_head"])
        if cfg.task == "preference":  # DPO's reference model: a forward pass over the same sequences
            per_seq += seq_len * (fpt["forward"] + fpt["forward_attention"] + fpt["lm_head_forward"])
        tokens = run.steps * (task_rows * per_row + n_replay) * seq_len
        flops = run.steps * (task_rows * per_row * per_seq + n_replay * seq_len * fpt["total"])
    else:
        tokens = run.steps * cfg.train.batch_size * seq_len
        flops = fpt["total"] * tokens
    gpu = None if cpu else (run.device if run.device in PEAK_FLOPS else None)
    peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else (PEAK_FLOPS.get(gpu) if gpu else None)
    seconds = flops / (cfg.mfu * peak * world) if peak else None
    power = cfg.power_w or (GPU_POWER_W.get(gpu) if gpu else None)
    energy = seconds * power * world if (seconds is not None and power) else None
    capacity = GPU_MEMORY_GB.get(gpu) if gpu else None
    notes = list(run.notes)
    if peak and not cfg.peak_tflops and not bf16:
        notes.append(f"time: the run is fp32 but {run.device}'s peak is its bf16 figure; set peak_tflops= to "
                     "its fp32 (TF32) rate")
    return {
        "model": {k: getattr(c, k) for k in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff",
                                             "max_seq_len", "tie_embeddings")},
        "vocab_source": run.vocab, "task": cfg.task, "n_labels": n_labels, "steps": run.steps,
        "method": getattr(cfg, "method", "full"), "strategy": cfg.dist.strategy if world > 1 else "single",
        "world_size": world, "precision": "bf16" if bf16 else "fp32", "device": run.device,
        "micro_batch": micro, "seq_len": seq_len, "grad_accum": -(-local // micro),
        "params": n_params, "trainable_params": n_train, "trainable_tensors": len(trainable),
        "memory": {"params": params_b, "grads": grads_b, "optimizer": optim_b, "activations": acts["total"],
                   "transient": float(transient), "total": total_mem},
        "activation_parts": acts, "gpu_memory_gb": capacity, "fits": (total_mem <= capacity * GIB * 0.95) if capacity else None,
        "flops_per_token": fpt, "tokens": tokens, "flops": flops, "mfu": cfg.mfu,
        "peak_flops": peak, "time_s": seconds, "power_w": power, "energy_j": energy, "notes": notes,
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
    cpu = p["device"] == "cpu"
    task = f"task {p['task']}, " if p["task"] else ""
    upto = "at most " if p["task"] else ""
    head = f"; classification head {m['d_model']} x {p['n_labels']} + bias" if p["n_labels"] is not None else ""
    lines = [
        f"model: {m['n_layer']} layers x {m['d_model']} wide, {m['n_head']} heads ({m['n_kv_head']} kv), "
        f"d_ff {m['d_ff']}, vocab {m['vocab_size']:,}, context {m['max_seq_len']}",
        f"vocabulary: {p['vocab_source']}",
        f"parameters: {p['params']:,} (trainable {p['trainable_params']:,}, {task}method {p['method']}{head})",
        f"run: {p['strategy']} on {p['world_size']} x {'CPU' if cpu else p['device']}, {p['precision']}, "
        f"{p['steps']:,} steps of {upto}{p['seq_len']} tokens per sequence, micro-batch {p['micro_batch']} "
        f"x {p['grad_accum']} accumulation step(s) per rank",
        "",
        "memory:" if cpu else "memory per GPU:",
        f"  parameters   {_gib(mem['params']):>14}",
        f"  gradients    {_gib(mem['grads']):>14}",
        f"  AdamW state  {_gib(mem['optimizer']):>14}",
        f"  activations  {_gib(mem['activations']):>14}   (one micro-batch)",
        f"  transient    {_gib(mem['transient']):>14}   (bf16 weight copies / gathered FSDP blocks)",
        f"  total        {_gib(mem['total']):>14}" + (
            f"   of {p['gpu_memory_gb']} GiB: {'fits' if p['fits'] else 'does NOT fit'}" if p["gpu_memory_gb"] else ""),
        "",
        f"compute: {p['flops'] / max(p['tokens'], 1):.4g} FLOPs/token x {upto}{p['tokens']:,} tokens = "
        f"{upto}{p['flops']:.4g} FLOPs",
    ]
    if p["time_s"] is not None:
        lines.append(f"time at MFU {p['mfu']:.0%} of {p['peak_flops'] / 1e12:,.0f} TFLOP/s x {p['world_size']}: "
                     f"{_duration(p['time_s'])}")
    elif cpu:
        lines.append("time: not estimated for the CPU (no peak table); give peak_tflops= (the CPU's sustained "
                     "TFLOP/s in the run's precision) and mfu= to estimate it")
    else:
        lines.append(f"time: no peak FLOP/s known for gpu={p['device']}; set peak_tflops=... (or gpu=H100, A100, L4)")
    if p["energy_j"] is not None:
        lines.append(f"energy at {p['power_w']:,.0f} W x {p['world_size']}: {p['energy_j'] / 3.6e6:,.3f} kWh")
    lines += [f"note: {n}" for n in p["notes"]]
    return "\n".join(lines)


def cmd_plan(argv: list[str]) -> int:
    """`pretune plan [CONFIG.yaml] [KEY=VALUE ...]`; with resume=RUN, the plan of the resumed run."""
    cfg = load_plan_config(PlanConfig, argv)
    problems = validate_run(cfg)
    if cfg.world_size < 1:
        problems.append(f"world_size={cfg.world_size} must be >= 1")
    if not 0 < cfg.mfu <= 1:
        problems.append(f"mfu={cfg.mfu} must be in (0, 1]")
    if problems:
        raise ConfigError(problems)
    done = finished_note(cfg)
    if done:  # a finished run: no step left, so no figures (as `pretune pretrain resume=RUN` starts none)
        print(done)
        if cfg.json_out:
            Path(cfg.json_out).write_text(json.dumps({"finished": True, "steps": 0, "notes": [done]}, indent=2))
        return 0
    p = estimate(cfg)
    print(format_plan(p))
    if cfg.json_out:
        Path(cfg.json_out).write_text(json.dumps(p, indent=2))
    return 0
