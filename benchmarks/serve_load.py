"""Load test of `pretune serve`: N concurrent clients against the batching server and against the same
server in one-at-a-time mode (max_batch=1), in one run, on CPU.

The model is the `mini` preset with a character tokenizer and untrained weights (the speed of a
forward pass does not depend on what the weights learned). Each client sends `POST /v1/completions`
requests back to back (a prompt of 10-60 characters, max_tokens 32, temperature 1, a per-request
seed) for the given duration. Reported per mode: requests, errors, p50/p99 latency, completion
tokens per second, and the server's mean decode batch; then the ratio batched / one-at-a-time.

    python benchmarks/serve_load.py                       # 32 clients, 60 s per mode
    python benchmarks/serve_load.py --clients 8 --duration 10 --out /tmp/serve_load.md

The server runs as a subprocess (`python -m pretune serve ...`) with `threads` torch threads; the
clients run here, with asyncio and httpx. Results go to benchmarks/results/serve_load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from _common import ROOT, cpu_name

WORDS = ("the model reads a line of text and writes the next few words of it while the server "
         "batches many such requests together on one small cpu").split()


def build_model(directory: Path) -> Path:
    """mini preset + char tokenizer, untrained, saved as a model directory."""
    import torch

    from pretune.data.tokenizer import train_char
    from pretune.model.config import ModelConfig
    from pretune.model.gpt import GPT
    from pretune.model.io import save_model_dir

    torch.manual_seed(0)
    tok = train_char([" ".join(WORDS) + ".,!?\n"])
    model = GPT(ModelConfig(preset="mini", vocab_size=tok.vocab_size))
    return save_model_dir(model, directory / "mini-char", tokenizer=tok)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int, max_batch: int, threads: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pretune", "serve", str(model_dir), f"port={port}", f"max_batch={max_batch}",
         "max_concurrent=256", f"threads={threads}", "log_level=warning", "device=cpu"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start within 120 s")


async def load(url: str, clients: int, duration: float, max_tokens: int, seed: int) -> dict:
    rng = random.Random(seed)
    latencies: list[float] = []
    tokens = errors = 0
    error_samples: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        for _ in range(2):  # warm-up, not measured
            await http.post("/v1/completions", json={"prompt": "the", "max_tokens": 4})
        t0 = time.perf_counter()
        stop_at = t0 + duration

        async def client(k: int):
            nonlocal tokens, errors
            while time.perf_counter() < stop_at:
                prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))[:60]
                body = {"model": "mini-char", "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0,
                        "seed": rng.randrange(1 << 30)}
                start = time.perf_counter()
                try:
                    r = await http.post("/v1/completions", json=body)
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                    tokens += r.json()["usage"]["completion_tokens"]
                    latencies.append(time.perf_counter() - start)
                except Exception as e:  # counted and reported, never hidden
                    errors += 1
                    if len(error_samples) < 3:
                        error_samples.append(f"{type(e).__name__}: {e}")

        await asyncio.gather(*(client(k) for k in range(clients)))
        wall = time.perf_counter() - t0
        health = (await http.get("/health")).json()
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    return {"requests": len(lat), "errors": errors, "error_samples": error_samples, "wall_s": wall,
            "p50_s": pct(0.50), "p99_s": pct(0.99), "mean_s": statistics.fmean(lat) if lat else float("nan"),
            "tokens": tokens, "tokens_per_s": tokens / wall, "requests_per_s": len(lat) / wall,
            "mean_batch": health.get("mean_batch")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load per mode")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32, help="max_batch of the batching server")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_load.md")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp))
        for name, max_batch in (("batched", args.max_batch), ("one at a time", 1)):
            port = free_port()
            proc = start_server(model_dir, port, max_batch, args.threads)
            try:
                print(f"{name} (max_batch={max_batch}): {args.clients} clients for {args.duration:.0f} s ...",
                      flush=True)
                r = asyncio.run(load(f"http://127.0.0.1:{port}", args.clients, args.duration, args.max_tokens, 0))
            finally:
                proc.terminate()
                proc.wait(30)
            r["max_batch"] = max_batch
            results[name] = r
            print(f"  {r['requests']} requests, {r['errors']} errors, p50 {r['p50_s']:.3f} s, "
                  f"p99 {r['p99_s']:.3f} s, {r['tokens_per_s']:.1f} tokens/s, mean batch {r['mean_batch']}")
    load_after = os.getloadavg()
    b, s = results["batched"], results["one at a time"]
    ratio = b["tokens_per_s"] / s["tokens_per_s"] if s["tokens_per_s"] else float("nan")
    lines = [
        "# Serving under load: batched vs one at a time",
        "",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores visible; Linux {platform.release()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}",
        f"- load average (1 min) before / after: {load_before[0]:.1f} / {load_after[0]:.1f} "
        "(a shared machine: other jobs ran at the same time, so absolute figures are noisy; both modes "
        "ran back to back in the same run)",
        f"- model: `mini` preset (4 layers, d_model 128, context 256), character tokenizer, untrained weights; "
        f"server with {args.threads} torch thread(s) on CPU",
        f"- load: {args.clients} concurrent clients, each sending `POST /v1/completions` back to back for "
        f"{args.duration:.0f} s per mode; prompts of 10-60 characters, max_tokens={args.max_tokens}, "
        "temperature 1 (a sequence may end early at EOS; tokens/s counts the completion tokens returned)",
        "- command: `python benchmarks/serve_load.py" + (
            "" if (args.clients, args.duration, args.max_tokens) == (32, 60.0, 32)
            else f" --clients {args.clients} --duration {args.duration:g} --max-tokens {args.max_tokens}") + "`",
        "",
        "| mode | max_batch | requests | errors | p50 latency | p99 latency | completion tokens/s "
        "| mean decode batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['max_batch']} | {r['requests']} | {r['errors']} | {r['p50_s']:.3f} s | "
                     f"{r['p99_s']:.3f} s | {r['tokens_per_s']:.1f} | {r['mean_batch']} |")
    lines += ["", f"**Throughput ratio, batched / one at a time: {ratio:.2f}x**; "
              f"p50 latency ratio (one at a time / batched): {s['p50_s'] / b['p50_s']:.2f}x.", ""]
    for name, r in results.items():
        if r["error_samples"]:
            lines.append(f"- {name} errors, first ones: " + "; ".join(r["error_samples"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"ratio {ratio:.2f}x; wrote {args.out}")
    return 1 if b["errors"] or s["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
