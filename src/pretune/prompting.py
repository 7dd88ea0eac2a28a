"""Zero-shot and few-shot prompting: a model scored on a task's test set with no training.

Few-shot prompts put `shots` demonstrations, drawn with the run's seed from the (size-limited)
training records, in front of every test example: for classification as "TEXT\\nLabel: LABEL"
blocks before the verbalizer prompt, for instruction and text2text as earlier turns of the chat.
The run directory has the same files as a fine-tuning run (config.yaml, lineage.json,
summary.json, predictions.jsonl), so a study reads it the same way; its cost is inference only.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

from pretune.config import Config
from pretune.data import tasks as T
from pretune.errors import ConfigError
from pretune.files import atomic_write_json, settle_aside
from pretune.eval.scoring import evaluate_task, write_predictions
from pretune.finetune import _records
from pretune.model.io import load_model
from pretune.stages import open_run, parent_tokenizer, restore_replaced, save_run_config
from pretune.train import checkpoint as ck
from pretune.train import dist
from pretune.train.meter import EnergyCounter, flops_per_token, peak_memory_bytes, reset_peak_memory


def with_demonstrations(record: dict, demos: list[dict], task: str) -> dict:
    """The record with the demonstrations placed in front of it."""
    if not demos:
        return record
    if task == "classification":
        shots = "".join(f"{T.verbalizer_prompt(d['text'])} {d['label']}\n\n" for d in demos)
        return {**record, "text": shots + record["text"]}
    # one system turn, first (templates such as Mistral's or Gemma's refuse one elsewhere): the
    # record's own, else the first demonstration's; the demonstrations' turns without theirs
    def system(messages):
        return [m for m in messages if m["role"] in ("system", "developer")]

    def turns(messages):
        return [m for m in messages if m["role"] not in ("system", "developer")]

    head = [m for msgs in (record["messages"], *(d["messages"] for d in demos)) for m in system(msgs)][:1]
    return {**record, "messages": head + [m for d in demos for m in turns(d["messages"])] + turns(record["messages"])}


def _tokens_scored(examples: list[dict], task: str, n_labels: int, max_new_tokens: int) -> int:
    if task == "classification":  # every label is scored after the prompt
        return sum(len(e["ids"]) for e in examples) * max(1, n_labels)
    return sum(len(e["gen_prompt"]) + max_new_tokens for e in examples)


def run_prompting(cfg: Config, shots: int, log=print) -> dict:
    """Evaluate cfg.init_from on cfg's task with `shots` demonstrations per prompt; returns the summary."""
    if not cfg.init_from:
        raise ConfigError("prompting needs init_from (the model to prompt)")
    rt = dist.setup(cfg.train.device, cfg.train.precision, cfg.train.threads)
    run_dir = open_run(cfg, rt)
    try:
        return _prompt(cfg, shots, rt, run_dir, log)
    except BaseException:
        restore_replaced(run_dir, rt)  # set-up failed: a run overwrite=true was replacing comes back
        raise


def _prompt(cfg: Config, shots: int, rt, run_dir, log) -> dict:
    """run_prompting's set-up (model, records, prompts, run files), then the scoring."""
    tok = parent_tokenizer(cfg.init_from)
    model, _ = load_model(cfg.init_from, device=rt.device)
    model.requires_grad_(False).eval()
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(
        cfg.finetune, classifier="verbalizer", max_len=model.cfg.max_seq_len))
    train_recs, _, test_recs, labels, stats = _records(cfg)
    demos = random.Random(cfg.seed).sample(train_recs, min(shots, len(train_recs)))
    examples = T.encode([with_demonstrations(r, demos, cfg.task) for r in test_recs], cfg, tok, labels, stats)
    save_run_config(cfg, run_dir)
    tok.save(run_dir)
    ck.write_lineage(run_dir, "prompting", cfg.init_from, task=cfg.task, shots=len(demos))
    settle_aside(run_dir, restore=False)  # set up: the run overwrite=true replaces goes now
    reset_peak_memory(rt.device)
    energy, t0 = EnergyCounter(rt.device, cfg.meter.device_power_w), time.perf_counter()
    per_example: dict = {}
    # every test example is scored (generated for, in generation tasks), as for the trained arms
    every = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, eval_examples=max(1, len(examples))))
    metrics = evaluate_task(model, examples, every, tok, labels, rt.device, generation=True, per_example=per_example)
    wall = time.perf_counter() - t0
    tokens = _tokens_scored(examples, cfg.task, len(labels or []), cfg.finetune.max_new_tokens)
    seq = max((T.length_of(e) for e in examples), default=1)
    flops = tokens * flops_per_token(model, seq)["total"]  # nothing trainable: forward FLOPs only
    joules = energy.joules()
    summary = {"status": "completed", "stage": "prompting", "task": cfg.task, "shots": len(demos), "steps": 0,
               "tokens": tokens, "target_tokens": 0, "wall_s": wall, "flops": flops,
               "flops_per_token": {"trainable": 0.0, "frozen": flops / max(tokens, 1), "attention": 0.0},
               "peak_mem_bytes": peak_memory_bytes(rt.device), "energy_j": joules, "energy_source": energy.label,
               "co2_g": joules / 3.6e6 * cfg.meter.grid_gco2_per_kwh,
               "params": sum(p.numel() for p in model.parameters()), "trainable_params": 0,
               "train_examples": len(train_recs), "device": str(rt.device),
               "truncated_examples": stats.truncated,  # prompts cut to the context: demonstrations lost
               **{f"test_{k}": v for k, v in metrics.items()}, **metrics}
    if stats.truncated:
        log(f"warning: {stats.truncated} of {len(examples)} prompts with {len(demos)} demonstrations were cut to "
            f"the model's context ({model.cfg.max_seq_len} tokens): they lost demonstrations; fewer shots would fit")
    write_predictions(Path(run_dir) / "predictions.jsonl", per_example)
    atomic_write_json(Path(run_dir) / "summary.json", summary)
    log(f"prompting ({len(demos)} shots): " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                         if isinstance(v, float)))
    ck.unlock_run_dir(run_dir)
    dist.teardown()
    return summary
