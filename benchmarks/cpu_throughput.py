"""pretune against Hugging Face transformers on this CPU: training tokens/s and peak memory.

The model is the shakespeare-char shape (4 layers, 128 wide, 4 heads, SwiGLU 352, context 64,
batch 12, character vocabulary) in three trainers, on the same batches:

- pretune: its real training loop (`pretune.train.loop.train`: fused AdamW, clipping, schedule,
  metrics), one metrics line per step;
- HF + plain loop: `LlamaForCausalLM` with the same configuration and starting weights, trained by
  a plain PyTorch loop (torch.optim.AdamW with its defaults, clipping);
- HF Trainer: the same model through `transformers.Trainer` (its default optimiser), step times
  from the end of one step to the end of the next.

Each round runs every trainer for a few dozen steps in a fresh process of its own (so each runs
as its users run it: pretune with its runtime settings, transformers with its defaults), the
three interleaved round after round because the machine is shared: only same-run ratios mean
anything. The first steps of each round are warm-up and left out. Peak memory is each process's
peak resident set while training, above the resident set it had after imports and data loading
(the peak is reset there through /proc/self/clear_refs); the full peak is shown too.

    python benchmarks/cpu_throughput.py                 # writes benchmarks/results/cpu_throughput.md/json
    python benchmarks/cpu_throughput.py --steps 20 --rounds 3 --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
ARCH = dict(n_layer=4, n_head=4, n_kv_head=4, d_model=128, d_ff=352, max_seq_len=64, tie_embeddings=True)
BATCH, SEQ, LR, WARMUP = 12, 64, 1e-3, 10
NAMES = ("pretune", "HF + plain loop", "HF Trainer")


def corpus_path(workdir: Path) -> Path:
    """tinyshakespeare when ../shared/data has it, else generated English-like text."""
    if SHAKESPEARE.is_file():
        return SHAKESPEARE
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while the cat sits on the mat".split()
    path = workdir / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(20000)))
    return path


def load_data(workdir: Path):
    """(tokenizer, PretrainData) built the way `pretune pretrain` builds them."""
    from pretune.config import DataConfig
    from pretune.data.corpus import PretrainData, build_tokenizer, load_corpus

    dcfg = DataConfig(train=[str(corpus_path(workdir))], tokenizer="char", cache_dir=str(workdir / "cache"))
    tok = build_tokenizer(dcfg, log=lambda *a: None)
    corpus = load_corpus(dcfg, tok, SEQ, log=lambda *a: None)
    return tok, PretrainData(corpus, SEQ, BATCH, None, 1337)


def pretune_model(vocab: int):
    from pretune.model.config import ModelConfig, resolve_model_config
    from pretune.model.gpt import GPT

    torch.manual_seed(0)
    return GPT(resolve_model_config(ModelConfig(preset="custom", **ARCH), vocab))


def hf_model(vocab: int):
    """LlamaForCausalLM with pretune's configuration, starting from the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pretune.interop.hf import hf_state_from_model, model_config_to_hf

    src = pretune_model(vocab)
    raw = {k: v for k, v in model_config_to_hf(src.cfg).items() if k not in ("architectures", "torch_dtype")}
    model = LlamaForCausalLM(LlamaConfig(**raw))
    missing, unexpected = model.load_state_dict(hf_state_from_model(src), strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    model.tie_weights()
    return model


class PretuneRunner:
    """Rounds of pretune's own loop; per-step times from its metrics.jsonl (log_every=1)."""

    def __init__(self, tok, data, workdir: Path):
        self.tok, self.data, self.workdir, self.round = tok, data, workdir, 0

    def run(self, steps: int) -> list[float]:
        from pretune.config import Config, load_config
        from pretune.train.dist import setup
        from pretune.train.loop import train
        from pretune.train.objectives import LMObjective

        self.round += 1
        out = self.workdir / f"pretune-{self.round}"
        out.mkdir()
        cfg = load_config(Config, None, [f"out_dir={out}", f"train.max_steps={steps}", "train.eval_every=0",
                                         "train.save_every=0", "train.log_every=1", "train.progress=false",
                                         f"optim.lr={LR}", f"optim.warmup_steps={WARMUP}", "optim.beta2=0.99"])
        model = pretune_model(self.tok.vocab_size)
        rt = setup("cpu", "fp32")
        train(model, cfg, rt, out, self.data, LMObjective(), None, None, log=lambda *a: None,
              save_final=lambda m, d: None)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [BATCH * SEQ / r["tokens_per_s"] for r in rows]


def hf_batch(rows: np.ndarray) -> dict:
    ids = torch.from_numpy(rows[:, :-1].copy())
    return {"input_ids": ids, "labels": ids.clone()}  # transformers shifts the labels itself


class HFPlainRunner:
    """LlamaForCausalLM trained by a plain PyTorch loop."""

    def __init__(self, tok, data):
        self.tok, self.data = tok, data

    def run(self, steps: int) -> list[float]:
        model = hf_model(self.tok.vocab_size)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.99), weight_decay=0.1)
        times = []
        for step in range(steps):
            t0 = time.perf_counter()
            batch = hf_batch(self.data.sampler.batch(step, BATCH))
            for g in opt.param_groups:
                g["lr"] = LR * min(1.0, (step + 1) / WARMUP)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.detach().item()  # the loss is read each step, as a training script logs it
            times.append(time.perf_counter() - t0)
        return times


class HFTrainerRunner:
    """The same model through transformers.Trainer; step times from a callback."""

    def __init__(self, tok, data, workdir: Path):
        self.tok, self.data, self.workdir = tok, data, workdir

    def run(self, steps: int) -> list[float]:
        from transformers import Trainer, TrainerCallback, TrainingArguments

        rows = np.concatenate([self.data.sampler.batch(s, BATCH) for s in range(steps)])
        dataset = [{k: v[0] for k, v in hf_batch(r[None]).items()} for r in rows]
        times: list[float] = []

        class Clock(TrainerCallback):  # wall time from one step's end to the next (data and all)
            def on_train_begin(self, args, state, control, **kw):
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                now = time.perf_counter()
                times.append(now - self.t0)
                self.t0 = now

        args = TrainingArguments(output_dir=str(self.workdir / "hf-trainer"), per_device_train_batch_size=BATCH,
                                 max_steps=steps, learning_rate=LR, weight_decay=0.1, adam_beta2=0.99,
                                 warmup_steps=WARMUP, lr_scheduler_type="cosine", max_grad_norm=1.0,
                                 logging_steps=10 ** 6, save_strategy="no", report_to=[], use_cpu=True,
                                 dataloader_num_workers=0, disable_tqdm=True, seed=1337)
        trainer = Trainer(model=hf_model(self.tok.vocab_size), args=args, train_dataset=dataset,
                          callbacks=[Clock()])
        trainer.train()
        return times


def runners(tok, data, workdir: Path) -> dict:
    return {"pretune": PretuneRunner(tok, data, workdir), "HF + plain loop": HFPlainRunner(tok, data),
            "HF Trainer": HFTrainerRunner(tok, data, workdir)}


def check_same_model(tok, data) -> dict:
    """Both models give the same loss on the same batch (the same architecture and weights)."""
    from pretune.model.gpt import cross_entropy_sum

    rows = data.sampler.batch(0, BATCH)
    a = pretune_model(tok.vocab_size)
    x = torch.from_numpy(rows)
    with torch.no_grad():
        lp = float(cross_entropy_sum(a(x[:, :-1]), x[:, 1:])) / x[:, 1:].numel()
        lh = float(hf_model(tok.vocab_size)(**hf_batch(rows)).loss)
    params = (sum(p.numel() for p in a.parameters()), sum(p.numel() for p in hf_model(tok.vocab_size).parameters()))
    return {"pretune_loss": lp, "hf_loss": lh, "params": params}


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(name: str, steps: int) -> None:
    """One round of one trainer in this (fresh) process; prints step times and memory as JSON."""
    workdir = Path(tempfile.mkdtemp(prefix="pretune-bench-"))
    tok, data = load_data(workdir)
    import transformers  # noqa: F401  (every child pays the same imports)

    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
        base, reset = _rss("VmRSS"), True
    except OSError:
        base, reset = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, False
    times = runners(tok, data, workdir)[name].run(steps)
    peak = _rss("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"times": times, "baseline_rss": base, "peak_rss": peak}))


def run_child(name: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--steps", str(args.steps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"{name} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def summarise(times: dict[str, list[float]]) -> dict:
    out = {}
    for name, ts in times.items():
        arr = np.asarray(ts)
        out[name] = {"steps": len(arr), "median_step_s": float(np.median(arr)),
                     "tokens_per_s": BATCH * SEQ / float(np.median(arr)),
                     "p25_tokens_per_s": BATCH * SEQ / float(np.percentile(arr, 75)),
                     "p75_tokens_per_s": BATCH * SEQ / float(np.percentile(arr, 25))}
    return out


def write_results(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_throughput.json").write_text(json.dumps(res, indent=2))
    s, mem = res["throughput"], res["memory"]
    best_hf = max(s["HF + plain loop"]["tokens_per_s"], s["HF Trainer"]["tokens_per_s"])
    lines = [
        "# CPU training throughput: pretune against Hugging Face transformers", "",
        f"- date: {res['date']}", f"- machine: {res['machine']}", f"- torch {res['torch']}, transformers "
        f"{res['transformers']}, {res['threads']} threads",
        f"- model: shakespeare-char shape ({res['check']['params'][0]:,} parameters in both), batch {BATCH} x "
        f"{SEQ} tokens, fp32; same starting weights (first-batch loss: pretune {res['check']['pretune_loss']:.5f}, "
        f"HF {res['check']['hf_loss']:.5f})",
        f"- {res['rounds']} interleaved rounds of {res['steps']} steps each, first {res['skip']} steps of each "
        "round left out; the machine is shared, so read the ratios", "",
        "| trainer | tokens/s (median) | interquartile | vs pretune | training peak RSS | whole peak RSS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in NAMES:
        r, m = s[name], mem.get(name, {})
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['p25_tokens_per_s']:,.0f}-{r['p75_tokens_per_s']:,.0f} "
                     f"| {r['tokens_per_s'] / s['pretune']['tokens_per_s']:.2f}x "
                     f"| +{(m.get('peak_rss', 0) - m.get('baseline_rss', 0)) / 2**20:,.1f} MiB "
                     f"| {m.get('peak_rss', 0) / 2**20:,.0f} MiB |")
    ratio = s["pretune"]["tokens_per_s"] / best_hf
    lines += ["", f"**pretune / faster HF trainer: {ratio:.2f}x** tokens/s "
              f"(target >= 1.3x: {'met' if ratio >= 1.3 else 'not met'}).", ""]
    lines += ["Training peak RSS: the peak resident set while training, above the resident set after imports "
              "and data loading (model, optimiser state, activations, allocator slack).", ""]
    lines += ["", "Command: `python benchmarks/cpu_throughput.py " + " ".join(res["argv"]) + "`", ""]
    if res.get("notes"):
        lines += ["## Notes", "", res["notes"], ""]
    (out / "cpu_throughput.md").write_text("\n".join(lines))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out of each round")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--notes", default="", help="a paragraph appended to the Markdown")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        child(args.child, args.steps)
        return 0
    import transformers

    workdir = Path(tempfile.mkdtemp(prefix="pretune-bench-"))
    tok, data = load_data(workdir)
    check = check_same_model(tok, data)
    print(f"same model: params {check['params']}, first-batch loss pretune {check['pretune_loss']:.5f} "
          f"HF {check['hf_loss']:.5f}", flush=True)
    times: dict[str, list[float]] = {n: [] for n in NAMES}
    mems: dict[str, list[dict]] = {n: [] for n in NAMES}
    for r in range(args.rounds):
        order = NAMES if r % 2 == 0 else NAMES[::-1]  # alternate the order against drift
        for name in order:
            out = run_child(name, args)
            ts = out.pop("times")[args.skip:]
            times[name] += ts
            mems[name].append(out)
            print(f"round {r + 1}: {name:16s} {BATCH * SEQ / np.median(ts):8,.0f} tokens/s, "
                  f"peak RSS +{(out['peak_rss'] - out['baseline_rss']) / 2**20:,.1f} MiB", flush=True)
    memory = {n: {k: float(np.median([m[k] for m in ms])) for k in ("baseline_rss", "peak_rss")}
              for n, ms in mems.items()}
    res = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(), "torch": torch.__version__,
           "transformers": transformers.__version__, "threads": torch.get_num_threads(), "steps": args.steps,
           "rounds": args.rounds, "skip": args.skip, "check": check, "throughput": summarise(times),
           "memory": memory, "argv": argv if argv is not None else sys.argv[1:], "notes": args.notes}
    write_results(res, Path(args.out))
    s = res["throughput"]
    print(json.dumps({n: round(s[n]["tokens_per_s"]) for n in NAMES}),
          f"pretune / faster HF: {s['pretune']['tokens_per_s'] / max(s[n]['tokens_per_s'] for n in NAMES[1:]):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
