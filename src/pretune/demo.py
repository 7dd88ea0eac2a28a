"""`pretune demo`: the main job, end to end on data pretune generates itself.

It generates a synthetic world from a seed (people, companies and places described in varied general
text, finance-style reports about the companies, and labelled tasks), writes a study over it, and
runs that study: pre-training a small model on the general text, continued pre-training on the
domain reports with replay, and then every arm (from scratch, full fine-tuning, last layers, LoRA,
continued pre-training then fine-tuning, zero-shot and few-shot prompting) at several labelled-set
sizes and seeds, on two tasks:

- facts_qa: questions about colour facts that appear only in the general text, so only a model that
  was pre-trained on it can answer them about entities it was not fine-tuned on (the transfer the
  study should show);
- reviews: sentiment of product reviews, which a model trained from scratch learns too, given data.

The world also holds a customer-service instruction task, a summarisation task and bias pairs (used
by the study's bias probe); `OUT_DIR/demo-study.yaml` is an ordinary study file to edit and re-run
with `pretune study`. Running the demo again continues an unfinished demo instead of starting over.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pretune.errors import ConfigError


@dataclass
class DemoConfig:
    """`pretune demo [KEY=VALUE ...]`."""

    out_dir: str = "runs/demo"
    """Where the world, the study and its report go."""
    seed: int = 0
    """Seed of the generated world and of the pre-training."""
    preset: str = "mini"
    """Model size for the demo."""
    pretrain_steps: int = 600
    """Optimiser steps of pre-training on the general text."""
    cpt_steps: int = 100
    """Optimiser steps of continued pre-training on the domain text."""
    seeds: int = 3
    """Fine-tuning seeds per arm and size."""
    parallel: int = 2
    """Runs at once (each with its share of the CPU cores, or one GPU each)."""
    quick: bool = False
    """A much smaller demo (for tests): tiny model, few steps, fewer arms."""
    overwrite: bool = False
    """Delete an existing demo in out_dir and start again (otherwise an unfinished one continues)."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda'."""
    threads: int | None = None
    """CPU threads per run; None uses all cores for pre-training and divides them among parallel runs."""


# The world of the demo: few enough entities that a small model memorises their colour facts in a
# short pre-training, each fact stated in many documents.
DEMO_WORLD = dict(n_people=40, n_companies=20, n_places=20, fact_docs=20, general_docs=1800, domain_docs=400,
                  n_reviews=800, n_support=300, n_summaries=300)
QUICK_WORLD = dict(n_people=12, n_companies=6, n_places=6, fact_docs=3, general_docs=150, domain_docs=40,
                   n_reviews=120, n_support=30, n_summaries=30)


def study_spec(d: DemoConfig, files: dict[str, str], out: Path) -> dict:
    """The study the demo runs, as plain data (written to OUT_DIR/demo-study.yaml)."""
    quick = d.quick
    task = {"task": "classification"}
    return {
        "name": "pretune demo: pre-train, continue pre-training, or fine-tune?",
        "out_dir": str(out / "study"),
        "base": {"pretrain": {
            "seed": d.seed,
            "data": {"train": [files["general.txt"]], "val": [files["general_val.txt"]], "tokenizer": "bpe",
                     "vocab_size": 512 if quick else 2048},
            "model": {"preset": "tiny" if quick else d.preset},
            "train": {"max_steps": d.pretrain_steps, "seq_len": 64 if quick else 128, "batch_size": 16,
                      "eval_every": max(1, d.pretrain_steps // 4), "save_every": max(1, d.pretrain_steps // 4),
                      "log_every": 25, "eval_tokens": 20000},
            "optim": {"lr": 3e-3, "warmup_steps": max(1, d.pretrain_steps // 10)}}},
        "cpt": {"data": [files["domain.txt"]], "steps": d.cpt_steps, "replay_ratio": 0.25,
                "config": {"train": {"seq_len": 64 if quick else 128, "batch_size": 16}, "optim": {"lr": 1e-3}}},
        "replay": [files["general.txt"]],
        "general_eval": [files["general_val.txt"]],
        "eval_tokens": 5000 if quick else 10000,
        "bias_pairs": files["bias_pairs.csv"],
        "tasks": {
            "facts_qa": {**task, "train": files["facts_qa_train.jsonl"], "val": files["facts_qa_val.jsonl"],
                         "test": files["facts_qa_test.jsonl"], "target": 0.4,
                         "sizes": [8, "all"] if quick else [6, 12, "all"]},
            "reviews": {**task, "train": files["reviews_train.jsonl"], "val": files["reviews_val.jsonl"],
                        "test": files["reviews_test.jsonl"], "target": 0.9,
                        "config": {"train": {"batch_size": 8}},  # reviews are long: half the tokens per step
                        "sizes": [8, 32] if quick else [8, 32, 128]},
        },
        "arms": (["scratch", "full", "lora", "cpt+full", "zero-shot", "few-shot"] if quick else
                 ["scratch", "full", "freeze", "lora", "cpt+full", "zero-shot", "few-shot"]),
        "seeds": list(range(d.seeds)),
        "shots": 4,
        "budget": {"epochs": 10, "min_steps": 4 if quick else 40, "max_steps": 6 if quick else 80},
        "finetune": {"train": {"batch_size": 16}, "optim": {"lr": 1e-3},
                     "finetune": {"classifier": "verbalizer", "max_len": 64 if quick else 128}},
        "arm_config": {"scratch": {"optim": {"lr": 2e-3}}, "lora": {"optim": {"lr": 3e-3}},
                       **({} if quick else {"freeze": {"freeze": {"last_k": 1}, "optim": {"lr": 2e-3}}})},
        "parallel": d.parallel,
        "device": d.device,
        "threads": d.threads,
    }


def _world(d: DemoConfig, out: Path) -> dict[str, str]:
    """Generate the world (or find the same one from an earlier, unfinished demo)."""
    from pretune.data.world import WorldConfig, generate_world
    from pretune.data.world_files import write_world

    wc = WorldConfig(seed=d.seed, **(QUICK_WORLD if d.quick else DEMO_WORLD))
    known = out / "world" / "world.json"
    if known.is_file() and json.loads(known.read_text())["config"] != asdict(wc):
        raise ConfigError(f"{out} holds a demo made with other settings (seed or size); use another out_dir "
                          "or overwrite=true")
    return write_world(generate_world(wc), out / "world")


def run_demo(argv: list[str]) -> dict:
    import yaml

    from pretune.config import load_config
    from pretune.study.config import load_study
    from pretune.study.runner import print_summary, run_study
    from pretune.train.checkpoint import prepare_out_dir

    d = load_config(DemoConfig, None, argv)
    t0 = time.perf_counter()
    # absolute, so that demo-study.yaml names its world files and study directory wherever
    # `pretune study` is later run from
    out = Path(d.out_dir).absolute()
    unfinished = (out / "demo-study.yaml").is_file() and not d.overwrite
    if not unfinished:
        prepare_out_dir(out, d.overwrite, resume=False)
    files = _world(d, out)
    print(f"{'continuing the demo in' if unfinished else 'generated a world from seed ' + str(d.seed) + ' in'} {out}")
    spec_path = out / "demo-study.yaml"
    spec_path.write_text(yaml.safe_dump(study_spec(d, files, out), sort_keys=False), encoding="utf-8")
    results = run_study(load_study(str(spec_path)))
    print_summary(results)
    wall = time.perf_counter() - t0
    print(f"\ndemo done in {wall:.0f} s; report: {out / 'study' / 'report.html'} (and report.md, results.json)")
    return results
