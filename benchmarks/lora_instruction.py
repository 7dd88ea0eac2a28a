"""LoRA instruction fine-tuning on this CPU, on variable-length task records: pretune against
Hugging Face transformers + peft, tokens/s and peak memory.

lora_peft.py times full-length text windows, where no trainer can waste anything on padding. Here
the data is what LoRA fine-tuning usually sees: instruction records of different lengths, the loss
on the responses only. The records are bitext customer-support (../shared/data, when present) or
otherwise the `support` task of pretune's generated world; both sides get the same token ids and
loss masks (pretune's chat template and tokenizer), the same model and starting weights (the
`small` shape with a 256-token context), the same adapters (rank 8, alpha 16, on q/k/v/o) and AdamW
settings, and the same batch size. What differs is each trainer's own batching: pretune groups
examples of similar length (`pretune finetune`'s batches); transformers.Trainer pads each random
batch to its longest record, or with `train_sampling_strategy="group_by_length"` groups by length
as well. Throughput counts real tokens only (each record's length less one, as pretune's metrics
do): the sum over the measured steps divided by their summed wall time. Each trainer runs one whole
epoch over the same records (records / batch steps), so both sides see the same tokens: a shorter
run would compare different mixes of lengths (transformers' length grouping starts with the
longest batches, which are cheaper per token).

Each round runs every trainer in a fresh process, interleaved round after round (the machine is
shared: only same-run ratios mean anything); the first steps of each round are left out.

    python benchmarks/lora_instruction.py --threads 2      # writes benchmarks/results/lora_instruction.md/json
    python benchmarks/lora_instruction.py --records 64 --rounds 1 --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _common
from _common import ROOT, PeakRSS, add_run_args, machine, run_child, write_report

BITEXT = ROOT.parent / "shared" / "data" / "bitext-customer-support"
ARCH = dict(n_layer=6, n_head=6, n_kv_head=6, d_model=384, d_ff=1024, max_seq_len=256, tie_embeddings=True)
LORA = {"rank": 8, "alpha": 16.0, "targets": ("q_proj", "k_proj", "v_proj", "o_proj")}
BATCH, MAX_LEN, VOCAB, LR = 8, 256, 2048, 1e-3
NAMES = ("pretune", "HF Trainer", "HF Trainer (group_by_length)")
SPEED_TARGET = 1.5


# ----------------------------------------------------------------------------- data


def write_records(workdir: Path, n: int) -> tuple[Path, str]:
    """JSONL records with prompt and response, and where they came from."""
    import csv

    out = workdir / "records.jsonl"
    files = sorted(BITEXT.glob("*.csv")) if BITEXT.is_dir() else []
    if files:
        with open(files[0], newline="", encoding="utf-8") as fh:
            rows = [{"prompt": r["instruction"], "response": r["response"]} for r in csv.DictReader(fh)]
        source = f"bitext customer-support ({files[0].name}, first {min(n, len(rows))} records)"
    else:
        from pretune.data.world import WorldConfig, generate_world

        rows = [{"prompt": r["prompt"], "response": r["response"]} for r in generate_world(WorldConfig()).support]
        source = f"pretune's generated world, support task (first {min(n, len(rows))} records)"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    return out, source


def prepare(workdir: Path, n: int) -> dict:
    """Records, a BPE tokenizer trained on them, and the base model directory pretune starts from."""
    from pretune.config import DataConfig
    from pretune.data.corpus import build_tokenizer
    from pretune.model.io import save_model_dir

    records, source = write_records(workdir, n)
    text = workdir / "text.txt"
    text.write_text("".join(json.loads(line)["prompt"] + "\n" + json.loads(line)["response"] + "\n"
                            for line in records.read_text().splitlines()))
    tok = build_tokenizer(DataConfig(train=[str(text)], tokenizer="bpe", vocab_size=VOCAB), log=lambda *a: None)
    tok.save(workdir)
    save_model_dir(_common.pretune_model(ARCH, tok.vocab_size), workdir / "base", tokenizer=tok)
    return {"records": str(records), "source": source, "vocab": tok.vocab_size}


def examples(workdir: Path) -> tuple[list[dict], object]:
    """The records as pretune encodes them for `task=instruction`: ids and loss mask."""
    from pretune.config import Config, load_config
    from pretune.data import tasks as T
    from pretune.data.tokenizer import Tokenizer

    tok = Tokenizer.load(workdir)
    cfg = load_config(Config, None, ["task=instruction", f"finetune.max_len={MAX_LEN}"])
    stats = T.TaskStats()
    recs = T.read_records([str(workdir / "records.jsonl")], "instruction", cfg.data, stats, "data.train")
    return T.encode(recs, cfg, tok, None, stats), tok


# ----------------------------------------------------------------------------- trainers


def run_pretune(workdir: Path, steps: int) -> tuple[list[float], list[int]]:
    """`pretune finetune task=instruction method=lora` through its own loop; per-step wall times and
    real tokens from metrics.jsonl."""
    from pretune.config import Config, load_config
    from pretune.finetune import run_finetune

    out = Path(tempfile.mkdtemp(prefix="pretune-run-", dir=workdir)) / "run"  # a new run directory each round
    cfg = load_config(Config, None, [
        "task=instruction", "method=lora", f"init_from={workdir / 'base'}", f"data.train={workdir / 'records.jsonl'}",
        "data.val_fraction=0", f"out_dir={out}", f"train.max_steps={steps}", f"train.batch_size={BATCH}",
        "train.eval_every=0", "train.save_every=0", "train.log_every=1", "train.progress=false", "train.device=cpu",
        f"optim.lr={LR}", "optim.beta2=0.99", f"finetune.max_len={MAX_LEN}", *_common.lora_overrides(LORA)])
    run_finetune(cfg, log=lambda *a: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    walls, tokens = [r["wall_s"] for r in rows], [r["tokens"] for r in rows]
    return ([b - a for a, b in zip([0.0] + walls, walls)], [b - a for a, b in zip([0] + tokens, tokens)])


def run_hf_trainer(workdir: Path, steps: int, strategy: str) -> tuple[list[float], list[int]]:
    """The same model and adapters (peft) through transformers.Trainer on the same encoded records."""
    import torch
    from transformers import Trainer, TrainingArguments

    exs, tok = examples(workdir)
    dataset = [{"input_ids": e["ids"], "labels": [t if m else -100 for t, m in zip(e["ids"], e["mask"])]}
               for e in exs]
    tokens: list[int] = []

    def collate(batch: list[dict]) -> dict:  # pad to the longest in the batch, as DataCollatorForSeq2Seq
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), tok.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        tokens.append(sum(len(b["input_ids"]) - 1 for b in batch))
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    times: list[float] = []
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_common.hf_llama(ARCH, tok.vocab_size), LoraConfig(
        r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=list(LORA["targets"]), bias="none"))
    args = TrainingArguments(output_dir=str(workdir / "hf"), per_device_train_batch_size=BATCH, max_steps=steps,
                             learning_rate=LR, weight_decay=0.1, adam_beta2=0.99, lr_scheduler_type="cosine",
                             warmup_steps=max(1, steps // 10), max_grad_norm=1.0, logging_steps=10 ** 6,
                             save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                             disable_tqdm=True, seed=1337, remove_unused_columns=False,
                             train_sampling_strategy=strategy)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate,
            callbacks=[_common.step_clock(times)]).train()
    return times, tokens[:len(times)]


def child(name: str, steps: int, workdir: Path) -> None:
    import peft  # noqa: F401  (every library both sides load, before the memory baseline)
    import transformers  # noqa: F401

    import pretune.finetune  # noqa: F401

    rss = PeakRSS()  # from here: reading and encoding the records, the model, training
    if name == "pretune":
        times, tokens = run_pretune(workdir, steps)
    else:
        times, tokens = run_hf_trainer(workdir, steps, "group_by_length" if "group" in name else "random")
    print(json.dumps({"times": times, "tokens": tokens, "baseline_rss": rss.baseline, "peak_rss": rss.peak()}))


# ----------------------------------------------------------------------------- the run


def measure(args, workdir: Path) -> dict:
    per: dict[str, dict] = {n: {"times": [], "tokens": [], "mem": []} for n in NAMES}
    for r in range(args.rounds):
        for name in NAMES if r % 2 == 0 else NAMES[::-1]:
            out = run_child(__file__, ["--child", name, "--steps", str(args.steps), "--workdir", str(workdir)]
                            + (["--threads", str(args.threads)] if args.threads else []))
            times, tokens = out["times"][args.skip:], out["tokens"][args.skip:]
            per[name]["times"] += times
            per[name]["tokens"] += tokens
            per[name]["mem"].append(out["peak_rss"] - out["baseline_rss"])
            print(f"round {r + 1}: {name:30s} {sum(tokens) / sum(times):8,.0f} real tokens/s, "
                  f"{np.mean(tokens):,.0f} per step, peak RSS +{per[name]['mem'][-1] / 2**20:,.0f} MiB", flush=True)
    return {n: {"tokens_per_s": sum(p["tokens"]) / sum(p["times"]), "steps": len(p["times"]),
                "tokens_per_step": float(np.mean(p["tokens"])), "training_rss": float(np.median(p["mem"]))}
            for n, p in per.items()}


def write_results(res: dict, out: Path) -> None:
    s = res["results"]
    ref, ref_mem = s["pretune"]["tokens_per_s"], s["pretune"]["training_rss"]
    best = max(s[n]["tokens_per_s"] for n in NAMES[1:])
    lean = min(s[n]["training_rss"] for n in NAMES[1:])
    lines = ["# LoRA instruction fine-tuning on the CPU: pretune against transformers + peft", "",
             f"- date: {res['date']}", f"- machine: {res['machine']}",
             f"- torch {res['torch']}, transformers {res['transformers']}, peft {res['peft']}; torch threads: "
             f"{res['threads']}",
             f"- data: {res['source']}; BPE tokenizer of {res['vocab']} tokens trained on it; examples cut to "
             f"{MAX_LEN} tokens; loss on responses only",
             f"- model: 6 layers, d_model 384, 6 heads, SwiGLU 1024, context 256; LoRA rank 8, alpha 16 on "
             f"q/k/v/o; batch {BATCH} records; AdamW lr {LR}",
             f"- {res['rounds']} interleaved rounds of {res['steps']} steps per trainer, first {res['skip']} of "
             "each round left out", "",
             "| trainer | real tokens/s | vs pretune | real tokens per step | peak RSS (data, model, training) | memory vs pretune |",
             "|---|---:|---:|---:|---:|---:|"]
    for n in NAMES:
        r = s[n]
        lines.append(f"| {n} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / ref:.2f}x | "
                     f"{r['tokens_per_step']:,.0f} | +{r['training_rss'] / 2**20:,.0f} MiB | "
                     f"{r['training_rss'] / max(ref_mem, 1):.2f}x |")
    met = "met" if ref / best >= SPEED_TARGET else "not met"
    lines += ["", f"**pretune / faster HF trainer: {ref / best:.2f}x real tokens/s; training memory pretune / "
              f"leaner HF trainer: {ref_mem / max(lean, 1):.2f}x** (target >= {SPEED_TARGET}x faster: {met}).", "",
              "Command: `python benchmarks/lora_instruction.py " + " ".join(res["argv"]) + "`", ""]
    write_report(out, "lora_instruction", res, lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=400, help="records to train on: one epoch is records / 8 steps")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps per trainer and round (default: an epoch)")
    ap.add_argument("--skip", type=int, default=1, help="warm-up steps left out of each round")
    ap.add_argument("--rounds", type=int, default=3)
    add_run_args(ap, "torch threads in every trainer")
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.steps = args.steps or -(-args.records // BATCH)
    if args.child:
        child(args.child, args.steps, Path(args.workdir))
        return 0
    import peft
    import torch
    import transformers

    with tempfile.TemporaryDirectory(prefix="pretune-lora-inst-") as tmp:
        workdir = Path(tmp)
        data = prepare(workdir, args.records)
        results = measure(args, workdir)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "threads": args.threads or torch.get_num_threads(), "steps": args.steps, "skip": args.skip,
           "rounds": args.rounds, "source": data["source"], "vocab": data["vocab"], "results": results,
           "argv": _common.run_argv(argv), "notes": args.notes}
    write_results(res, Path(args.out))
    print(Path(args.out) / "lora_instruction.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
