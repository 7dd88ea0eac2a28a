"""`pretune plan` against a real allocation on the CPU: parameter count and parameter + gradient +
AdamW bytes exact, activations within 15% of the tensors autograd saves (see pretune.plan); and
the run it plans is the one that would happen (vocabulary, resume, classification head,
finetune.max_len, device), refusing what the run refuses."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, make_corpus, run_cli, sentiment
from pretune.config import load_config
from pretune.model.config import resolve_model_config
from pretune.model.gpt import GPT, cross_entropy_sum
from pretune.plan import PlanConfig, estimate, format_plan, resolve_arch, trainable_shapes
from pretune.train.optim import build_optimizer

ARCH = ["gpu=cpu", "model.preset=custom", "model.n_layer=3", "model.n_head=4", "model.n_kv_head=2",
        "model.d_model=64", "model.d_ff=160", "model.max_seq_len=512", "model.vocab_size=300",
        "train.batch_size=4"]


def saved_activation_bytes(model: torch.nn.Module, idx: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward (each storage once; weights excluded): the
    language-model loss, or a classification head's on each row's last token (ClassifierObjective)."""
    from pretune.model.heads import ClassifierModel

    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if isinstance(model, ClassifierModel):
            last = torch.full((len(idx),), idx.shape[1] - 1)
            labels = torch.arange(len(idx)) % model.head.out_features
            loss = F.cross_entropy(model(idx, last).float(), labels, reduction="sum")
        else:
            loss = cross_entropy_sum(model(idx), idx)
    loss.backward()
    return sum(seen.values())


def build(cfg) -> torch.nn.Module:
    """The model as the run builds it: a classification head when the task has one, the method applied."""
    from pretune.eval.scoring import uses_head
    from pretune.model.heads import ClassifierModel

    torch.manual_seed(0)
    model = GPT(resolve_model_config(cfg.model))
    if uses_head(cfg):
        model = ClassifierModel(model, len(cfg.data.labels))
    if cfg.method != "full" or uses_head(cfg):
        from pretune.finetune import set_trainable  # the fine-tuning methods as the verb applies them
        set_trainable(model, cfg)
    if cfg.dist.activation_checkpointing:
        from pretune.train.dist import apply_activation_checkpointing
        apply_activation_checkpointing(model)
    return model


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    """A tokenizer.json for task runs from scratch (the run refuses a char/bpe one to train)."""
    from pretune.data.tokenizer import train_char

    path = tmp_path_factory.mktemp("tok")
    train_char(["the cat sat on the mat, positive and negative."]).save(path)
    return path / "tokenizer.json"


# a classification head (3 labels) on sequences of finetune.max_len: the model's context is 512
CLS = ["task=classification", "data.labels=[neg,neu,pos]", "finetune.max_len=64"]


@pytest.mark.parametrize("extra", [
    [], ["model.tie_embeddings=false"], ["method=freeze", "freeze.last_k=1"],
    ["method=lora", "lora.rank=4"], ["method=lora", "lora.rank=4", "lora.dropout=0", "lora.targets=[q_proj,v_proj]"],
    ["method=lora", "lora.rank=4", "lora.dropout=0"],
    ["dist.activation_checkpointing=true"], ["train.seq_len=300"],
    CLS, CLS + ["model.tie_embeddings=false"], CLS + ["method=lora", "lora.rank=4"],
    CLS + ["method=freeze", "freeze.last_k=1", "model.tie_embeddings=false"],
    CLS[:2] + ["finetune.max_len=300"],
], ids=["full", "untied", "freeze", "lora", "lora-qv", "lora-fused", "checkpointing", "long-context",
        "head", "head-untied", "head-lora", "head-freeze", "head-max-len-300"])
def test_plan_matches_a_real_allocation(extra, char_tokenizer):
    task = "task=classification" in extra
    seq = [e for e in extra if e.startswith("train.seq_len")] or ([] if task else ["train.seq_len=64"])
    tok = [f"data.tokenizer={char_tokenizer}"] if task else []
    cfg = load_config(PlanConfig, None, ARCH + seq + tok + [e for e in extra if e not in seq])
    plan = estimate(cfg)
    model = build(cfg)
    T = plan["seq_len"]
    # a fine-tuning run's sequences are at most finetune.max_len tokens, whatever the model's context
    assert T == (cfg.finetune.max_len if task else cfg.train.seq_len)
    assert plan["params"] == sum(p.numel() for p in model.parameters())
    assert plan["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    measured = saved_activation_bytes(model, torch.randint(0, 300, (4, T)))
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    optimizer.step()
    mem = plan["memory"]
    assert mem["params"] == sum(p.numel() * p.element_size() for p in model.parameters())
    assert mem["grads"] == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    assert mem["optimizer"] == sum(v.numel() * v.element_size() for s in optimizer.state.values()
                                   for v in s.values() if torch.is_tensor(v))
    kept = mem["activations"] - plan["activation_parts"]["recompute"]  # what the forward pass keeps
    assert 0.85 <= kept / measured <= 1.15, (kept, measured)


@pytest.mark.parametrize("extra", [[], ["method=lora", "lora.rank=4", "model.tie_embeddings=false"],
                                   ["method=freeze", "freeze.last_k=1"]], ids=["full", "lora-untied", "freeze"])
def test_plan_counts_frozen_weights_in_bf16_as_a_bf16_run_stores_them(extra):
    from pretune.train.frozen import FrozenInComputeDtype

    cfg = load_config(PlanConfig, None, ARCH + ["train.seq_len=64", "train.precision=bf16"] + extra)
    model = build(cfg)
    FrozenInComputeDtype(model, torch.bfloat16, torch.device("cpu"))  # what train() does under bf16 autocast
    assert estimate(cfg)["memory"]["params"] == sum(p.numel() * p.element_size() for p in model.parameters())


def test_plan_strategies_precision_and_cost():
    common = ["model.preset=1b", "model.vocab_size=32000", "train.seq_len=2048", "train.batch_size=64",
              "train.micro_batch_size=4", "train.max_steps=1000", "gpu=H100"]
    ddp = estimate(load_config(PlanConfig, None, common + ["world_size=8", "dist.strategy=ddp"]))
    fsdp = estimate(load_config(PlanConfig, None, common + ["world_size=8", "dist.strategy=fsdp"]))
    lora = estimate(load_config(PlanConfig, None, common + ["world_size=8", "method=lora", "lora.rank=16"]))
    n = ddp["params"]
    assert ddp["precision"] == "bf16" and ddp["memory"]["params"] == 4 * n  # fp32 master weights
    assert fsdp["memory"]["params"] == 4 * n / 8 and fsdp["memory"]["optimizer"] == ddp["memory"]["optimizer"] / 8
    # with accumulation FSDP2 holds unsharded fp32 gradients until the last micro-batch reduces them
    assert fsdp["memory"]["grads"] == 4 * n / 8 + 4 * n
    one_micro = estimate(load_config(PlanConfig, None, common + ["world_size=8", "dist.strategy=fsdp",
                                                                 "train.micro_batch_size=8"]))
    assert one_micro["memory"]["grads"] == 4 * n / 8
    assert lora["memory"]["optimizer"] < ddp["memory"]["optimizer"] / 50  # adapters only
    assert n < lora["params"] < 1.05 * n  # base + adapters
    assert lora["memory"]["params"] < 0.6 * 4 * lora["params"]  # the frozen base's linear weights in bf16
    assert ddp["micro_batch"] == 4 and ddp["grad_accum"] == 2
    # FLOPs: 6N + attention per token for full training; LoRA's frozen base costs 4 per weight
    assert ddp["flops"] == ddp["flops_per_token"]["total"] * 1000 * 64 * 2048
    assert 0.6 < lora["flops_per_token"]["total"] / ddp["flops_per_token"]["total"] < 0.75
    assert ddp["time_s"] == pytest.approx(ddp["flops"] / (0.4 * 989e12 * 8))
    assert ddp["energy_j"] == pytest.approx(ddp["time_s"] * 700 * 8)
    ckpt = estimate(load_config(PlanConfig, None, common + ["dist.activation_checkpointing=true", "train.batch_size=8"]))
    plain = estimate(load_config(PlanConfig, None, common + ["train.batch_size=8"]))
    assert ckpt["memory"]["activations"] < plain["memory"]["activations"] / 3


def test_plan_cli_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert run_cli("plan", "model.preset=125m", "model.vocab_size=32000", "world_size=4", "dist.strategy=fsdp",
                   "gpu=A100", "mfu=0.5", f"json_out={out}") == 0
    text = capsys.readouterr().out
    assert "memory per GPU" in text and "AdamW state" in text and "kWh" in text and "fits" in text
    p = json.loads(out.read_text())
    assert p["strategy"] == "fsdp" and p["world_size"] == 4 and p["peak_flops"] == 312e12
    assert run_cli("plan", "world_size=0", "mfu=2") == 2
    err = capsys.readouterr().err
    assert "world_size=0" in err and "mfu=2" in err
    assert run_cli("plan", "gpus=8") == 2
    assert "did you mean" in capsys.readouterr().err


def test_plan_reads_the_vocabulary_as_training_counts_it(tmp_path):
    from pretune.config import load_config
    from pretune.data.tokenizer import Tokenizer, train_bpe
    from pretune.plan import PlanConfig, resolve_arch

    text = "the cat sat on the mat while a dog ran by the old tree " * 200
    tok = train_bpe(iter([text]), vocab_size=300)
    tok.save(tmp_path)
    cfg = load_config(PlanConfig, None, [f"data.tokenizer={tmp_path / 'tokenizer.json'}", "model.preset=tiny"])
    assert resolve_arch(cfg).vocab_size == Tokenizer.load(tmp_path).vocab_size  # special tokens counted once


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H200 NVL", 835e12), ("NVIDIA L40", 181e12), ("NVIDIA L40S", 362e12),
                                        ("NVIDIA L4", 121e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("Some Unknown GPU", None)])
def test_mfu_peak_is_the_most_specific_gpu_name(name, peak):
    from pretune.train.meter import peak_flops_of

    assert peak_flops_of(name) == peak


@pytest.mark.parametrize("extra", [["method=freeze", "freeze.pattern=[lm_head.*]"],
                                   ["method=freeze", "freeze.pattern=[blocks.2.*]"]], ids=["tied-head", "block"])
def test_plan_and_meter_agree_on_what_trains_and_its_flops(extra):
    from pretune.train.meter import flops_per_token as live_flops

    cfg = load_config(PlanConfig, None, ARCH + ["train.seq_len=64"] + extra)
    plan, model = estimate(cfg), build(cfg)
    assert plan["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    live = live_flops(model, 64)
    assert {k: plan["flops_per_token"][k] for k in ("trainable", "frozen", "attention")} == \
        {k: live[k] for k in ("trainable", "frozen", "attention")}


# ----------------------------------------------------------------------------- the run it plans


def test_plan_counts_a_char_vocabulary_on_the_data_as_the_run_trains_it(tmp_path, monkeypatch):
    from pretune import plan_inputs
    from pretune.data.corpus import build_tokenizer

    corpus = make_corpus(tmp_path / "corpus.txt", lines=300)
    args = ["gpu=cpu", "model.preset=tiny", "data.tokenizer=char", f"data.train={corpus}", "train.seq_len=32"]
    cfg = load_config(PlanConfig, None, args)
    plan = estimate(cfg)
    tok = build_tokenizer(cfg.data)  # what the run trains
    assert plan["model"]["vocab_size"] == tok.vocab_size < 40  # not the 256 that was assumed before
    assert plan["params"] == sum(p.numel() for p in GPT(resolve_model_config(cfg.model, tok.vocab_size)).parameters())
    assert "distinct characters" in plan["vocab_source"] and "assumed" not in plan["vocab_source"]
    # too much text to count: assumed, and said
    monkeypatch.setattr(plan_inputs, "CHAR_COUNT_MAX_BYTES", 100)
    plan = estimate(cfg)
    assert plan["model"]["vocab_size"] == 256 and "assumed 256" in plan["vocab_source"]
    assert any("assumed" in n for n in plan["notes"])
    # a BPE tokenizer to train: data.vocab_size, its most
    bpe = estimate(load_config(PlanConfig, None, args[:2] + ["data.tokenizer=bpe", "data.vocab_size=1000"]))
    assert bpe["model"]["vocab_size"] == 1000 and "at most" in bpe["vocab_source"]


def test_plan_of_resume_plans_the_resumed_run(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus.txt", lines=300)
    run = tmp_path / "run"
    assert run_cli("pretrain", *TINY, f"data.train={corpus}", "train.max_steps=4", "train.save_every=2",
                   "train.stop_after=2", "train.batch_size=4", f"out_dir={run}") == 0
    summary = json.loads((run / "summary.json").read_text())
    out = tmp_path / "plan.json"
    capsys.readouterr()
    assert run_cli("plan", f"resume={run}", "gpu=cpu", f"json_out={out}") == 0
    p = json.loads(out.read_text())
    from pretune.data.tokenizer import Tokenizer
    assert p["model"]["vocab_size"] == Tokenizer.load(run).vocab_size < 256
    assert p["params"] == summary["params"]
    assert p["seq_len"] == 32 and p["micro_batch"] == 4 and p["steps"] == 2  # the run's, and what is left
    assert p["tokens"] == 2 * 4 * 32
    assert "step 2 of 4" in capsys.readouterr().out
    # resume written in a YAML file (with a plan key in it) plans the same run
    yaml_file = tmp_path / "r.yaml"
    yaml_file.write_text(f"resume: {run}\ngpu: cpu\n")
    assert run_cli("plan", str(yaml_file), f"json_out={out}") == 0
    assert json.loads(out.read_text())["params"] == summary["params"]
    # what the resumed run refuses, plan refuses
    assert run_cli("plan", f"resume={run}", "model.n_layer=5") == 2
    assert "cannot change" in capsys.readouterr().err


def test_plan_counts_the_classification_head_and_plans_finetune_max_len(tmp_path, char_tokenizer):
    from pretune.train.meter import flops_per_token as live_flops

    data = sentiment(tmp_path / "sent.jsonl", n=40)
    common = ARCH + [f"data.tokenizer={char_tokenizer}", "task=classification", f"data.train={data}",
                     "finetune.max_len=32", "train.batch_size=8", "train.max_steps=10"]
    cfg = load_config(PlanConfig, None, common + ["method=lora", "lora.rank=4"])
    plan = estimate(cfg)
    assert plan["n_labels"] == 2  # from the records: positive, negative
    assert "head.weight" in trainable_shapes(cfg, resolve_arch(cfg), 2)[1]
    model = build(load_config(PlanConfig, None, common + ["method=lora", "lora.rank=4", "data.labels=[a,b]"]))
    assert plan["params"] == sum(p.numel() for p in model.parameters())
    assert plan["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the sequences of finetune.max_len, not the model's context of 512
    assert plan["seq_len"] == 32 and plan["tokens"] == 10 * 8 * 32
    live = live_flops(model, 32)
    for key in ("trainable", "frozen", "attention", "total", "lm_head", "cls_head"):
        assert plan["flops_per_token"][key] == live[key], key
    # task batches of a head never run the vocabulary projection; the head runs once per example
    fpt = plan["flops_per_token"]
    assert plan["flops"] == 10 * 8 * (32 * (fpt["total"] - fpt["lm_head"]) + fpt["cls_head"])
    # without data.labels and records that can be read: assumed, and said
    assumed = estimate(load_config(PlanConfig, None, [c for c in common if not c.startswith("data.train")]))
    assert assumed["n_labels"] == 2 and any("assumed 2" in n for n in assumed["notes"])


@pytest.mark.parametrize("extra, message", [
    (["method=freeze", "freeze.last_k=0"], "freeze.last_k=0"),
    (["method=freeze", "freeze.last_k=99"], "freeze.last_k=99"),
    (["method=freeze", "freeze.last_k=-1"], "freeze.last_k=-1"),
    (["method=freeze", "freeze.pattern=[nomatch*]"], "matches no parameter"),
    (["method=lora", "lora.targets=[]"], "matched no linear layer"),
    (["method=lora", "lora.targets=[nothing]"], "matched no linear layer"),
    (["train.seq_len=4096"], "exceeds model.max_seq_len=256"),
    (["model.vocab_size=10", "data.tokenizer=TOK"], "smaller than the tokenizer"),
    (["task=classification"], "needs a tokenizer"),
    (["gpu=H100", "train.device=cpu"], "train.device=cpu"),
], ids=["last_k-0", "last_k-99", "last_k-negative", "pattern", "targets-empty", "targets-none", "seq_len",
        "vocab", "finetune-from-scratch", "gpu-on-cpu"])
def test_plan_refuses_what_the_run_refuses(extra, message, capsys, char_tokenizer):
    extra = [e.replace("TOK", str(char_tokenizer)) for e in extra]
    assert run_cli("plan", "model.preset=tiny", "model.vocab_size=300", "train.device=cpu", *extra) == 2
    assert message in capsys.readouterr().err


def test_plan_on_the_cpu_claims_no_gpu(capsys, monkeypatch):
    from pretune import plan_inputs

    cpu = estimate(load_config(PlanConfig, None, ["model.preset=tiny", "model.vocab_size=300", "train.device=cpu"]))
    assert cpu["device"] == "cpu" and cpu["precision"] == "fp32" and cpu["time_s"] is None
    assert cpu["gpu_memory_gb"] is None and cpu["energy_j"] is None
    text = format_plan(cpu)
    assert "H100" not in text and "memory per GPU" not in text and "time: not estimated for the CPU" in text
    bf16 = estimate(load_config(PlanConfig, None, ["model.vocab_size=300", "train.device=cpu", "train.precision=bf16"]))
    assert bf16["precision"] == "bf16"
    rated = estimate(load_config(PlanConfig, None, ["model.vocab_size=300", "gpu=cpu", "peak_tflops=1", "mfu=0.5"]))
    assert rated["time_s"] == pytest.approx(rated["flops"] / 0.5e12)
    # no gpu= given: this machine's GPU when the table knows it, else an H100 with a note
    for name, device, note in [("NVIDIA H200", "H200", "this machine's NVIDIA H200"),
                               ("NVIDIA H100 PCIe", "H100 PCIe", "this machine's"),
                               ("Tesla K80", "H100", "not in the peak FLOP/s table"),
                               (None, "cpu", "no GPU here")]:
        monkeypatch.setattr(plan_inputs, "detected_gpu", lambda name=name: name)
        p = estimate(load_config(PlanConfig, None, ["model.vocab_size=300"]))
        assert p["device"] == device and any(note in n for n in p["notes"]), (name, p["notes"])
    p = estimate(load_config(PlanConfig, None, ["model.vocab_size=300", "train.device=cuda"]))
    assert p["device"] == "H100" and p["precision"] == "bf16" and any("no GPU here" in n for n in p["notes"])
    assert estimate(load_config(PlanConfig, None, ["model.vocab_size=300", "gpu=V100"]))["precision"] == "fp32"


def test_plan_of_a_finished_run_says_there_is_nothing_left_to_plan(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus.txt", lines=300)
    run = tmp_path / "run"
    assert run_cli("pretrain", *TINY, f"data.train={corpus}", "train.max_steps=2", "train.save_every=2",
                   "train.batch_size=4", f"out_dir={run}") == 0
    capsys.readouterr()
    out = tmp_path / "plan.json"
    assert run_cli("plan", f"resume={run}", "gpu=cpu", f"json_out={out}") == 0
    printed = capsys.readouterr().out
    assert "has already finished (completed at step 2" in printed and "nothing left to plan" in printed
    assert "raise train.max_steps" in printed and "FLOPs" not in printed and "memory" not in printed
    assert json.loads(out.read_text())["finished"] is True


def test_lineage_names_the_data_by_absolute_path_as_config_yaml_does(tmp_path, monkeypatch):
    from pathlib import Path

    import yaml

    make_corpus(tmp_path / "corpus.txt", lines=300)
    monkeypatch.chdir(tmp_path)
    assert run_cli("pretrain", *TINY, "data.train=corpus.txt", "train.max_steps=1", "train.batch_size=4",
                   "out_dir=run") == 0
    lineage = json.loads(Path("run/lineage.json").read_text())
    config = yaml.safe_load(Path("run/config.yaml").read_text())
    train = str(tmp_path / "corpus.txt")
    assert config["data"]["train"] == [train] and list(lineage["data"]["train"]) == [train]
    assert list(lineage["data"]["val"]) == [train + ":val"]  # the validation part split off it
