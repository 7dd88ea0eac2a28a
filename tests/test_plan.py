"""`pretune plan` against a real allocation on the CPU: parameter count and parameter + gradient +
AdamW bytes exact, activations within 15% of the tensors autograd saves (see pretune.plan)."""

import json

import pytest
import torch

from conftest import run_cli
from pretune.config import load_config
from pretune.model.config import resolve_model_config
from pretune.model.gpt import GPT, cross_entropy_sum
from pretune.plan import PlanConfig, estimate
from pretune.train.optim import build_optimizer

ARCH = ["gpu=cpu", "model.preset=custom", "model.n_layer=3", "model.n_head=4", "model.n_kv_head=2",
        "model.d_model=64", "model.d_ff=160", "model.max_seq_len=512", "model.vocab_size=300",
        "train.batch_size=4"]


def saved_activation_bytes(model: torch.nn.Module, idx: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward (each storage once; weights excluded)."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = cross_entropy_sum(model(idx), idx)
    loss.backward()
    return sum(seen.values())


def build(cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    model = GPT(resolve_model_config(cfg.model))
    if cfg.method != "full":
        from pretune.finetune import set_trainable  # the fine-tuning methods as the verb applies them
        set_trainable(model, cfg)
    if cfg.dist.activation_checkpointing:
        from pretune.train.dist import apply_activation_checkpointing
        apply_activation_checkpointing(model)
    return model


@pytest.mark.parametrize("extra", [
    [], ["model.tie_embeddings=false"], ["method=freeze", "freeze.last_k=1"],
    ["method=lora", "lora.rank=4"], ["method=lora", "lora.rank=4", "lora.dropout=0", "lora.targets=[q_proj,v_proj]"],
    ["method=lora", "lora.rank=4", "lora.dropout=0"],
    ["dist.activation_checkpointing=true"], ["train.seq_len=300"],
], ids=["full", "untied", "freeze", "lora", "lora-qv", "lora-fused", "checkpointing", "long-context"])
def test_plan_matches_a_real_allocation(extra):
    seq = [e for e in extra if e.startswith("train.seq_len")] or ["train.seq_len=64"]
    cfg = load_config(PlanConfig, None, ARCH + seq + [e for e in extra if e not in seq])
    plan = estimate(cfg)
    model = build(cfg)
    T = cfg.train.seq_len
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
