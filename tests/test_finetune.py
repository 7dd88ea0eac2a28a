"""Fine-tuning through the one loop: LoRA properties, masking, tasks, methods, regularisers, DPO."""

import json

import pytest
import torch

from conftest import FT, TINY, make_corpus, pretrain_base, read_metrics, run_cli, sentiment
from pretune.model.config import ModelConfig, resolve_model_config
from pretune.model.gpt import GPT
from pretune.model.io import model_state
from pretune.model.lora import apply_lora, merge_lora, merged_state



@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return pretrain_base(tmp_path_factory.mktemp("base"), lines=1500, steps=40)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(resolve_model_config(ModelConfig(preset="tiny", vocab_size=40)))


def test_lora_starts_at_the_base_trains_only_adapters_and_merges_exactly():
    model = tiny_model()
    x = torch.randint(0, 40, (2, 12))
    base = model(x).detach()
    apply_lora(model, rank=4, alpha=8)
    assert torch.equal(model(x), base)
    model(x).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.endswith(("lora_a", "lora_b")) for n in grads)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_b"):
                p.normal_()
    adapted = model(x).detach()
    assert not torch.allclose(adapted, base)
    saved = merged_state(model)  # what a LoRA run writes to model/, the model left as it was
    assert torch.equal(model(x), adapted)
    merge_lora(model)
    assert torch.allclose(model(x), adapted, atol=1e-5)
    assert saved.keys() == model_state(model).keys()
    assert all(torch.equal(saved[k], v) for k, v in model_state(model).items())


def test_prompt_tokens_carry_no_loss(base_run):
    from pretune.config import Config, load_config
    from pretune.data.tasks import TaskStats, collate, encode
    from pretune.data.tokenizer import Tokenizer

    tok = Tokenizer.load(base_run)
    cfg = load_config(Config, None, ["task=instruction"])
    rec = {"messages": [{"role": "user", "content": "say cat"}, {"role": "assistant", "content": "cat"}]}
    (ex,) = encode([rec], cfg, tok, None, TaskStats())
    batch = collate([ex], "instruction", "", tok.pad_id)
    targets = batch["targets"][0]
    kept = [int(t) for t in targets if t != -100]
    assert tok.decode(kept, skip_special=True) == "cat" and kept[-1] == tok.eos_id
    assert (targets[: len(ex["prompt"]) - 1] == -100).all()


@pytest.mark.parametrize("classifier", ["head", "verbalizer"])
def test_classification_learns_well_above_chance(tmp_path, base_run, classifier):
    train, val = sentiment(tmp_path / "train.jsonl"), sentiment(tmp_path / "val.jsonl", 60, seed=1)
    out = tmp_path / classifier
    # the verbalizer learns through the LM's next-character choice: it needs more steps than a head
    steps = ["train.max_steps=40"] if classifier == "head" else ["train.max_steps=100", "train.batch_size=16",
                                                                "optim.lr=1e-2"]
    assert run_cli("finetune", f"init_from={base_run}", "task=classification", f"finetune.classifier={classifier}",
                   f"data.train={train}", f"data.val={val}", f"out_dir={out}", "train.eval_every=20", *FT,
                   *steps) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] >= 0.85 and summary["macro_f1"] >= 0.85, summary
    assert (out / "model" / "task.json").is_file()
    assert json.loads((out / "lineage.json").read_text())["stage"] == "finetune"
    # `pretune evaluate` reads the task, labels and head from model/task.json and agrees with the run
    e = tmp_path / f"{classifier}-eval.json"
    assert run_cli("evaluate", out, f"data.val={val}", "max_len=64", f"out={e}",
                   f"predictions={tmp_path / 'pred.jsonl'}") == 0
    r = json.loads(e.read_text())
    assert r["task"] == "classification" and r["examples"] == 60
    assert (round(r["accuracy"], 6), round(r["macro_f1"], 6)) == (summary["accuracy"], summary["macro_f1"])
    assert len((tmp_path / "pred.jsonl").read_text().splitlines()) == 60


@pytest.mark.parametrize("method,expect", [("lora", "adapter/adapter.safetensors"), ("freeze", "model/head.safetensors")])
def test_methods_train_fewer_parameters(tmp_path, base_run, method, expect):
    train = sentiment(tmp_path / "train.jsonl", 80)
    out = tmp_path / method
    assert run_cli("finetune", f"init_from={base_run}", "task=classification", f"method={method}", "lora.rank=2",
                   "freeze.last_k=1", f"data.train={train}", f"out_dir={out}", "train.max_steps=6", *FT) == 0
    s = json.loads((out / "summary.json").read_text())
    assert 0 < s["trainable_params"] < s["params"] and (out / expect).is_file()
    assert s["flops_per_token"]["frozen"] > 0


@pytest.mark.parametrize("with_test", [False, True])
def test_early_stopping_keeps_the_best_checkpoint(tmp_path, base_run, with_test):
    train, val = sentiment(tmp_path / "t.jsonl", 80), sentiment(tmp_path / "v.jsonl", 40, seed=3)
    test = [f"data.test={sentiment(tmp_path / 'test.jsonl', 40, seed=4)}"] if with_test else []
    out = tmp_path / "es"
    assert run_cli("finetune", *FT, f"init_from={base_run}", "task=classification", f"data.train={train}",
                   f"data.val={val}", f"out_dir={out}", "train.max_steps=200", "train.eval_every=2",
                   "optim.lr=1e-2", "optim.warmup_steps=0", "optim.schedule=constant",
                   "train.early_stop_metric=val_loss", "train.patience=3", *test) == 0
    s = json.loads((out / "summary.json").read_text())
    evals = [r for r in read_metrics(out) if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    assert s["status"] == "early_stopped" and s["steps"] < 200
    assert s["best_step"] == best["step"] and s["best_value"] == pytest.approx(best["val_loss"], abs=1e-5)
    assert s["steps"] == best["step"] + 3 * 2  # three evaluations without improvement
    assert s["val_loss"] == pytest.approx(best["val_loss"], abs=1e-4)  # the final model is the best one


def test_cross_validation_folds_are_disjoint(tmp_path, base_run):
    from pretune.data.tasks import split_folds

    folds = split_folds(23, 4, seed=1)
    vals = [set(v) for _, v in folds]
    assert sum(len(v) for v in vals) == 23 and set().union(*vals) == set(range(23))
    assert all(not (a & b) for i, a in enumerate(vals) for b in vals[i + 1:])
    assert all(set(t).isdisjoint(v) for (t, _), v in zip(folds, vals))
    train = sentiment(tmp_path / "t.jsonl", 60)
    out = tmp_path / "cv"
    assert run_cli("finetune", f"init_from={base_run}", "task=classification", f"data.train={train}",
                   f"out_dir={out}", "finetune.cv=3", "train.max_steps=4", *FT) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["cv"] == 3 and len(s["folds"]) == 3 and "accuracy" in s["mean"] and "accuracy" in s["std"]
    assert sum(s["fold_validation_sizes"]) == 60


def test_cross_validation_resumes_where_it_stopped(tmp_path, base_run, capsys):
    import shutil

    train = sentiment(tmp_path / "t.jsonl", 60)
    out = tmp_path / "cv"
    args = [f"init_from={base_run}", "task=classification", f"data.train={train}", f"out_dir={out}",
            "finetune.cv=3", "train.max_steps=4", *FT, "train.save_every=2", "train.eval_every=2"]
    assert run_cli("finetune", *args) == 0
    whole = json.loads((out / "summary.json").read_text())
    losses = [[r["loss"] for r in read_metrics(out / f"fold-{i}")] for i in range(3)]
    # fold 2 interrupted after its step-2 checkpoint; fold 1 never started
    for name in ("summary.json", "model", "checkpoints/step-000004", "predictions.jsonl"):
        target = out / "fold-2" / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    shutil.rmtree(out / "fold-1")
    (out / "summary.json").unlink()
    capsys.readouterr()
    assert run_cli("finetune", f"resume={out}") == 0
    assert "fold 0: finished earlier" in capsys.readouterr().out
    assert [[r["loss"] for r in read_metrics(out / f"fold-{i}")] for i in range(3)] == losses
    again = json.loads((out / "summary.json").read_text())
    assert again["mean"]["accuracy"] == whole["mean"]["accuracy"] and again["mean"]["val_loss"] == whole["mean"]["val_loss"]
    # each fold's config names its fold, so resuming that fold alone splits the records the same way
    fold = json.loads((out / "fold-1" / "lineage.json").read_text())["examples"]
    assert (fold["train"], fold["val"]) == (40, 20)
    assert "fold: 1" in (out / "fold-1" / "config.yaml").read_text()


def test_l2sp_with_zero_lambda_equals_plain_training(tmp_path, base_run):
    train = sentiment(tmp_path / "t.jsonl", 40)
    runs = []
    for lam in ("0.0", "1.0"):
        out = tmp_path / f"l2sp{lam}"
        assert run_cli("finetune", f"init_from={base_run}", "task=classification", f"data.train={train}",
                       f"out_dir={out}", "train.max_steps=5", f"finetune.l2sp={lam}", *FT) == 0
        runs.append([r["loss"] for r in read_metrics(out)])
    plain = tmp_path / "plain"
    assert run_cli("finetune", f"init_from={base_run}", "task=classification", f"data.train={train}",
                   f"out_dir={plain}", "train.max_steps=5", *FT) == 0
    assert runs[0] == [r["loss"] for r in read_metrics(plain)]
    assert runs[1] != runs[0]  # a positive lambda does change the objective


def test_instruction_with_replay_and_generation_metrics(tmp_path, base_run):
    rows = [{"prompt": f"repeat {w}", "response": w} for w in ["cat", "dog", "mat", "fox"] * 10]
    f = tmp_path / "inst.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    replay = make_corpus(tmp_path / "general.txt", lines=200, seed=4)
    out = tmp_path / "inst"
    assert run_cli("finetune", f"init_from={base_run}", "task=instruction", f"data.train={f}", f"data.val={f}",
                   f"finetune.replay=[{replay}]", "finetune.replay_ratio=0.25", "finetune.eval_examples=8",
                   "finetune.max_new_tokens=8", f"out_dir={out}", "train.max_steps=8", *FT,
                   "finetune.prompt_loss=true") == 0
    s = json.loads((out / "summary.json").read_text())
    assert {"loss", "ppl", "exact_match", "chrf"} <= set(s) and s["target_tokens"] > 0
    e = tmp_path / "eval.json"
    # the formatting settings (max_len, truncation, prompt_loss) come from the model's task.json
    assert run_cli("evaluate", out, f"data.val={f}", "max_new_tokens=8", "eval_examples=8", f"out={e}") == 0
    r = json.loads(e.read_text())
    assert r["task"] == "instruction" and r["loss"] == pytest.approx(s["loss"], rel=1e-5)
    assert (r["exact_match"], r["chrf"]) == (s["exact_match"], s["chrf"])


def test_replay_weight_scales_the_replay_loss_beside_the_task_loss(tmp_path, base_run):
    rows = [{"prompt": f"repeat {w}", "response": w} for w in ["cat", "dog", "mat", "fox"] * 4]
    f = tmp_path / "inst.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    replay = make_corpus(tmp_path / "general.txt", lines=100, seed=4)
    first = {}
    for w in (0, 1, 2):  # the first step's loss, at the starting weights: task mean + w x replay mean
        out = tmp_path / f"w{w}"
        assert run_cli("finetune", f"init_from={base_run}", "task=instruction", f"data.train={f}",
                       f"finetune.replay=[{replay}]", "finetune.replay_ratio=0.25", f"finetune.replay_weight={w}",
                       f"out_dir={out}", "train.max_steps=1", "train.log_every=1", "train.eval_every=0",
                       *FT) == 0
        first[w] = read_metrics(out)[0]["loss"]
    replay_mean = first[1] - first[0]
    assert replay_mean > 0.5 and first[2] - first[1] == pytest.approx(replay_mean, rel=1e-5)
    assert run_cli("finetune", f"init_from={base_run}", "task=instruction", f"data.train={f}",
                   "finetune.replay_weight=-1", f"out_dir={tmp_path / 'neg'}", *FT) == 2


def test_dpo_loss_falls_and_margin_grows(tmp_path, base_run):
    rows = [{"prompt": f"pick {i % 5}", "chosen": "the cat sat", "rejected": "dog dog dog"} for i in range(40)]
    f = tmp_path / "pref.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "dpo"
    assert run_cli("finetune", f"init_from={base_run}", "task=preference", "method=lora", "lora.rank=4",
                   f"data.train={f}", f"data.val={f}", f"out_dir={out}", "train.max_steps=20",
                   "train.eval_every=10", "finetune.dpo_beta=0.5", *FT) == 0
    m = read_metrics(out)
    evals = [r for r in m if "val_reward_margin" in r]
    assert m[-1]["loss"] < m[0]["loss"] < 0.7  # -log sigmoid(0) = 0.693 at the start
    assert evals[-1]["val_reward_margin"] > evals[0]["val_reward_margin"] > 0
    # the merged model against its base as the reference: the run's own final figures
    s = json.loads((out / "summary.json").read_text())
    e = tmp_path / "eval.json"
    assert run_cli("evaluate", out, f"data.val={f}", f"reference={base_run}", "max_len=64", f"out={e}") == 0
    r = json.loads(e.read_text())
    assert r["reward_margin"] == pytest.approx(s["reward_margin"], rel=1e-3)
    assert r["pref_accuracy"] == s["pref_accuracy"] == 1.0 and r["reward_accuracy"] == s["reward_accuracy"] == 1.0
    pred = tmp_path / "pred.jsonl"
    assert run_cli("evaluate", out, f"data.val={f}", "max_len=64", f"out={e}", f"predictions={pred}") == 0
    assert set(json.loads(e.read_text())) >= {"pref_accuracy", "policy_margin"}  # no reference
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    assert len(rows) == 40 and set(rows[0]) == {"policy_margin", "pref_accuracy"}
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 40  # the run's own, with reward_margin


def test_malformed_records_name_file_line_and_field_or_are_skipped(tmp_path, base_run, capsys):
    f = tmp_path / "bad.jsonl"
    good = [json.dumps({"text": f"the cat {i}", "label": "a" if i % 2 else "b"}) for i in range(30)]
    f.write_text("\n".join(good[:5] + [json.dumps({"text": "no label here"})] + good[5:]) + "\n")
    out = tmp_path / "bad"
    args = ["finetune", f"init_from={base_run}", "task=classification", f"data.train={f}", f"out_dir={out}",
            "train.max_steps=2", *FT]
    assert run_cli(*args) == 2
    assert "bad.jsonl:6: field 'label' is missing or empty" in capsys.readouterr().err
    assert run_cli(*args, "data.on_error=skip", "overwrite=true") == 0
    assert json.loads((out / "summary.json").read_text())["skipped_records"] == 1


def test_from_scratch_needs_a_tokenizer_file(tmp_path, base_run, capsys):
    train = sentiment(tmp_path / "t.jsonl", 20)
    assert run_cli("finetune", "task=classification", f"data.train={train}", f"out_dir={tmp_path / 'x'}", *FT) == 2
    assert "needs a tokenizer" in capsys.readouterr().err
    assert run_cli("finetune", "task=classification", f"data.train={train}", f"data.tokenizer={base_run}",
                   f"out_dir={tmp_path / 'y'}", "train.max_steps=3", *FT) == 0


def test_an_interrupted_fine_tuning_run_resumes_exactly(tmp_path, capsys):
    """The resumed run rebuilds its starting model from the parent in lineage.json (its architecture,
    here not the default one, and the L2-SP anchor), then loads its checkpoint: the losses equal an
    uninterrupted run's."""
    corpus, parent = make_corpus(tmp_path / "corpus.txt", lines=300), tmp_path / "parent"
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={parent}", "train.max_steps=5", *TINY,
                   "model.n_layer=3", "model.d_model=48", "train.save_every=0") == 0
    train = sentiment(tmp_path / "train.jsonl")
    args = [f"init_from={parent}", "task=classification", "method=full", "finetune.l2sp=0.5",
            f"data.train={train}", "train.max_steps=12", "train.save_every=6", "train.eval_every=6", *FT]
    assert run_cli("finetune", *args, f"out_dir={tmp_path / 'whole'}") == 0
    assert run_cli("finetune", *args, f"out_dir={tmp_path / 'cut'}", "train.stop_after=6") == 0
    assert run_cli("finetune", f"resume={tmp_path / 'cut'}", "train.batch_size=0") == 2
    assert "train.batch_size=0" in capsys.readouterr().err  # a bad override stops it, the run untouched
    assert run_cli("finetune", f"resume={tmp_path / 'cut'}", "method=lora") == 2
    assert "method='lora' cannot change (the run has 'full')" in capsys.readouterr().err
    assert run_cli("finetune", f"resume={tmp_path / 'cut'}") == 0  # train.stop_after is not asked again
    whole, cut = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(1, 13))
    assert [r["loss"] for r in cut] == [r["loss"] for r in whole]
    assert [r["val_loss"] for r in cut if "val_loss" in r] == [r["val_loss"] for r in whole if "val_loss" in r]


def test_held_out_fractions_are_the_fraction_asked_for_and_label_ids_keep_their_order(tmp_path):
    from pretune.data.tasks import split_folds
    from pretune.config import Config, load_config
    from pretune.finetune import _records, hold_out

    for n, f in ((120, 0.4), (120, 0.6), (120, 0.15), (7, 0.99), (7, 0.01)):
        kept, held = hold_out(n, f, seed=3)
        assert len(held) == min(max(1, round(n * f)), n - 1) and sorted(kept + held) == list(range(n))
    assert hold_out(50, 0.25, seed=3) == split_folds(50, 4, 3)[0]  # 1/k: cross-validation's first fold
    rows = [{"text": f"t{i}", "label": i % 12} for i in range(48)]
    f = tmp_path / "ids.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(Config, None, ["task=classification", f"data.train={f}", "data.val_fraction=0"])
    assert _records(cfg)[3] == [str(i) for i in range(12)]  # by value: head output i is label id i
    names = [f"class{i}" for i in range(12)]
    cfg = load_config(Config, None, ["task=classification", f"data.train={f}", "data.val_fraction=0",
                                     f"data.labels=[{','.join(names)}]"])
    train = _records(cfg)[0]
    assert [r["label"] for r in train[:3]] == ["class0", "class1", "class2"]  # ids name data.labels in order


def test_a_run_that_kept_the_adapter_alone_loads_as_base_plus_adapter(tmp_path, base_run):
    train, val = sentiment(tmp_path / "train.jsonl", 80), sentiment(tmp_path / "val.jsonl", 30, seed=2)
    out = tmp_path / "adapter-only"
    assert run_cli("finetune", f"init_from={base_run}", "task=classification", "method=lora", "lora.rank=2",
                   "lora.save=adapter", f"data.train={train}", f"data.val={val}", f"out_dir={out}",
                   "train.max_steps=6", *FT) == 0
    assert not (out / "model").exists() and (out / "adapter" / "adapter.safetensors").is_file()
    s = json.loads((out / "summary.json").read_text())
    e = tmp_path / "eval.json"
    assert run_cli("evaluate", out, f"data.val={val}", f"out={e}") == 0
    r = json.loads(e.read_text())
    assert (round(r["accuracy"], 6), r["loss"]) == (s["accuracy"], pytest.approx(s["loss"], rel=1e-5))  # 6 places


def test_freeze_patterns_reach_a_tied_output_layer_and_the_blocks_under_a_head(tmp_path, base_run):
    from pretune.config import Config, load_config
    from pretune.data.tokenizer import Tokenizer
    from pretune.finetune import build_task_model

    tok = Tokenizer.load(base_run)

    def trainable(*args):
        cfg = load_config(Config, None, [f"init_from={base_run}", "method=freeze", *args])
        model = build_task_model(cfg, tok, 2)
        return {n for n, p in model.named_parameters() if p.requires_grad}

    assert "tok_emb.weight" not in trainable("task=instruction")  # a tied output layer: frozen by last_k
    assert trainable("task=instruction", "freeze.pattern=[lm_head.weight]") == {"tok_emb.weight"}
    under_head = trainable("task=classification", "freeze.pattern=[blocks.1.*]")
    assert under_head and all(n.startswith(("lm.blocks.1.", "head.")) for n in under_head)
    with pytest.raises(Exception, match="names look like"):
        trainable("task=instruction", "freeze.pattern=[nothing.*]")


def test_l2sp_anchors_the_pretrained_weights_not_a_new_head_and_bad_lora_targets_are_config_errors():
    from pretune.errors import ConfigError
    from pretune.model.heads import ClassifierModel
    from pretune.train.objectives import L2SP, ClassifierObjective

    lm = GPT(resolve_model_config(ModelConfig(preset="tiny", vocab_size=40)))
    model = ClassifierModel(lm, 3)
    reg = L2SP(ClassifierObjective(), model, 1.0)
    assert "lm.blocks.0.attn.q_proj.weight" in reg.anchor and not any(k.startswith("head.") for k in reg.anchor)
    with torch.no_grad():
        model.head.weight.add_(1.0)  # the head moved: no penalty; a pre-trained weight moved: one
    assert reg.penalty(model).item() == 0
    with torch.no_grad():
        model.lm.norm.weight.add_(1.0)
    assert reg.penalty(model).item() == pytest.approx(0.5 * lm.cfg.d_model)
    with pytest.raises(ConfigError, match="matched no linear layer"):
        apply_lora(GPT(resolve_model_config(ModelConfig(preset="tiny", vocab_size=40))), targets=["qproj"])


def test_every_test_example_is_generated_for_whatever_eval_examples_says(tmp_path, base_run):
    rows = [{"prompt": f"repeat {w}", "response": w} for w in ["cat", "dog", "mat"] * 4]
    f = tmp_path / "inst.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "inst"
    assert run_cli("finetune", f"init_from={base_run}", "task=instruction", f"data.train={f}", f"data.val={f}",
                   f"data.test={f}", "finetune.eval_examples=3", "finetune.max_new_tokens=4", f"out_dir={out}",
                   "train.max_steps=2", *FT) == 0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 12  # the test set, all of it


def test_rouge_counts_words_of_any_script_and_scores_english_as_rouge_score_does():
    from rouge_score import rouge_scorer

    from pretune.eval import metrics as M

    assert M.rouge(["кошка сидит на ковре"], ["кошка сидит на полу"])["rouge_1"] == pytest.approx(0.75)
    assert M.rouge(["Ελληνικά κείμενα"], ["ελληνικά κείμενα"])["rouge_l"] == 1.0  # lowercased
    assert M.rouge(["猫 が 座った"], ["犬 が 走った"])["rouge_1"] == pytest.approx(1 / 3)
    plain = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)  # its own tokenizer
    pairs = [("The cats were running quickly!", "the cat runs quick"), ("generalization_tests 42x", "generalized tests 42"),
             ("It's a well-known fact: models overfit.", "models are overfitting, it is known")]
    for pred, gold in pairs:
        want = plain.score(gold, pred)
        assert M.rouge([pred], [gold]) == pytest.approx(
            {"rouge_1": want["rouge1"].fmeasure, "rouge_2": want["rouge2"].fmeasure, "rouge_l": want["rougeL"].fmeasure})


def test_the_trackers_get_the_scored_summary(tmp_path, base_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, val = sentiment(tmp_path / "t.jsonl", 40), sentiment(tmp_path / "v.jsonl", 12, seed=3)
    test = sentiment(tmp_path / "te.jsonl", 12, seed=4)
    out = tmp_path / "run"
    assert run_cli("finetune", f"init_from={base_run}", "task=classification", f"data.train={train}",
                   f"data.val={val}", f"data.test={test}", f"out_dir={out}", "train.max_steps=2", *FT,
                   "track.tensorboard=true") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and "test_accuracy" in summary
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    # closed once summary.json was final: the test figures are there, not only the loop's
    assert {"summary/test_accuracy", "summary/accuracy"} <= set(tags)
    assert acc.Scalars("summary/test_accuracy")[-1].value == pytest.approx(summary["test_accuracy"])


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_kill_while_the_final_model_is_written_leaves_no_model_with_files_missing(tmp_path, base_run,
                                                                                    monkeypatch, method):
    import pretune.finetune as F
    from pretune.model.io import find_model_dir

    real = F.atomic_write_json

    def killed_at_task_json(path, obj):
        if str(path).endswith("task.json"):
            raise KeyboardInterrupt("killed")
        return real(path, obj)

    monkeypatch.setattr(F, "atomic_write_json", killed_at_task_json)
    train = sentiment(tmp_path / "t.jsonl", 40)
    out = tmp_path / "run"
    assert run_cli("finetune", f"init_from={base_run}", "task=classification", f"method={method}",
                   "lora.rank=2", f"data.train={train}", f"out_dir={out}", "train.max_steps=2", *FT) == 130
    # model/ (and a LoRA run's adapter/, written first) is whole or absent, never without task.json
    assert not (out / "model").exists() and not (out / "adapter").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock"] == []
    assert find_model_dir(out).parent.name == "checkpoints"  # what is found is the last checkpoint
    monkeypatch.undo()
    assert run_cli("finetune", f"resume={out}") == 0  # the resumed run writes them whole
    assert {"task.json", "head.safetensors", "model.safetensors"} <= {p.name for p in (out / "model").iterdir()}
    if method == "lora":
        assert {"task.json", "adapter.safetensors", "lora.json"} <= {p.name for p in (out / "adapter").iterdir()}


def test_cross_validation_with_a_stopped_fold_is_not_reported_completed(tmp_path, base_run, capsys):
    train = sentiment(tmp_path / "t.jsonl", 40)
    out = tmp_path / "cv"
    assert run_cli("finetune", f"init_from={base_run}", "task=classification", f"data.train={train}",
                   f"out_dir={out}", "finetune.cv=2", "train.max_steps=4", "train.stop_after=2", *FT) == 0
    fold = json.loads((out / "fold-0" / "summary.json").read_text())
    root = json.loads((out / "summary.json").read_text())
    assert fold["status"] == "stopped" and fold["steps"] == 2
    # the cross-validation stopped with its fold: no means over partly trained folds, the fold named
    assert root["status"] == "stopped" and root["stopped_fold"] == 0 and "mean" not in root
    assert not (out / "fold-1").exists()
    assert "in fold 0" in capsys.readouterr().out
    assert run_cli("finetune", f"resume={out}") == 0
    root = json.loads((out / "summary.json").read_text())
    assert root["status"] == "completed" and "accuracy" in root["mean"]


def _rounded(d: dict) -> bool:
    """Every float as loop._round writes it (6 places; 6 significant digits below 0.001)."""
    from pretune.train.loop import _round

    return all(_rounded(v) if isinstance(v, dict) else not isinstance(v, float) or _round(v) == v for v in d.values())


def test_finetune_opens_with_its_set_up_warns_of_unread_data_keys_and_names_the_scored_split(tmp_path, base_run,
                                                                                             capsys):
    train, val = sentiment(tmp_path / "t.jsonl", 40), sentiment(tmp_path / "v.jsonl", 10, seed=1)
    assert run_cli("finetune", f"init_from={base_run}", "task=classification", "method=lora", f"data.train={train}",
                   f"data.val={val}", f"out_dir={tmp_path / 'a'}", "train.max_steps=2", *FT, "data.tokenizer=char",
                   "data.vocab_size=999", "data.weights=[1.0]") == 0
    out = capsys.readouterr().out
    assert "data.tokenizer='char', data.vocab_size=999 ignored: the run keeps the tokenizer of init_from" in out
    assert "data.weights=[1.0] ignored" in out and "finetune.replay" in out
    assert "fine-tuning (classification, lora): 40 train / 10 val / 0 test examples, labels [negative, positive]" in out
    assert "parameters trainable, device cpu" in out and "scored_on=val" in out
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["scored_on"] == "val" and summary["accuracy"] == summary["val_accuracy"] and _rounded(summary)
    assert run_cli("finetune", f"init_from={base_run}", "task=classification", f"data.train={train}",
                   f"data.test={val}", f"out_dir={tmp_path / 'cv'}", "finetune.cv=2", "train.max_steps=2", *FT) == 0
    root = json.loads((tmp_path / "cv" / "summary.json").read_text())
    assert root["scored_on"] == "test" and _rounded(root) and "scored_on=test" in capsys.readouterr().out
