"""Training throughput of pretune's decoder on one GPU: tokens/s, MFU and peak memory.

For presets near 125M, 350M and 1B parameters, on synthetic random tokens, two rows each:

- the bare step: the loop's step written out here (bf16 autocast, torch.compile, fused AdamW,
  gradient clipping, flash attention through SDPA) with the GPU synchronised only around the timed
  span: what the model and optimiser can do;
- pretune's loop: the same model through `pretune.train.loop.train`, what `pretune pretrain` runs,
  with its data hand-off, metrics and token accounting: what a user gets. The gap between the two
  rows is the loop's overhead.

A few warm-up steps (compilation) come first. MFU is the meter's FLOPs per token (6N + 12·L·H·Q·T)
times tokens/s over the GPU's dense bf16 peak (train.meter.PEAK_FLOPS).

    python benchmarks/gpu_throughput.py                               # 125m 350m 1b, results/gpu_throughput.*
    python benchmarks/gpu_throughput.py --preset 350m --micro-batch 16 --no-loop
    python benchmarks/gpu_throughput.py --device cpu --preset tiny --steps 2 --out /tmp/x   # a correctness run
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# (preset, micro-batch, sequence length) sized for an 80-141 GB GPU in bf16
DEFAULT_RUNS = [("125m", 16, 2048), ("350m", 16, 2048), ("1b", 8, 2048)]


def bench_one(preset: str, micro: int, seq_len: int, device: torch.device, steps: int, warmup: int,
              compile_on: bool, vocab: int, grad_accum: int = 1) -> dict:
    """Time `steps` optimiser steps of `preset` after `warmup` ones; return the figures."""
    from pretune.config import OptimConfig
    from pretune.model.config import ModelConfig, resolve_model_config
    from pretune.model.gpt import GPT, cross_entropy_sum
    from pretune.train.meter import flops_per_token, peak_flops
    from pretune.train.optim import build_optimizer

    torch.manual_seed(0)
    cfg = resolve_model_config(ModelConfig(preset=preset, max_seq_len=max(seq_len, 64)), vocab)
    model = GPT(cfg).to(device)
    optimizer = build_optimizer(model, OptimConfig(lr=3e-4), device)
    if compile_on:
        torch._dynamo.reset()  # each preset compiles afresh, not against the last one's recompile budget
    fwd = torch.compile(model) if compile_on else model
    cuda = device.type == "cuda"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (micro, seq_len + 1), generator=gen) for _ in range(4)]
    if cuda:
        batches = [b.pin_memory() for b in batches]
    n_targets = micro * seq_len * grad_accum

    def step(i: int) -> torch.Tensor:
        total = torch.zeros((), device=device)
        for j in range(grad_accum):
            rows = batches[(i * grad_accum + j) % len(batches)].to(device, non_blocking=True)
            with autocast:
                loss = cross_entropy_sum(fwd(rows[:, :-1]), rows[:, 1:])
            (loss / n_targets).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        last = step(warmup + i)
    loss = float(last) / n_targets  # the one host synchronisation
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    tokens = steps * n_targets
    tps = tokens / elapsed
    fpt = flops_per_token(model, seq_len)["total"]
    peak = peak_flops(device)
    out = {"preset": preset, "via": "step", "params": sum(p.numel() for p in model.parameters()), "micro_batch": micro,
           "grad_accum": grad_accum, "seq_len": seq_len, "tokens_per_step": n_targets, "steps": steps,
           "warmup_steps": warmup, "warmup_s": round(warm_s, 2), "step_s": elapsed / steps,
           "tokens_per_s": tps, "flops_per_token": fpt, "tflops": fpt * tps / 1e12,
           "mfu": fpt * tps / peak if peak else None, "loss": loss, "compile": compile_on,
           "precision": "bf16" if bf16 else "fp32",
           "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if cuda else None}
    del model, optimizer, fwd
    if cuda:
        torch.cuda.empty_cache()
    return out


class RandomTokens:
    """StepData of random token rows (what PretrainData hands the loop, without a corpus)."""

    def __init__(self, vocab: int, seq_len: int, batch: int, micro: int):
        self.vocab, self.seq_len, self.batch, self.micro = vocab, seq_len, batch, micro

    def micro_batches(self, step: int, rank: int, world: int) -> list[dict]:
        rows = torch.randint(0, self.vocab, (self.batch // world, self.seq_len + 1),
                             generator=torch.Generator().manual_seed(step * world + rank))
        return [{"input_ids": rows[i: i + self.micro, :-1], "targets": rows[i: i + self.micro, 1:]}
                for i in range(0, len(rows), self.micro)]


def loop_one(preset: str, micro: int, seq_len: int, device: torch.device, steps: int, warmup: int,
             compile_on: bool, vocab: int, grad_accum: int = 1) -> dict:
    """The same model and step through pretune's own training loop (`pretune.train.loop.train`, what
    `pretune pretrain` runs): its data hand-off (built ahead and pinned on CUDA), metrics and
    token accounting included. Timed from the metrics line at the end of warm-up to the last one;
    the loop logs every `warmup` steps, its only host synchronisations."""
    from pretune.config import Config, load_config
    from pretune.model.config import ModelConfig, resolve_model_config
    from pretune.model.gpt import GPT
    from pretune.train import dist
    from pretune.train.loop import train
    from pretune.train.meter import peak_flops
    from pretune.train.objectives import LMObjective

    every = max(1, warmup)
    steps = max(every, steps // every * every)
    cfg = load_config(Config, None, [
        f"model.preset={preset}", f"model.vocab_size={vocab}", f"train.max_steps={warmup + steps}",
        f"train.batch_size={micro * grad_accum}", f"train.micro_batch_size={micro}", f"train.seq_len={seq_len}",
        f"train.log_every={every}", "train.eval_every=0", "train.save_every=0", "train.progress=false",
        f"train.compile={str(compile_on).lower()}", f"train.device={device}", "optim.lr=3e-4",
        "optim.warmup_steps=1"])
    rt = dist.setup(cfg.train.device, cfg.train.precision)
    torch.manual_seed(0)
    model = GPT(resolve_model_config(ModelConfig(preset=preset, max_seq_len=max(seq_len, 64)), vocab))
    data = RandomTokens(vocab, seq_len, micro * grad_accum, micro)
    with tempfile.TemporaryDirectory(prefix="pretune-gpu-bench-") as tmp:
        summary = train(model, cfg, rt, Path(tmp), data, LMObjective(), log=lambda m: None,
                        save_final=lambda m, d: None)
        lines = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    first, last = (lines[0], lines[-1]) if warmup else ({"wall_s": 0.0, "tokens": 0}, lines[-1])
    tps = (last["tokens"] - first["tokens"]) / (last["wall_s"] - first["wall_s"])
    fpt = summary["flops_per_token"]["total"]
    peak = peak_flops(device)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"preset": preset, "via": "loop", "params": summary["params"], "micro_batch": micro,
            "grad_accum": grad_accum, "seq_len": seq_len, "tokens_per_step": micro * grad_accum * seq_len,
            "steps": steps, "warmup_steps": warmup, "warmup_s": round(first["wall_s"], 2) if warmup else 0.0,
            "step_s": (last["wall_s"] - first["wall_s"]) / steps, "tokens_per_s": tps, "flops_per_token": fpt,
            "tflops": fpt * tps / 1e12, "mfu": fpt * tps / peak if peak else None, "loss": last["loss"],
            "compile": compile_on, "precision": {"bfloat16": "bf16", "float32": "fp32"}.get(summary["precision"]),
            "peak_mem_bytes": summary["peak_mem_bytes"] if device.type == "cuda" else None}


def environment(device: torch.device) -> dict:
    env = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "torch": torch.__version__, "python": platform.python_version(),
           "device": str(device)}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   gpu_memory_gb=round(torch.cuda.get_device_properties(device).total_memory / 1e9, 1))
    else:
        env["gpu"] = "none (CPU run: a correctness check, not a throughput figure)"
    return env


def write_results(env: dict, results: list[dict], out: Path, argv: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_throughput.json").write_text(json.dumps({"environment": env, "results": results}, indent=2))
    lines = ["# GPU training throughput", "",
             f"- date: {env['date']}", f"- GPU: {env['gpu']}" + (f" ({env.get('gpu_memory_gb')} GB), CUDA {env.get('cuda')}"
                                                                   if env.get("cuda") else ""),
             f"- torch {env['torch']}, Python {env['python']}",
             "- synthetic random tokens; the step (bare, and through pretune's loop): bf16 autocast, torch.compile, fused AdamW, clipping, "
             "SDPA (flash) attention; MFU = (6N + 12·L·H·Q·T) x tokens/s / dense bf16 peak", "",
             "| preset | through | params | micro-batch x seq | tokens/s | TFLOP/s | MFU | peak memory | warm-up (compile) |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        via = {"step": "bare step", "loop": "pretune's loop"}[r["via"]]
        if "error" in r:
            lines.append(f"| {r['preset']} | {via} | | {r['micro_batch']} x {r['seq_len']} | failed: {r['error'][:80]} "
                         "| | | | |")
            continue
        mem = f"{r['peak_mem_bytes'] / 2**30:,.1f} GiB" if r["peak_mem_bytes"] else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(f"| {r['preset']} | {via} | {r['params'] / 1e6:,.0f}M | {r['micro_batch']} x {r['seq_len']} "
                     f"| {r['tokens_per_s']:,.0f} | {r['tflops']:,.1f} | {mfu} | {mem} | {r['warmup_s']:.0f} s |")
    lines += ["", "Command: `python benchmarks/gpu_throughput.py " + " ".join(argv) + "`", ""]
    (out / "gpu_throughput.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a correctness run")
    ap.add_argument("--preset", nargs="*", default=None, help="presets (default: 125m 350m 1b)")
    ap.add_argument("--micro-batch", type=int, default=None, help="sequences per forward pass")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on GPU, 1 on CPU)")
    ap.add_argument("--compile", choices=("auto", "true", "false"), default="auto",
                    help="torch.compile (auto: on for CUDA)")
    ap.add_argument("--vocab", type=int, default=32768, help="vocabulary size")
    ap.add_argument("--no-loop", action="store_true", help="time the bare step only, not pretune's loop too")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device; use --device cpu --preset tiny --steps 2 for a correctness run",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    compile_on = args.compile == "true" or (args.compile == "auto" and cuda)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    runs = DEFAULT_RUNS if not args.preset else [
        (p, next((m for q, m, _ in DEFAULT_RUNS if q == p), 4), next((t for q, _, t in DEFAULT_RUNS if q == p), 256))
        for p in args.preset]
    env = environment(device)
    print(json.dumps(env), flush=True)
    results = []
    for preset, micro, seq in runs:
        micro, seq = args.micro_batch or micro, args.seq_len or seq
        for via, fn in (("step", bench_one), ("loop", loop_one))[: 1 if args.no_loop else 2]:
            try:
                r = fn(preset, micro, seq, device, args.steps, warmup, compile_on, args.vocab, args.grad_accum)
            except torch.cuda.OutOfMemoryError as e:  # record it and go on with the next size
                r = {"preset": preset, "via": via, "micro_batch": micro, "seq_len": seq,
                     "error": f"out of memory: {e}"[:200]}
                torch.cuda.empty_cache()
            results.append(r)
            print(json.dumps(r), flush=True)
    write_results(env, results, Path(args.out), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
