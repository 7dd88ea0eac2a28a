"""`pretune evaluate` and `pretune generate`: their option checks, nucleus sampling at exact ties, and
the checkpoint of a fine-tuning run that has not finished (LoRA adapters, a classification head)."""

import json
import shutil

import pytest
import torch
from conftest import FT, make_corpus, pretrain_base, run_cli, sentiment

from pretune.errors import ConfigError



@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return pretrain_base(tmp_path_factory.mktemp("base"), lines=600, steps=10)


# ----------------------------------------------------------------------------- evaluate's options


@pytest.mark.parametrize("setting, key", [
    ("seq_len=-4", "seq_len=-4"), ("seq_len=0", "seq_len=0"), ("batch_size=0", "batch_size=0"),
    ("max_tokens=0", "max_tokens=0"), ("max_new_tokens=0", "max_new_tokens=0"),
    ("eval_examples=-1", "eval_examples=-1"), ("dpo_beta=0", "dpo_beta=0")])
def test_evaluate_refuses_impossible_sizes_naming_the_key(setting, key):
    from pretune.config import load_config
    from pretune.eval.options import EvaluateConfig

    with pytest.raises(ConfigError) as e:
        load_config(EvaluateConfig, None, ["data.val=x.txt", setting])
    assert key in str(e.value) and "must" in str(e.value)


def test_evaluate_seq_len_zero_says_to_leave_it_unset_and_a_window_must_fit_max_tokens():
    from pretune.config import load_config
    from pretune.eval.options import EvaluateConfig

    with pytest.raises(ConfigError, match="leave it unset"):
        load_config(EvaluateConfig, None, ["seq_len=0"])
    with pytest.raises(ConfigError, match=r"max_tokens=10 is less than one window of seq_len=32"):
        load_config(EvaluateConfig, None, ["seq_len=32", "max_tokens=10"])
    ok = load_config(EvaluateConfig, None, ["seq_len=32", "max_tokens=32", "batch_size=1"])
    assert (ok.seq_len, ok.max_tokens, ok.batch_size) == (32, 32, 1)
    assert load_config(EvaluateConfig, None, []).seq_len is None  # unset: the model's context


@pytest.mark.parametrize("setting", ["batch_size=0", "max_tokens=0", "seq_len=-4"])
def test_evaluate_cli_refuses_bad_sizes_instead_of_crashing_or_printing_nan(tmp_path, base_run, setting, capsys):
    text = make_corpus(tmp_path / "val.txt", lines=100, seed=3)
    assert run_cli("evaluate", base_run, f"data.val={text}", "device=cpu", setting) == 2
    err = capsys.readouterr().err
    assert setting in err and "nan" not in err


def test_evaluate_cli_scores_every_token_of_the_text_or_max_tokens_of_them(tmp_path, base_run, capsys):
    text = tmp_path / "val.txt"
    text.write_text("the cat sat on the mat. " * 20)  # 480 characters: not a whole number of windows
    out = tmp_path / "e.json"
    for extra, expected in (([], 480), (["max_tokens=5"], 5), (["seq_len=7"], 480)):  # char tokens + EOS - 1
        assert run_cli("evaluate", base_run, f"data.val={text}", "device=cpu", f"out={out}", *extra) == 0
        assert json.loads(out.read_text())["tokens"] == expected, extra


# ----------------------------------------------------------------------------- generate's options


@pytest.mark.parametrize("setting", ["max_new_tokens=-3", "max_new_tokens=0", "temperature=-2", "temperature=nan",
                                     "top_p=1.5", "top_p=-0.1", "top_k=-1", "num_samples=0"])
def test_generate_refuses_impossible_settings_naming_the_key(setting):
    from pretune.config import load_config
    from pretune.eval.options import GenerateConfig

    with pytest.raises(ConfigError) as e:
        load_config(GenerateConfig, None, [setting])
    assert setting.split("=")[0] + "=" in str(e.value) and "must" in str(e.value)


def test_generate_accepts_the_documented_edges():
    from pretune.config import load_config
    from pretune.eval.options import GenerateConfig

    # temperature 0 and top_p 0 are greedy (as the server's top_p=0), top_k 0 is no top-k cut
    g = load_config(GenerateConfig, None, ["temperature=0", "top_p=0", "top_k=0", "max_new_tokens=1",
                                           "num_samples=1"])
    assert (g.temperature, g.top_p, g.top_k) == (0, 0, 0)
    assert load_config(GenerateConfig, None, ["top_p=1"]).top_p == 1


def test_generate_cli_refuses_a_negative_token_count(base_run, capsys):
    assert run_cli("generate", base_run, "prompt=the", "device=cpu", "max_new_tokens=-3") == 2
    assert "max_new_tokens=-3" in capsys.readouterr().err


# ----------------------------------------------------------------------------- top-p at exact ties


def _nucleus(probs, p):
    from pretune.eval.generate import filter_logits

    return filter_logits(torch.log(torch.tensor([probs])), 1.0, None, p)[0]


def test_top_p_keeps_the_smallest_set_that_reaches_p_at_an_exact_tie():
    assert torch.equal(_nucleus([0.5, 0.25, 0.25], 0.5), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(_nucleus([0.25, 0.5, 0.25], 0.5), torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(_nucleus([0.5, 0.25, 0.125, 0.125], 0.75), torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]))
    # just above the tie the next token is needed; top_p 0 keeps the most likely token alone
    above = _nucleus([0.5, 0.25, 0.25], 0.51)
    assert above[0] == pytest.approx(2 / 3) and int((above > 0).sum()) == 2
    assert torch.equal(_nucleus([0.2, 0.5, 0.3], 0.0), torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(_nucleus([0.2, 0.5, 0.3], 1.0), torch.tensor([0.2, 0.5, 0.3]))


def test_top_p_agrees_with_transformers_and_the_server_uses_the_same_filter():
    from pretune.eval import generate as gen
    from pretune.serve import engine

    assert engine.filter_logits is gen.filter_logits  # the server samples with the same nucleus rule
    warper = pytest.importorskip("transformers.generation.logits_process").TopPLogitsWarper
    for probs, p in [([0.5, 0.3, 0.2], 0.5), ([0.6, 0.3, 0.1], 0.6), ([0.5, 0.25, 0.125, 0.125], 0.75),
                     ([0.1, 0.7, 0.2], 0.75), ([0.4, 0.35, 0.25], 0.9)]:
        logits = torch.log(torch.tensor([probs]))
        theirs = torch.softmax(warper(p)(None, logits.clone()), -1)[0]
        assert torch.allclose(_nucleus(probs, p), theirs, atol=1e-6), (probs, p)


# ----------------------------------------------------------------------------- unfinished runs


def _finished_and_stopped(tmp_path, base_run, name, *args):
    """A fine-tuning run that finished at step 4 (its checkpoint step-4 and its model/), and a copy of
    it without model/ or adapter/: the same run as if it had stopped at its last checkpoint."""
    out = tmp_path / name
    assert run_cli("finetune", f"init_from={base_run}", f"out_dir={out}", "train.max_steps=4", "train.save_every=4",
                   *FT, *args) == 0
    stopped = tmp_path / f"{name}_stopped"
    shutil.copytree(out, stopped, ignore=shutil.ignore_patterns("model", "adapter", "best"))
    assert (stopped / "checkpoints" / "step-000004" / "model.safetensors").is_file()
    return out, stopped


def _evaluate(tmp_path, model, *args) -> dict:
    out = tmp_path / "figures.json"
    assert run_cli("evaluate", model, "device=cpu", f"out={out}", *args) == 0
    return json.loads(out.read_text())


def test_a_stopped_lora_classifier_evaluates_as_its_finished_model(tmp_path, base_run):
    from pretune.model.io import load_model

    train, val = sentiment(tmp_path / "train.jsonl"), sentiment(tmp_path / "val.jsonl", 40, seed=1)
    done, stopped = _finished_and_stopped(tmp_path, base_run, "cls", "task=classification", "method=lora",
                                          "lora.rank=4", "lora.alpha=8", f"data.train={train}", f"data.val={val}",
                                          "data.labels=[negative,positive]")
    lm_done, lm_stopped = load_model(done)[0].state_dict(), load_model(stopped)[0].state_dict()
    assert lm_done.keys() == lm_stopped.keys()
    assert all(torch.allclose(lm_done[k], lm_stopped[k], atol=1e-6) for k in lm_done)
    a, b = _evaluate(tmp_path, done, f"data.val={val}"), _evaluate(tmp_path, stopped, f"data.val={val}")
    assert a["task"] == b["task"] == "classification"
    assert b["accuracy"] == a["accuracy"] and b["loss"] == pytest.approx(a["loss"], abs=1e-5)


def test_a_stopped_lora_instruction_run_generates_and_evaluates_as_its_finished_model(tmp_path, base_run, capsys):
    rows = [{"prompt": f"repeat {w}", "response": w} for w in ["cat", "dog", "mat", "fox"] * 6]
    f = tmp_path / "inst.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    done, stopped = _finished_and_stopped(tmp_path, base_run, "inst", "task=instruction", "method=lora",
                                          "lora.rank=4", "lora.alpha=16", f"data.train={f}", f"data.val={f}",
                                          "finetune.eval_examples=4", "finetune.max_new_tokens=4")
    outputs = []
    for model in (done, stopped):
        capsys.readouterr()
        assert run_cli("generate", model, "prompt=the", "max_new_tokens=12", "temperature=0", "device=cpu") == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    args = (f"data.val={f}", "eval_examples=4", "max_new_tokens=4")
    a, b = _evaluate(tmp_path, done, *args), _evaluate(tmp_path, stopped, *args)
    assert b["task"] == "instruction" and b["loss"] == pytest.approx(a["loss"], abs=1e-5)


def test_a_stopped_classifier_evaluates_with_the_label_order_its_lineage_keeps(tmp_path, base_run, capsys):
    train = sentiment(tmp_path / "train.jsonl")
    out = tmp_path / "cls_stop"
    assert run_cli("finetune", f"init_from={base_run}", f"out_dir={out}", "task=classification", "method=lora",
                   "lora.rank=4", f"data.train={train}", "train.max_steps=6", "train.save_every=2",
                   "train.stop_after=2", *FT) == 0
    assert not (out / "model").exists()
    assert run_cli("evaluate", out, f"data.val={train}", "device=cpu", f"out={tmp_path / 'e.json'}") == 0
    assert 0 <= json.loads((tmp_path / "e.json").read_text())["accuracy"] <= 1
    # a run whose lineage does not keep them (written before it did): refused, saying how to finish
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage.pop("labels") == ["negative", "positive"]
    (out / "lineage.json").write_text(json.dumps(lineage))
    capsys.readouterr()
    assert run_cli("evaluate", out, f"data.val={train}", "device=cpu") == 2
    err = capsys.readouterr().err
    assert "stopped at step 2" in err and f"resume={out}" in err and "task=lm" in err
    # its language model still loads (adapters folded in), for task=lm and for generate
    assert run_cli("generate", out, "prompt=the", "max_new_tokens=3", "device=cpu") == 0


def test_lora_adapters_without_the_runs_config_are_refused(tmp_path, base_run):
    from pretune.model.io import ModelDirError, load_model

    rows = [{"prompt": "say cat", "response": "cat"}] * 16
    f = tmp_path / "inst.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _, stopped = _finished_and_stopped(tmp_path, base_run, "nocfg", "task=instruction", "method=lora",
                                       "lora.rank=4", f"data.train={f}")
    (stopped / "config.yaml").unlink()
    with pytest.raises(ModelDirError, match=r"stopped at step 4 .*lora\.alpha.*resume="):
        load_model(stopped)
