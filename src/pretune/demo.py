"""`pretune demo`: the main job, on data pretune generates itself.

It generates a synthetic world from a seed (people, companies and places described in varied prose,
plus finance-style reports about the companies), pre-trains a small model on the general text with a
byte-level BPE tokenizer trained on it, continues pre-training on the domain reports with 25% replay
of general text, reports bits per byte on held-out general and domain text for both, and samples
from the final model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class DemoConfig:
    """`pretune demo [KEY=VALUE ...]`."""

    out_dir: str = "runs/demo"
    """Where the world, the runs and the report go."""
    seed: int = 0
    """Seed of the generated world and of the runs."""
    preset: str = "mini"
    """Model size for the demo."""
    pretrain_steps: int = 400
    """Optimiser steps of pre-training on the general text."""
    cpt_steps: int = 150
    """Optimiser steps of continued pre-training on the domain text."""
    overwrite: bool = False
    """Replace an existing demo in out_dir."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda'."""


def run_demo(argv: list[str]) -> dict:
    from pretune.config import Config, load_config
    from pretune.data.world import WorldConfig, generate_world, write_world
    from pretune.eval.evaluate import lm_metrics
    from pretune.model.io import load_model
    from pretune.stages import run_pretrain
    from pretune.train.checkpoint import prepare_out_dir
    from pretune.data.corpus import load_corpus
    from pretune.eval.generate import generate

    d = load_config(DemoConfig, None, argv)
    t0 = time.perf_counter()
    out = prepare_out_dir(d.out_dir, d.overwrite, resume=False)
    files = write_world(generate_world(WorldConfig(seed=d.seed)), out / "world")
    print(f"generated a world from seed {d.seed} in {out / 'world'}")
    common = [f"model.preset={d.preset}", "train.seq_len=128", "train.batch_size=16", "train.log_every=50",
              "train.eval_every=100", "train.save_every=0", "data.tokenizer=bpe", "data.vocab_size=2048",
              f"train.device={d.device}", f"seed={d.seed}", "train.eval_tokens=50000"]
    base = out / "pretrain"
    run_pretrain(load_config(Config, None, common + [
        f"data.train={files['general.txt']}", f"data.val={files['general_val.txt']}", f"out_dir={base}",
        f"train.max_steps={d.pretrain_steps}", "optim.lr=2e-3", "optim.warmup_steps=40"]))
    cpt = out / "cpt"
    run_pretrain(load_config(Config, None, common + [
        f"init_from={base}", f"data.train=[{files['domain.txt']},{files['general.txt']}]",
        "data.weights=[0.75,0.25]", f"out_dir={cpt}", f"train.max_steps={d.cpt_steps}",
        "optim.lr=1e-3", "optim.warmup_steps=10", "train.eval_every=0"]))
    results = {}
    for name, run in (("pretrained", base), ("continued", cpt)):
        model, tok = load_model(run)
        cfg = load_config(Config, None, [f"data.train=[{files['general_val.txt']},{files['domain.txt']}]",
                                         "data.val_fraction=0"])
        corpus = load_corpus(cfg.data, tok, 128, log=lambda m: None)
        general, domain = (s.windows(128, 30000) for s in corpus.train)
        results[name] = {"general_bpb": lm_metrics(model, general, tok.token_bytes, model.tok_emb.weight.device)["bpb"],
                         "domain_bpb": lm_metrics(model, domain, tok.token_bytes, model.tok_emb.weight.device)["bpb"]}
        prompt = tok.encode("the headquarters of")
        results[name]["sample"] = "the headquarters of" + tok.decode(generate(model, prompt, 40, temperature=0.8,
                                                                               top_k=50, seed=d.seed))
    results["wall_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n               general bpb   domain bpb")
    for name in ("pretrained", "continued"):
        r = results[name]
        print(f"  {name:<12} {r['general_bpb']:>10.3f}   {r['domain_bpb']:>10.3f}")
    print(f"\nsample ({'continued'}): {results['continued']['sample']!r}")
    print(f"demo done in {results['wall_s']:.0f} s; runs and results in {out}")
    return results
