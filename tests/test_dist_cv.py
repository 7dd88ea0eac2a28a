"""finetune.cv=K under torchrun (gloo, 2 processes): rank 0 alone sets up and summarises the
cross-validation root and decides what each fold does; the folds run on both ranks and give the
figures of a one-process cross-validation (the same global batches: float rounding apart)."""

from __future__ import annotations

import json

from conftest import read_metrics, run_cli
from test_dist import STEPS, assert_close, pytestmark, torchrun  # noqa: F401 (pytestmark: gloo needed)

# figures of where and how fast the folds ran, not of what they computed; and the work done, tokens
# and flops, which count the filler records that 2 ranks add to a short batch of 3 (docs/distributed.md;
# target_tokens, the records that count, stay those of one process)
MACHINE = ("wall_s", "train_s", "tokens_per_s", "energy_j", "co2_g", "peak_mem_bytes", "world_size", "mfu",
           "tokens", "flops")


def _classification(path, n: int = 28):
    rows = [{"text": f"item {i} is {'odd' if i % 2 else 'even'}", "label": "odd" if i % 2 else "even"}
            for i in range(n)]
    # one record without its label: data.on_error=skip leaves it out, and each fold's summary counts it
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"text": "no label"}) + "\n")
    return path


def test_cross_validation_under_torchrun_matches_one_process_and_resumes(tmp_path, corpus):
    base = tmp_path / "base"
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={base}", "train.threads=1",
                   *[s for s in STEPS if not s.startswith("train.max_steps")], "train.max_steps=2") == 0
    data = _classification(tmp_path / "cls.jsonl")
    args = ["task=classification", f"init_from={base}", f"data.train={data}", "data.on_error=skip",
            "data.test_fraction=0.25", "method=lora", "lora.dropout=0", "finetune.cv=2", "finetune.max_len=32",
            "train.max_steps=4", "train.batch_size=4", "train.micro_batch_size=2", "train.log_every=1",
            "train.eval_every=2", "train.save_every=2", "train.progress=false", "optim.lr=3e-3"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli("finetune", f"out_dir={one}", "train.threads=1", *args) == 0

    # stopped part-way through fold 0 (after its checkpoint at step 2), then resumed: rank 0 decides
    # for both ranks that fold 0 resumes and fold 1 starts
    torchrun(f"out_dir={two}", *args, "train.stop_after=2", verb="finetune")
    stopped = json.loads((two / "summary.json").read_text())
    assert stopped["status"] == "stopped" and stopped["stopped_fold"] == 0
    assert not (two / "fold-1").exists()
    out = torchrun(f"resume={two}", "train.stop_after=null", verb="finetune")
    assert out.count("summary:") == 1  # rank 0 alone reports

    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s2["status"] == "completed" and s2["cv"] == 2
    assert s2["folds"] == [str(two / f"fold-{i}") for i in range(2)]
    assert s2["fold_validation_sizes"] == s1["fold_validation_sizes"] and s2["scored_on"] == s1["scored_on"] == "test"
    assert s2["mean"]["world_size"] == 2
    for part in ("mean", "std"):
        same = sorted(k for k in s1[part] if k not in MACHINE)
        assert sorted(k for k in s2[part] if k not in MACHINE) == same
        assert {"accuracy", "val_loss", "test_loss", "target_tokens", "train_loss"} <= set(same)
        assert_close([s2[part][k] for k in same], [s1[part][k] for k in same], rel=2e-4)
    for i in range(2):
        f1, f2 = (json.loads((d / f"fold-{i}" / "summary.json").read_text()) for d in (one, two))
        # rank 0's scored summary, not another rank's without the test figures
        assert f2["skipped_records"] == f1["skipped_records"] == 1 and "test_accuracy" in f2
        assert f2["world_size"] == 2 and f2["steps"] == 4
        assert_close([r["loss"] for r in read_metrics(two / f"fold-{i}")],
                     [r["loss"] for r in read_metrics(one / f"fold-{i}")], rel=2e-4)
