"""DPO's reference and its combination with L2-SP (train/objectives.py)."""

import json

import torch

from conftest import TINY, make_corpus, run_cli
from pretune.model.config import ModelConfig, resolve_model_config
from pretune.model.gpt import GPT
from pretune.model.lora import apply_lora
from pretune.train.objectives import L2SP, DPOObjective

FT = [a for a in TINY if not a.startswith(("data.tokenizer", "train.seq_len"))] + ["finetune.max_len=64"]


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
