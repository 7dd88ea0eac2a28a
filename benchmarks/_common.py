"""What the CPU benchmarks share: the machine's description, the data, the two models compared
(pretune's GPT and a LlamaForCausalLM with the same configuration and starting weights, with LoRA
adapters on both when asked), the three trainers, per-process peak memory, fresh child processes
and step-time summaries.

Trainers, each run for a number of steps on the same batches:

- pretune: its real training loop (`pretune.train.loop.train`: fused AdamW, clipping, schedule,
  metrics), one metrics line per step, LoRA through `pretune.finetune.set_trainable`;
- HF + plain loop: `LlamaForCausalLM` (wrapped by peft's `get_peft_model` for LoRA) trained by a
  plain PyTorch loop (torch.optim.AdamW with its defaults on the trainable parameters, clipping);
- HF Trainer: the same model through `transformers.Trainer` (its default optimiser, fused AdamW).

Step times are wall time from the end of one step to the end of the next (for pretune, differences
of `wall_s` in its metrics.jsonl, so its logging counts too).

The benchmark scripts import it as `_common` (their own folder is first on sys.path when they run).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
# the shakespeare-char shape (nanoGPT's CPU recipe): 4 layers, 128 wide, 4 heads, SwiGLU 352
CHAR_ARCH = dict(n_layer=4, n_head=4, n_kv_head=4, d_model=128, d_ff=352, max_seq_len=64, tie_embeddings=True)
NAMES = ("pretune", "HF + plain loop", "HF Trainer")
COMPILED = tuple(f"{n} (compiled)" for n in NAMES)


@dataclass(frozen=True)
class Bench:
    """What every trainer of one comparison runs: model shape, batch, schedule, adapters."""

    arch: dict
    batch: int
    seq: int
    lr: float = 1e-3
    warmup: int = 10
    lora: dict | None = None
    """None: train every weight; else {"rank", "alpha", "targets"}: LoRA adapters (no dropout),
    only they trained."""

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def corpus_path(workdir: Path) -> Path:
    """tinyshakespeare when ../shared/data has it, else generated English-like text."""
    if SHAKESPEARE.is_file():
        return SHAKESPEARE
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while the cat sits on the mat".split()
    path = workdir / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(20000)))
    return path


def load_data(workdir: Path, seq: int, batch: int):
    """(tokenizer, PretrainData) with a character tokenizer, built the way `pretune pretrain` builds them."""
    from pretune.config import DataConfig
    from pretune.data.corpus import PretrainData, build_tokenizer, load_corpus

    dcfg = DataConfig(train=[str(corpus_path(workdir))], tokenizer="char", cache_dir=str(workdir / "cache"))
    tok = build_tokenizer(dcfg, log=lambda *a: None)
    corpus = load_corpus(dcfg, tok, seq, log=lambda *a: None)
    return tok, PretrainData(corpus, seq, batch, None, 1337)


def pretune_model(arch: dict, vocab: int):
    """pretune's GPT with `arch` (ModelConfig fields), seeded: the same weights every call."""
    import torch

    from pretune.model.config import ModelConfig, resolve_model_config
    from pretune.model.gpt import GPT

    torch.manual_seed(0)
    return GPT(resolve_model_config(ModelConfig(preset="custom", **arch), vocab))


def hf_llama(arch: dict, vocab: int):
    """LlamaForCausalLM with pretune's configuration, starting from the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pretune.interop.hf import hf_state_from_model, model_config_to_hf

    src = pretune_model(arch, vocab)
    raw = {k: v for k, v in model_config_to_hf(src.cfg).items() if k not in ("architectures", "torch_dtype")}
    model = LlamaForCausalLM(LlamaConfig(**raw))
    missing, unexpected = model.load_state_dict(hf_state_from_model(src), strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    model.tie_weights()
    return model


def hf_batch(rows: np.ndarray) -> dict:
    """(B, T + 1) token windows as transformers takes them: it shifts the labels itself."""
    import torch

    ids = torch.from_numpy(rows[:, :-1].copy())
    return {"input_ids": ids, "labels": ids.clone()}


def lora_overrides(lora: dict | None) -> list[str]:
    """pretune config overrides for the adapters (none for full training)."""
    if lora is None:
        return []
    return ["method=lora", f"lora.rank={lora['rank']}", f"lora.alpha={lora['alpha']}", "lora.dropout=0.0",
            f"lora.targets=[{','.join(lora['targets'])}]"]


def pretune_bench_model(bench: Bench, vocab: int, cfg=None):
    """pretune's model for `bench`, its adapters applied the way `pretune finetune method=lora` does."""
    from pretune.config import Config, load_config
    from pretune.finetune import set_trainable

    model = pretune_model(bench.arch, vocab)
    if bench.lora:
        set_trainable(model, cfg or load_config(Config, None, lora_overrides(bench.lora)))
    return model


def hf_bench_model(bench: Bench, vocab: int):
    """LlamaForCausalLM for `bench`, with peft LoRA adapters of the same rank, alpha and targets."""
    model = hf_llama(bench.arch, vocab)
    if not bench.lora:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=bench.lora["rank"], lora_alpha=bench.lora["alpha"], lora_dropout=0.0,
                                            target_modules=list(bench.lora["targets"]), bias="none"))


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """This process's peak resident set from now on: the kernel's high-water mark (VmHWM), reset
    to the current resident set through /proc/self/clear_refs; where that is not possible, the
    process's whole-life peak (getrusage)."""

    def __init__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset, self.baseline = True, _rss("VmRSS")
        except OSError:
            self.reset, self.baseline = False, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak(self) -> int:
        return _rss("VmHWM") if self.reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(script: str, args: list[str]) -> dict:
    """Run `python script ARGS` in a fresh process with pretune's src on the path; its last stdout
    line, a JSON object, is the result."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, str(Path(script).resolve()), *args], capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def summarise(times: dict[str, list[float]], tokens_per_step: int) -> dict:
    """Median tokens/s and its interquartile range from per-step times (seconds)."""
    out = {}
    for name, ts in times.items():
        arr = np.asarray(ts)
        out[name] = {"steps": len(arr), "median_step_s": float(np.median(arr)),
                     "tokens_per_s": tokens_per_step / float(np.median(arr)),
                     "p25_tokens_per_s": tokens_per_step / float(np.percentile(arr, 75)),
                     "p75_tokens_per_s": tokens_per_step / float(np.percentile(arr, 25))}
    return out


def step_times_from_metrics(run_dir: Path) -> list[float]:
    """Per-step wall times of a pretune run logged every step: differences of metrics.jsonl's
    wall_s, so each step counts all of its time, logging included."""
    walls = [json.loads(line)["wall_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [b - a for a, b in zip([0.0] + walls, walls)]


# ----------------------------------------------------------------------------- trainers


class PretuneRunner:
    """pretune's own loop; per-step times from its metrics.jsonl (log_every=1)."""

    def __init__(self, bench: Bench, tok, data, workdir: Path, compile: bool = False):
        self.bench, self.tok, self.data, self.workdir, self.compile = bench, tok, data, workdir, compile

    def run(self, steps: int) -> list[float]:
        from pretune.config import Config, load_config
        from pretune.train.dist import setup
        from pretune.train.loop import train
        from pretune.train.objectives import LMObjective

        b = self.bench
        out = Path(tempfile.mkdtemp(prefix="pretune-", dir=self.workdir))
        cfg = load_config(Config, None, [
            f"out_dir={out}", f"train.max_steps={steps}", f"train.batch_size={b.batch}",
            "train.eval_every=0", "train.save_every=0", "train.log_every=1", "train.progress=false",
            f"train.compile={str(self.compile).lower()}", f"optim.lr={b.lr}", f"optim.warmup_steps={b.warmup}",
            "optim.beta2=0.99", *lora_overrides(b.lora)])
        model = pretune_bench_model(b, self.tok.vocab_size, cfg)
        train(model, cfg, setup("cpu", "fp32"), out, self.data, LMObjective(), None, None, log=lambda *a: None,
              save_final=lambda m, d: None)
        return step_times_from_metrics(out)


class HFPlainRunner:
    """The HF model trained by a plain PyTorch loop."""

    def __init__(self, bench: Bench, tok, data, compile: bool = False):
        self.bench, self.tok, self.data, self.compile = bench, tok, data, compile

    def run(self, steps: int) -> list[float]:
        import torch

        b = self.bench
        model = hf_bench_model(b, self.tok.vocab_size)
        model.train()
        fwd = torch.compile(model) if self.compile else model
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=b.lr, betas=(0.9, 0.99), weight_decay=0.1)
        times = []
        t0 = time.perf_counter()
        for step in range(steps):
            batch = hf_batch(self.data.sampler.batch(step, b.batch))
            for g in opt.param_groups:
                g["lr"] = b.lr * min(1.0, (step + 1) / b.warmup)
            loss = fwd(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.detach().item()  # the loss is read each step, as a training script logs it
            now = time.perf_counter()
            times.append(now - t0)
            t0 = now
        return times


def step_clock(times: list[float]):
    """A transformers TrainerCallback appending each step's wall time to `times`: from one step's
    end to the next (data and all)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            times.append(now - self.t0)
            self.t0 = now

    return Clock()


class HFTrainerRunner:
    """The HF model through transformers.Trainer; step times from a callback."""

    def __init__(self, bench: Bench, tok, data, workdir: Path, compile: bool = False):
        self.bench, self.tok, self.data, self.workdir, self.compile = bench, tok, data, workdir, compile

    def run(self, steps: int) -> list[float]:
        from transformers import Trainer, TrainingArguments

        b = self.bench
        rows = np.concatenate([self.data.sampler.batch(s, b.batch) for s in range(steps)])
        dataset = [{k: v[0] for k, v in hf_batch(r[None]).items()} for r in rows]
        times: list[float] = []
        args = TrainingArguments(output_dir=str(self.workdir / "hf-trainer"), per_device_train_batch_size=b.batch,
                                 max_steps=steps, learning_rate=b.lr, weight_decay=0.1, adam_beta2=0.99,
                                 warmup_steps=b.warmup, lr_scheduler_type="cosine", max_grad_norm=1.0,
                                 logging_steps=10 ** 6, save_strategy="no", report_to=[], use_cpu=True,
                                 dataloader_num_workers=0, disable_tqdm=True, seed=1337, torch_compile=self.compile)
        trainer = Trainer(model=hf_bench_model(b, self.tok.vocab_size), args=args, train_dataset=dataset,
                          callbacks=[step_clock(times)])
        trainer.train()
        return times


def runners(bench: Bench, tok, data, workdir: Path) -> dict:
    """Every trainer by name, eager and compiled."""
    out = {}
    for names, compile in ((NAMES, False), (COMPILED, True)):
        out.update(zip(names, (PretuneRunner(bench, tok, data, workdir, compile),
                               HFPlainRunner(bench, tok, data, compile),
                               HFTrainerRunner(bench, tok, data, workdir, compile))))
    return out


def check_same_model(bench: Bench, tok, data) -> dict:
    """Both models give the same loss on the same batch (the same architecture and weights; LoRA
    adapters start at zero), and have as many parameters, trainable ones included. (In training,
    transformers' own loss leaves out each row's last target; the work per token is the same.)"""
    import torch

    from pretune.model.gpt import cross_entropy_sum

    x = torch.from_numpy(data.sampler.batch(0, bench.batch))
    a, h = pretune_bench_model(bench, tok.vocab_size), hf_bench_model(bench, tok.vocab_size)
    with torch.no_grad():  # the mean loss over the same targets (every next token of every row)
        lp = float(cross_entropy_sum(a(x[:, :-1]), x[:, 1:])) / x[:, 1:].numel()
        lh = float(cross_entropy_sum(h(input_ids=x[:, :-1]).logits, x[:, 1:])) / x[:, 1:].numel()

    def count(m, trainable=False):
        return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)

    return {"pretune_loss": lp, "hf_loss": lh, "params": (count(a), count(h)),
            "trainable": (count(a, True), count(h, True))}


def child(bench: Bench, name: str, steps: int) -> None:
    """One round of one trainer in this (fresh) process; prints step times and memory as JSON."""
    with tempfile.TemporaryDirectory(prefix="pretune-bench-") as tmp:
        workdir = Path(tmp)
        tok, data = load_data(workdir, bench.seq, bench.batch)
        import transformers  # noqa: F401  (every child pays the same imports)
        if bench.lora:
            import peft  # noqa: F401
        mem = PeakRSS()
        times = runners(bench, tok, data, workdir)[name].run(steps)
        print(json.dumps({"times": times, "baseline_rss": mem.baseline, "peak_rss": mem.peak()}))


def run_rounds(script: str, names: tuple[str, ...], rounds: int, skip: int, child_args, tokens_per_step: int):
    """Every trainer once per round, each in a fresh process (`script` with child_args(name)), the
    order reversed every other round against drift. Returns the step times after the first `skip`
    of each round, and the median memory figures, per trainer."""
    times: dict[str, list[float]] = {n: [] for n in names}
    mems: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            out = run_child(script, child_args(name))
            ts = out.pop("times")[skip:]
            times[name] += ts
            mems[name].append(out)
            print(f"round {r + 1}: {name:28s} {tokens_per_step / np.median(ts):8,.0f} tokens/s, "
                  f"peak RSS +{(out['peak_rss'] - out['baseline_rss']) / 2**20:,.1f} MiB", flush=True)
    memory = {n: {k: float(np.median([m[k] for m in ms])) for k in ("baseline_rss", "peak_rss")}
              for n, ms in mems.items()}
    return times, memory


def results_table(s: dict, mem: dict, names: tuple[str, ...]) -> list[str]:
    """Markdown rows: tokens/s and peak memory of each trainer, relative to the first."""
    ref, ref_mem = s[names[0]]["tokens_per_s"], training_rss(mem[names[0]])
    lines = ["| trainer | tokens/s (median) | interquartile | tokens/s vs pretune | training peak RSS "
             "| memory vs pretune | whole peak RSS |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        r, m = s[name], mem[name]
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['p25_tokens_per_s']:,.0f}-{r['p75_tokens_per_s']:,.0f} "
                     f"| {r['tokens_per_s'] / ref:.2f}x | +{training_rss(m) / 2**20:,.1f} MiB "
                     f"| {training_rss(m) / max(ref_mem, 1):.2f}x | {m['peak_rss'] / 2**20:,.0f} MiB |")
    return lines


def training_rss(mem: dict) -> float:
    """Peak resident set while training, above the resident set before it started."""
    return mem["peak_rss"] - mem["baseline_rss"]


def add_run_args(ap, threads_help: str = "torch threads (default: torch's choice)") -> None:
    """The options every side-by-side benchmark takes: threads, where results go, a notes paragraph,
    and the hidden --child that runs one trainer in a process of its own."""
    import argparse

    ap.add_argument("--threads", type=int, default=None, help=threads_help)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--notes", default="", help="a paragraph appended to the Markdown")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)


def run_argv(argv: list[str] | None) -> list[str]:
    """The command line to record with the results: as given, less `--out DIR` and `--notes TEXT`
    (where the results went and what was said of them are not part of the measurement)."""
    import sys

    given, kept = list(sys.argv[1:] if argv is None else argv), []
    while given:
        arg = given.pop(0)
        if arg in ("--out", "--notes"):
            given = given[1:]
        elif not arg.startswith(("--out=", "--notes=")):
            kept.append(arg)
    return kept


def write_report(out: Path, name: str, res: dict, lines: list[str]) -> None:
    """NAME.json (the results) and NAME.md (`lines`, then res["notes"] under ## Notes) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=2))
    if res.get("notes"):
        lines = lines + ["## Notes", "", res["notes"], ""]
    (out / f"{name}.md").write_text("\n".join(lines))
