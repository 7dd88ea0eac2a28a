"""Frozen linear weights kept in bf16 under bf16 autocast (train/frozen.py): the same step bit for
bit, less memory, and fp32 weights in everything saved."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FT, TINY, make_corpus, run_cli, sentiment
from pretune.model.config import ModelConfig, resolve_model_config
from pretune.model.gpt import GPT, cross_entropy_sum
from pretune.model.lora import apply_lora
from pretune.train.frozen import FrozenInComputeDtype



def lora_model(tie=True):
    torch.manual_seed(0)
    model = GPT(resolve_model_config(ModelConfig(preset="tiny", vocab_size=40, tie_embeddings=tie)))
    apply_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj"))
    with torch.no_grad():  # adapters that change the output, so their gradients are not trivial
        for n, p in model.named_parameters():
            if n.endswith("lora_b"):
                p.normal_(0, 0.02)
    return model


def step(model, x):
    """One bf16-autocast forward and backward; the loss, the adapters' gradients and the bytes of
    what autograd saved for backward apart from the parameters themselves."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = cross_entropy_sum(model(x[:, :-1]), x[:, 1:])
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved.values())


@pytest.mark.parametrize("tie", [True, False])
def test_frozen_weights_in_bf16_give_the_same_step_with_less_saved(tie):
    x = torch.randint(0, 40, (3, 33))  # 96 rows: below gpt.FUSE_MIN_ROWS, each projection on its own
    plain, cast = lora_model(tie), lora_model(tie)
    frozen = FrozenInComputeDtype(cast, torch.bfloat16, torch.device("cpu"))
    dtypes = {n: p.dtype for n, p in cast.named_parameters()}
    assert dtypes["blocks.0.attn.q_proj.weight"] == dtypes["blocks.0.mlp.down_proj.weight"] == torch.bfloat16
    assert dtypes["blocks.0.attn.q_proj.lora_a"] == dtypes["tok_emb.weight"] == dtypes["norm.weight"] == torch.float32
    # an untied output layer is a frozen linear like any other; a tied one is the embedding and stays fp32
    assert ("lm_head.weight" in dtypes) == (not tie)
    if not tie:
        assert dtypes["lm_head.weight"] == torch.bfloat16

    loss_a, grads_a, saved_a = step(plain, x)
    loss_b, grads_b, saved_b = step(cast, x)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and all(n.endswith(("lora_a", "lora_b")) for n in grads_a)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    # autocast's bf16 copies of the frozen weights that gradients flow through are no longer made
    copies = sum(2 * p.numel() for n, p in plain.named_parameters()
                 if n.endswith("proj.weight") and not n.startswith(("blocks.0.attn.q", "blocks.0.attn.k",
                                                                     "blocks.0.attn.v")))
    assert saved_a - saved_b >= copies
    frozen.restore()


def test_state_dict_gives_the_fp32_originals_and_loading_or_restoring_keeps_them():
    model = lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = FrozenInComputeDtype(model, torch.bfloat16, torch.device("cpu"))
    sd = model.state_dict()
    assert all(sd[k].dtype == v.dtype and torch.equal(sd[k], v) for k, v in before.items())
    # a state dict loaded while the run lasts (a resumed checkpoint) becomes the originals
    changed = dict(sd, **{"blocks.1.mlp.up_proj.weight": sd["blocks.1.mlp.up_proj.weight"] + 1e-4})
    model.load_state_dict(changed)
    assert torch.equal(model.state_dict()["blocks.1.mlp.up_proj.weight"], changed["blocks.1.mlp.up_proj.weight"])
    frozen.restore()
    after = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 for p in after.values())
    assert torch.equal(after["blocks.1.mlp.up_proj.weight"], changed["blocks.1.mlp.up_proj.weight"])
    assert torch.equal(after["blocks.0.attn.q_proj.weight"], before["blocks.0.attn.q_proj.weight"])
    assert not model._state_dict_hooks and len(frozen) == 0


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    root = tmp_path_factory.mktemp("parent")
    corpus = make_corpus(root / "corpus.txt", lines=300)
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={root / 'run'}", "train.max_steps=5", *TINY,
                   "train.save_every=0") == 0
    return root / "run"


def test_a_bf16_lora_run_saves_the_fp32_base_and_resumes_exactly(tmp_path, parent):
    """train.precision=bf16 on the CPU: the merged model/ has the parent's fp32 weights wherever no
    adapter is, checkpoints hold fp32 tensors, and a cut run resumes to the same losses."""
    train = sentiment(tmp_path / "train.jsonl", 60)
    args = [f"init_from={parent}", "task=classification", "method=lora", "lora.targets=[q_proj,v_proj]",
            "train.precision=bf16", f"data.train={train}", "train.max_steps=8", "train.save_every=4", *FT]
    assert run_cli("finetune", *args, f"out_dir={tmp_path / 'whole'}") == 0
    assert run_cli("finetune", *args, f"out_dir={tmp_path / 'cut'}", "train.stop_after=4") == 0
    ckpt = load_file(str(next((tmp_path / "cut" / "checkpoints").iterdir()) / "model.safetensors"))
    assert run_cli("finetune", f"resume={tmp_path / 'cut'}") == 0
    base = load_file(str(parent / "model" / "model.safetensors"))
    merged = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in [*ckpt.values(), *merged.values()])
    for name in ("blocks.0.mlp.up_proj.weight", "blocks.1.attn.k_proj.weight", "tok_emb.weight"):
        assert torch.equal(merged[name], base[name]) and torch.equal(ckpt.get(name, base[name]), base[name])
    assert not torch.equal(merged["blocks.0.attn.q_proj.weight"], base["blocks.0.attn.q_proj.weight"])
    losses = [[json.loads(line)["loss"] for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for r in ("whole", "cut")]
    assert losses[0] == losses[1] and len(losses[0]) == 8
