"""LoRA fine-tuning on this CPU: pretune against Hugging Face transformers + peft, tokens/s and peak memory.

The same Llama-family model on both sides (pretune's GPT and LlamaForCausalLM with the same
configuration and starting weights), the same adapters (rank 8, alpha 16, no dropout, on q_proj,
k_proj, v_proj and o_proj; everything else frozen), the same batches of the same text, the same
AdamW settings on the adapter parameters only. Three trainers (see _common.py):

- pretune: its real loop, the adapters applied by `pretune.finetune.set_trainable` as
  `pretune finetune method=lora` applies them;
- HF + plain loop: `peft.get_peft_model(LlamaForCausalLM, LoraConfig(...))` in a plain PyTorch loop;
- HF Trainer: the same peft model through `transformers.Trainer`.

Each round runs every trainer for a few dozen steps in a fresh process of its own, interleaved round
after round because the machine is shared: only same-run ratios mean anything. The first steps of
each round are warm-up and left out; tokens/s is the median over the remaining steps. Peak memory is
the process's peak resident set while training (model construction, adapters, optimiser state,
activations, allocator slack), above its resident set after imports and data loading: the kernel's
high-water mark, reset at that point through /proc/self/clear_refs. A separate process per trainer
is what makes this a clean measure: nothing of one trainer stays in another's peak.

Models (`--models`): `shakespeare-char` (the cpu_throughput.py shape: 4 layers, 128 wide, batch
12 x 64) and `small` (pretune's `small` preset: 6 layers, 384 wide, batch 8 x 128).

    python benchmarks/lora_peft.py --threads 1                  # writes benchmarks/results/lora_peft.md/json
    python benchmarks/lora_peft.py --models shakespeare-char --steps 20 --rounds 2 --out /tmp/x
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import _common
from _common import (NAMES, Bench, add_run_args, machine, results_table, run_rounds, summarise, training_rss,
                     write_report)

LORA = {"rank": 8, "alpha": 16.0, "targets": ("q_proj", "k_proj", "v_proj", "o_proj")}
SMALL_ARCH = dict(n_layer=6, n_head=6, n_kv_head=6, d_model=384, d_ff=1024, max_seq_len=128, tie_embeddings=True)
MODELS = {"shakespeare-char": Bench(arch=_common.CHAR_ARCH, batch=12, seq=64, lora=LORA),
          "small": Bench(arch=SMALL_ARCH, batch=8, seq=128, lora=LORA)}
SPEED_TARGET = 1.5


def child_args(model: str, name: str, args) -> list[str]:
    return (["--child", name, "--child-model", model, "--steps", str(args.steps)]
            + (["--threads", str(args.threads)] if args.threads else []))


def ratios(s: dict, mem: dict) -> dict:
    """pretune against the faster HF trainer (tokens/s) and against the leaner one (memory)."""
    return {"speed": s["pretune"]["tokens_per_s"] / max(s[n]["tokens_per_s"] for n in NAMES[1:]),
            "memory": training_rss(mem["pretune"]) / max(min(training_rss(mem[n]) for n in NAMES[1:]), 1)}


def model_section(model: str, r: dict) -> list[str]:
    bench, check, q = MODELS[model], r["check"], r["ratios"]
    arch = bench.arch
    met = q["speed"] >= SPEED_TARGET and q["memory"] < 1.0
    return [
        f"## {model}: {arch['n_layer']} layers, d_model {arch['d_model']}, {arch['n_head']} heads, SwiGLU "
        f"{arch['d_ff']}; batch {bench.batch} x {bench.seq} tokens", "",
        f"{check['params'][0]:,} parameters in both, {check['trainable'][0]:,} of them trainable in pretune and "
        f"{check['trainable'][1]:,} in peft; first-batch loss pretune {check['pretune_loss']:.5f}, HF "
        f"{check['hf_loss']:.5f} (the adapters start at zero).", "",
        *results_table(r["throughput"], r["memory"], NAMES), "",
        f"**pretune / faster HF + peft trainer: {q['speed']:.2f}x tokens/s; training memory pretune / leaner HF "
        f"+ peft trainer: {q['memory']:.2f}x** (target: >= {SPEED_TARGET}x faster and less memory: "
        f"{'met' if met else 'not met'}).", ""]


def write_results(res: dict, out: Path) -> None:
    lines = ["# LoRA fine-tuning on the CPU: pretune against Hugging Face transformers + peft", "",
             f"- date: {res['date']}", f"- machine: {res['machine']}",
             f"- torch {res['torch']}, transformers {res['transformers']}, peft {res['peft']}; "
             f"torch threads: {res['threads']}; fp32, no torch.compile",
             f"- LoRA rank {LORA['rank']}, alpha {LORA['alpha']:g}, dropout 0, on {', '.join(LORA['targets'])}; "
             "AdamW (lr 1e-3, betas 0.9/0.99, weight decay 0.1) on the adapters only, clipping at 1.0",
             f"- {res['rounds']} interleaved rounds of {res['steps']} steps per trainer, first {res['skip']} "
             "steps of each round left out; the machine is shared, so read the ratios",
             f"- command: `python benchmarks/lora_peft.py {' '.join(res['argv'])}`", ""]
    for model, r in res["models"].items():
        lines += model_section(model, r)
    lines += ["Training peak RSS: the peak resident set while training (the kernel's high-water mark VmHWM, reset "
              "after imports and data loading through /proc/self/clear_refs), above the resident set at that point; "
              "each trainer runs in a process of its own.", ""]
    write_report(out, "lora_peft", res, lines)


def run_model(model: str, args) -> dict:
    bench = MODELS[model]
    with tempfile.TemporaryDirectory(prefix="pretune-bench-") as tmp:
        tok, data = _common.load_data(Path(tmp), bench.seq, bench.batch)
        check = _common.check_same_model(bench, tok, data)
    print(f"{model}: params {check['params']}, trainable {check['trainable']}, first-batch loss pretune "
          f"{check['pretune_loss']:.5f} HF {check['hf_loss']:.5f}", flush=True)
    times, memory = run_rounds(__file__, NAMES, args.rounds, args.skip, lambda n: child_args(model, n, args),
                               bench.tokens_per_step)
    throughput = summarise(times, bench.tokens_per_step)
    return {"check": check, "throughput": throughput, "memory": memory, "ratios": ratios(throughput, memory)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    ap.add_argument("--steps", type=int, default=40, help="steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out of each round")
    add_run_args(ap)
    ap.add_argument("--child-model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        _common.child(MODELS[args.child_model], args.child, args.steps)
        return 0
    import peft
    import transformers

    results = {m: run_model(m, args) for m in args.models}
    res = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(), "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__, "threads": torch.get_num_threads(),
           "steps": args.steps, "rounds": args.rounds, "skip": args.skip, "models": results,
           "argv": _common.run_argv(argv), "notes": args.notes}
    write_results(res, Path(args.out))
    for m, r in results.items():
        print(f"{m}: pretune / faster HF + peft {r['ratios']['speed']:.2f}x tokens/s, "
              f"memory {r['ratios']['memory']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
