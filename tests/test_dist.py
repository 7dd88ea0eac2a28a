"""Data parallelism on CPU: `torchrun` (gloo, 2 processes) with DDP and FSDP2 against one process.

The sampler gives rank r the rows r::world of the same global batch, so the losses of 1 and 2
processes agree to float tolerance; a stopped run resumes exactly under either strategy, and an
FSDP (DCP) checkpoint written by 2 processes resumes in 1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from conftest import read_metrics, run_cli

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

# evaluation at steps 5 and 10 on 10 windows in batches of 4: 3 batches, so under 2 processes one rank
# runs a stand-in batch to join FSDP's gathers
STEPS = ["train.max_steps=10", "train.save_every=5", "train.eval_every=5", "train.eval_tokens=320",
         "train.eval_batch_size=4", "train.log_every=1",
         "train.batch_size=8", "train.micro_batch_size=2", "train.seq_len=32", "train.progress=false",
         "model.preset=tiny", "data.tokenizer=char", "optim.lr=3e-3", "optim.warmup_steps=5"]


def torchrun(*args: str, nproc: int = 2, verb: str = "pretrain", all_ranks: bool = False) -> str:
    """`python -m torch.distributed.run --nproc_per_node N -m pretune VERB ARGS`; its stdout (every
    rank's with `all_ranks`, PRETUNE_LOG_ALL_RANKS=1)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pretune", verb, *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PRETUNE_LOG_ALL_RANKS=str(int(all_ranks)))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


# what rank 1 prints (with PRETUNE_LOG_ALL_RANKS=1) when its parameters were on the meta device until
# fully_shard and its shards were then filled from rank 0 (dist._fill_from_rank0)
META_LINE = "rank 1: parameters on meta before sharding"


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def evals(run_dir, key: str = "val_loss") -> list[float]:
    return [r[key] for r in read_metrics(run_dir) if key in r]


def reference(tmp_path, corpus) -> list[float]:
    """One process, the same global batch (8 sequences in micro-batches of 2)."""
    out = tmp_path / "ref"
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={out}", "train.threads=1", *STEPS) == 0
    return losses(out)


def assert_close(a: list[float], b: list[float], rel: float = 1e-4) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * abs(x), (a, b)


def test_ddp_matches_one_process_and_resumes(tmp_path, corpus):
    ref = reference(tmp_path, corpus)
    run = tmp_path / "ddp"
    out = torchrun(f"data.train={corpus}", f"out_dir={run}", *STEPS, "dist.strategy=ddp", "train.stop_after=5")
    assert out.count("summary:") == 1  # rank 0 alone reports
    assert_close(losses(run), ref[:5])
    ckpt = run / "checkpoints" / "step-000005"
    assert (ckpt / "model.safetensors").is_file()  # DDP keeps the single-file format
    assert len(torch.load(ckpt / "rng.pt", weights_only=False)["ranks"]) == 2  # each rank's random state
    torchrun(f"resume={run}", "train.stop_after=null")
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 11))
    assert_close(losses(run), ref)
    assert len(evals(run)) == 2
    assert_close(evals(run), evals(tmp_path / "ref"))  # the ranks share the evaluation batches
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed"
    assert summary["tokens"] == 10 * 8 * 32 and summary["target_tokens"] == 10 * 8 * 32
    a, b = load_file(str(run / "model" / "model.safetensors")), load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_fsdp_matches_one_process_resumes_and_reshards_to_one_process(tmp_path, corpus):
    ref = reference(tmp_path, corpus)
    run, single = tmp_path / "fsdp", tmp_path / "fsdp_to_1"
    fsdp = ["dist.strategy=fsdp", "dist.activation_checkpointing=true"]
    out = torchrun(f"data.train={corpus}", f"out_dir={run}", *STEPS, *fsdp, "train.stop_after=5", all_ranks=True)
    assert out.count(META_LINE) == 1 and "rank 0: parameters on" not in out  # rank 0 alone built the weights
    assert_close(losses(run), ref[:5])
    ckpt = run / "checkpoints" / "step-000005"
    assert (ckpt / "dcp" / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()
    assert sorted(p.name for p in ckpt.glob("rng-*.pt")) == ["rng-00000.pt", "rng-00001.pt"]
    shutil.copytree(run, single)

    # 2 processes again; rank 1 builds on the meta device again, and DCP loads every rank's shards
    assert META_LINE in torchrun(f"resume={run}", "train.stop_after=null", all_ranks=True)
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 11))
    assert_close(losses(run), ref)
    assert_close(evals(run), evals(tmp_path / "ref"))  # the ranks share the evaluation batches
    assert len(evals(run)) == 2

    # the 2-process DCP checkpoint resumes in one process (DCP reshards on load)
    assert run_cli("pretrain", f"resume={single}", "train.stop_after=null", "train.threads=1") == 0
    assert_close(losses(single), ref)

    # model/ is a plain full state dict written by rank 0, the same weights as one process trained
    want = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    for got in (load_file(str(run / "model" / "model.safetensors")),
                load_file(str(single / "model" / "model.safetensors"))):
        assert got.keys() == want.keys()
        assert all(torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6) for k in want)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["params"] == json.loads(
        (tmp_path / "ref" / "summary.json").read_text())["params"]  # global counts, not one shard's


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, corpus):
    out = tmp_path / "nan"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(os.path.dirname(__file__), "nan_on_one_rank.py"), "pretrain",
           f"data.train={corpus}", f"out_dir={out}", *STEPS]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode != 0
    summary = json.loads((out / "summary.json").read_text())  # rank 0 saw it too and wrote the summary
    assert summary["status"] == "diverged" and "at step 4" in summary["error"], summary
    assert r.stderr.count("NaN or infinite at step 4") >= 2, r.stderr[-3000:]  # both ranks, same step


def _qa(path, n=48):
    rows = [{"prompt": f"what is {i} plus {i}?", "response": f"it is {2 * i}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("strategy,method", [("ddp", "full"), ("fsdp", "lora"), ("fsdp", "full")])
def test_finetune_with_l2sp_under_torchrun_matches_one_process(tmp_path, corpus, strategy, method):
    """Under FSDP rank 1 builds on the meta device: LoRA's adapters (initialised on rank 0) and, in
    full fine-tuning, the L2-SP anchors (rank 1's on the meta device) come from rank 0."""
    base = tmp_path / "base"
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={base}", "train.threads=1",
                   *[s for s in STEPS if not s.startswith("train.max_steps")], "train.max_steps=4") == 0
    data = _qa(tmp_path / "qa.jsonl")
    # 12 validation examples in chunks of 5 (eval_batch_size / 4): 3 chunks shared by 2 ranks
    args = ["task=instruction", f"init_from={base}", f"data.train={data}", "data.val_fraction=0.25",
            f"method={method}", "lora.dropout=0", "finetune.l2sp=1.0", "finetune.max_len=64", "train.max_steps=6",
            "train.batch_size=8", "train.micro_batch_size=2", "train.log_every=1", "train.eval_every=3",
            "train.eval_batch_size=20",
            "train.save_every=0", "train.progress=false", "optim.lr=3e-3", "optim.warmup_steps=1"]
    one = tmp_path / "one"
    assert run_cli("finetune", f"out_dir={one}", "train.threads=1", *args) == 0
    two = tmp_path / "two"
    out = torchrun(f"out_dir={two}", f"dist.strategy={strategy}", *args, verb="finetune", all_ranks=True)
    assert (META_LINE in out) == (strategy == "fsdp")  # LoRA adapters and L2-SP anchors included
    assert_close(losses(two), losses(one), rel=2e-4)  # the L2-SP penalty included
    # the same work costs the same, though the ranks' batches hold different numbers of tokens
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert (s2["tokens"], s2["target_tokens"], s2["flops"]) == (s1["tokens"], s1["target_tokens"], s1["flops"])
    assert len(evals(two)) == 2 and evals(two)[0] != evals(two)[1]
    assert_close(evals(two), evals(one), rel=2e-4)


def test_classifier_head_with_replay_and_a_short_batch_under_ddp(tmp_path, corpus):
    """The head sits out the replay micro-batch (DDP must look for unused parameters), and 21
    examples in task rows of 6 leave a last batch of 3 that two ranks cannot split evenly: the
    filler row carries no weight, so every step's loss is one process's."""
    base = tmp_path / "base"
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={base}", "train.threads=1",
                   *[s for s in STEPS if not s.startswith("train.max_steps")], "train.max_steps=2") == 0
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps({"text": f"item {i} is {'odd' if i % 2 else 'even'}",
                                        "label": "odd" if i % 2 else "even"}) + "\n" for i in range(28)))
    args = ["task=classification", f"init_from={base}", f"data.train={data}", "data.val_fraction=0.25",
            "finetune.classifier=head", f"finetune.replay=[{corpus}]", "finetune.replay_ratio=0.25",
            "finetune.max_len=32", "train.max_steps=8", "train.batch_size=8", "train.micro_batch_size=2",
            "train.eval_every=0", "train.save_every=0", "train.progress=false", "train.log_every=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pretune",
           "finetune", f"out_dir={tmp_path / 'two'}", "dist.strategy=ddp", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=180)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 8 and summary["world_size"] == 2
    assert len(losses(tmp_path / "two")) == 8
    assert run_cli("finetune", f"out_dir={tmp_path / 'one'}", "train.threads=1", *args) == 0
    assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rel=2e-4)


def test_fsdp_continued_pretraining_builds_on_rank_0_alone_and_matches_one_process(tmp_path, corpus):
    """init_from under FSDP: rank 1 reads the parent's config alone (its structure on the meta device),
    rank 0 loads the weights and sends each rank its shards; tied embeddings stay tied."""
    base = tmp_path / "base"
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={base}", "train.threads=1",
                   *[s for s in STEPS if not s.startswith("train.max_steps")], "train.max_steps=3") == 0
    parent_fixes = ("train.max_steps", "model.", "data.tokenizer", "train.save_every")  # set below, or by init_from
    cpt = [f"init_from={base}", f"data.train={corpus}", *[s for s in STEPS if not s.startswith(parent_fixes)],
           "train.max_steps=5", "train.save_every=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli("pretrain", f"out_dir={one}", "train.threads=1", *cpt) == 0
    out = torchrun(f"out_dir={two}", "dist.strategy=fsdp", *cpt, all_ranks=True)
    assert out.count(META_LINE) == 1
    assert_close(losses(two), losses(one))
    assert_close(evals(two), evals(one))
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert (s2["params"], s2["trainable_params"]) == (s1["params"], s1["trainable_params"])
    assert json.loads((two / "lineage.json").read_text())["stage"] == "cpt"
    want, got = (load_file(str(d / "model" / "model.safetensors")) for d in (one, two))
    assert got.keys() == want.keys() and "lm_head.weight" not in got  # tied: saved once
    assert all(torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6) for k in want)
