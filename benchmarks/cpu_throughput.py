"""pretune against Hugging Face transformers on this CPU: training tokens/s and peak memory.

The model is the shakespeare-char shape (4 layers, 128 wide, 4 heads, SwiGLU 352, context 64,
batch 12, character vocabulary), every weight trained, in three trainers on the same batches
(see _common.py): pretune's own loop, LlamaForCausalLM with the same configuration and starting
weights in a plain PyTorch loop, and the same model through transformers.Trainer. With `--compile`
the three run again with torch.compile (pretune's `train.compile=true`, `torch.compile(model)` in
the plain loop, the Trainer's `torch_compile=True`), as rows of their own, compared among themselves.

Each round runs every trainer for a few dozen steps in a fresh process of its own (so each runs
as its users run it: pretune with its runtime settings, transformers with its defaults), the
trainers interleaved round after round because the machine is shared: only same-run ratios mean
anything. The first steps of each round are warm-up (and compilation) and left out. Peak memory is
each process's peak resident set while training, above the resident set it had after imports and
data loading (the peak is reset there through /proc/self/clear_refs); the full peak is shown too.

    python benchmarks/cpu_throughput.py                 # writes benchmarks/results/cpu_throughput.md/json
    python benchmarks/cpu_throughput.py --steps 20 --rounds 3 --out /tmp/x
    python benchmarks/cpu_throughput.py --threads 1 --compile      # also the torch.compile rows
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import _common
from _common import (COMPILED, NAMES, Bench, add_run_args, machine, results_table, run_rounds, summarise,
                     write_report)

BENCH = Bench(arch=_common.CHAR_ARCH, batch=12, seq=64)


def load_data(workdir: Path):
    return _common.load_data(workdir, BENCH.seq, BENCH.batch)


def runners(tok, data, workdir: Path) -> dict:
    return _common.runners(BENCH, tok, data, workdir)


def check_same_model(tok, data) -> dict:
    return _common.check_same_model(BENCH, tok, data)


def child_args(name: str, args) -> list[str]:
    return ["--child", name, "--steps", str(args.steps)] + (["--threads", str(args.threads)] if args.threads else [])


def ratio_line(s: dict, names: tuple[str, ...], label: str = "") -> str:
    """'pretune / faster HF trainer' for one set of rows (eager or compiled)."""
    ratio = s[names[0]]["tokens_per_s"] / max(s[n]["tokens_per_s"] for n in names[1:])
    return (f"**pretune / faster HF trainer{label}: {ratio:.2f}x** tokens/s "
            f"(target >= 1.3x: {'met' if ratio >= 1.3 else 'not met'}).")


def write_results(res: dict, out: Path) -> None:
    s, mem = res["throughput"], res["memory"]
    lines = [
        "# CPU training throughput: pretune against Hugging Face transformers", "",
        f"- date: {res['date']}", f"- machine: {res['machine']}", f"- torch {res['torch']}, transformers "
        f"{res['transformers']}; torch threads: {res['threads']}",
        f"- model: shakespeare-char shape ({res['check']['params'][0]:,} parameters in both), batch {BENCH.batch} x "
        f"{BENCH.seq} tokens, fp32; same starting weights (first-batch loss: pretune "
        f"{res['check']['pretune_loss']:.5f}, HF {res['check']['hf_loss']:.5f})",
        f"- {res['rounds']} interleaved rounds of {res['steps']} steps each, first {res['skip']} steps of each "
        "round left out; the machine is shared, so read the ratios", "",
    ]
    lines += results_table(s, mem, NAMES) + ["", ratio_line(s, NAMES), ""]
    if COMPILED[0] in s:
        lines += ["With torch.compile on both sides (compilation in the left-out warm-up steps):", ""]
        lines += results_table(s, mem, COMPILED) + ["", ratio_line(s, COMPILED, " (both compiled)"), ""]
    lines += ["Training peak RSS: the peak resident set while training, above the resident set after imports "
              "and data loading (model, optimiser state, activations, allocator slack).", ""]
    lines += ["", "Command: `python benchmarks/cpu_throughput.py " + " ".join(res["argv"]) + "`", ""]
    write_report(out, "cpu_throughput", res, lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out of each round")
    ap.add_argument("--compile", action="store_true", help="also the three trainers with torch.compile")
    add_run_args(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        _common.child(BENCH, args.child, args.steps)
        return 0
    import transformers

    with tempfile.TemporaryDirectory(prefix="pretune-bench-") as tmp:
        check = check_same_model(*load_data(Path(tmp)))
    print(f"same model: params {check['params']}, first-batch loss pretune {check['pretune_loss']:.5f} "
          f"HF {check['hf_loss']:.5f}", flush=True)
    names = NAMES + (COMPILED if args.compile else ())
    tps = BENCH.tokens_per_step
    times, memory = run_rounds(__file__, names, args.rounds, args.skip, lambda n: child_args(n, args), tps)
    res = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(), "torch": torch.__version__,
           "transformers": transformers.__version__, "threads": torch.get_num_threads(), "steps": args.steps,
           "rounds": args.rounds, "skip": args.skip, "check": check, "throughput": summarise(times, tps),
           "memory": memory, "argv": _common.run_argv(argv), "notes": args.notes}
    write_results(res, Path(args.out))
    s = res["throughput"]
    print(json.dumps({n: round(s[n]["tokens_per_s"]) for n in names}), ratio_line(s, NAMES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
