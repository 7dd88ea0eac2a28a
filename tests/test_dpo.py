"""DPO's reference, L2-SP with DPO and with LoRA (train/objectives.py)."""

import json

import torch

from conftest import FT, TINY, make_corpus, run_cli
from pretune.model.config import ModelConfig, resolve_model_config
from pretune.model.gpt import GPT
from pretune.model.lora import apply_lora
from pretune.train.objectives import L2SP, DPOObjective



def test_the_lora_reference_is_the_base_without_dropout_and_l2sp_passes_dpo_through():
    torch.manual_seed(0)
    model = GPT(resolve_model_config(ModelConfig(preset="tiny", vocab_size=40, dropout=0.2, attn_dropout=0.2)))
    apply_lora(model, rank=4, alpha=8)
    model.train()
    ids = torch.randint(0, 40, (4, 12))
    targets = ids.roll(-1, 1)
    targets[:, :6] = -100  # the prompt
    batch = {"input_ids": ids, "targets": targets, "pairs": 2}
    dpo = L2SP(DPOObjective(model, beta=0.5), model, lam=0.1)  # what finetune.l2sp > 0 builds
    refs = []
    for _ in range(2):
        delta, policy = dpo.margins(model, batch)  # the policy's own dropout differs call to call
        refs.append(policy - delta)
    assert torch.equal(refs[0], refs[1]) and model.training
    assert dpo.reference is None  # LoRA: no second copy of the weights


def test_preference_tuning_with_l2sp_evaluates_and_finishes(tmp_path):
    corpus = make_corpus(tmp_path / "corpus.txt", lines=300)
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={tmp_path / 'base'}", "train.max_steps=5",
                   *TINY, "train.save_every=0") == 0
    rows = [{"prompt": f"pick {i % 5}", "chosen": "the cat sat", "rejected": "dog dog dog"} for i in range(16)]
    f = tmp_path / "pref.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for method in ("lora", "full"):
        out = tmp_path / method
        assert run_cli("finetune", f"init_from={tmp_path / 'base'}", "task=preference", f"method={method}",
                       "finetune.l2sp=0.1", f"data.train={f}", f"data.val={f}", f"out_dir={out}",
                       "train.max_steps=4", "train.eval_every=2", *FT) == 0
        s = json.loads((out / "summary.json").read_text())
        assert s["status"] == "completed" and "reward_margin" in s


def test_l2sp_on_lora_is_the_size_of_the_weight_change():
    from pretune.model.lora import lora_layers

    torch.manual_seed(0)
    model = GPT(resolve_model_config(ModelConfig(preset="tiny", vocab_size=40)))
    apply_lora(model, rank=4, alpha=8, targets=("q_proj", "down_proj"))
    l2sp = L2SP(None, model, lam=0.3)
    assert not any(k.endswith(("lora_a", "lora_b")) for k in l2sp.anchor)
    assert l2sp.penalty(model) == 0  # B = 0: the merged weights are the pre-trained ones
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_b"):
                p.normal_()
    change = sum(((m.merged_weight() - m.weight) ** 2).sum() for m in lora_layers(model).values())
    penalty = l2sp.penalty(model)
    assert torch.allclose(penalty, 0.15 * change, rtol=1e-5)
    penalty.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith(("lora_a", "lora_b")))
