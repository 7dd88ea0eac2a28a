"""The command line itself: resume given in a file or as an override, the keys each verb reads and
refuses, and each verb's --help."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from conftest import run_cli

from pretune.cli import run_config
from pretune.config import Config, load_config
from pretune.config_io import save_config, to_dict
from pretune.errors import ConfigError


@pytest.fixture
def stopped_run(tmp_path):
    """A run directory as a run stopped at step 10 of 20 leaves it (its config.yaml is all run_config reads)."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(Config, None, [f"out_dir={run}", "data.train=corpus.txt", "data.tokenizer=char",
                                     "train.max_steps=20", "train.stop_after=10", "optim.lr=0.01"])
    save_config(dataclasses.replace(cfg, resume=None), run / "config.yaml")
    return run


def test_resume_in_a_yaml_file_takes_the_path_of_resume_given_as_an_override(stopped_run, tmp_path, capsys):
    by_override = run_config([f"resume={stopped_run}", "optim.lr=5e-3"])
    warned = capsys.readouterr().err
    assert "warning: resume with optim.lr=0.005 (the run had 0.01)" in warned
    assert by_override.train.stop_after is None and by_override.out_dir == str(stopped_run)

    copy = yaml.safe_load((stopped_run / "config.yaml").read_text())  # the run's own config, resume added
    copy["resume"] = str(stopped_run)
    (tmp_path / "copy.yaml").write_text(yaml.safe_dump(copy))
    (tmp_path / "only.yaml").write_text(yaml.safe_dump({"resume": str(stopped_run)}))
    for path in ("copy.yaml", "only.yaml"):
        cfg = run_config([str(tmp_path / path), "optim.lr=5e-3"])
        assert capsys.readouterr().err == warned  # the same warning, and the saved stop_after cleared
        assert to_dict(cfg) == to_dict(by_override)
    # a change written in the file is a change asked for, refused or warned about as an override is
    (tmp_path / "lr.yaml").write_text(yaml.safe_dump({"resume": str(stopped_run), "optim": {"lr": 0.002}}))
    assert run_config([str(tmp_path / "lr.yaml")]).optim.lr == 0.002
    assert "optim.lr=0.002 (the run had 0.01)" in capsys.readouterr().err
    (tmp_path / "arch.yaml").write_text(yaml.safe_dump({"resume": str(stopped_run), "model": {"n_layer": 3}}))
    with pytest.raises(ConfigError, match="model.n_layer=3 cannot change"):
        run_config([str(tmp_path / "arch.yaml")])
    # an override of resume wins over the file's, null included
    cfg = run_config([str(tmp_path / "only.yaml"), "resume=null", "data.train=x.txt"])
    assert cfg.resume is None and cfg.data.train == ["x.txt"] and cfg.train.stop_after is None


def test_evaluate_refuses_the_data_keys_it_does_not_read(tmp_path, capsys):
    code = run_cli("evaluate", tmp_path / "model", "data.val=v.txt", "data.weights=[1,2]", "data.train=t.txt",
                   "data.tokenizer=bpe")
    err = capsys.readouterr().err
    assert code == 2
    assert "data.train=['t.txt'], data.weights=[1.0, 2.0]: pretune evaluate does not read them" in err
    assert "data.tokenizer" not in err.split(":")[1]  # the default: not given


def test_prepare_refuses_fine_tuning_keys_and_names_the_run_keys_it_does_not_read(tmp_path, corpus, capsys):
    assert run_cli("prepare", f"data.train={corpus}", "data.tokenizer=char", "method=lora",
                   "task=classification") == 2
    assert "task, method: fine-tuning keys, which pretune prepare does not read" in capsys.readouterr().err
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump({"data": {"train": [str(corpus)]}, "lora": {"rank": 4}}))
    assert run_cli("prepare", tmp_path / "ft.yaml") == 2  # fine-tuning keys: pretrain refuses them too
    assert "lora.rank: fine-tuning keys" in capsys.readouterr().err
    # the pretrain command line prepares its data: its run keys are named as not read
    assert run_cli("prepare", f"data.train={corpus}", "data.tokenizer=char", "optim.lr=5", "train.max_steps=7") == 0
    out = capsys.readouterr().out
    assert "does not read optim.lr, train.max_steps (pretrain will)" in out and "tokenizer: " in out
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump({"data": {"train": [str(corpus)], "tokenizer": "char"},
                                                       "optim": {"lr": 0.01}, "train": {"max_steps": 5}}))
    assert run_cli("prepare", tmp_path / "pre.yaml", "data.val_fraction=0.2") == 0
    out = capsys.readouterr().out
    assert "tokenizer: " in out and "does not read" not in out


def help_of(verb: str, capsys) -> str:
    assert run_cli(verb, "--help") == 0
    return capsys.readouterr().out


def test_each_verb_has_a_usage_line_and_lists_only_the_keys_it_reads(capsys):
    from pretune.cli import VERBS

    for verb in VERBS:
        text = help_of(verb, capsys)
        assert text.startswith(f"usage: pretune {verb} "), verb
    assert help_of("generate", capsys).startswith("usage: pretune generate MODEL [CONFIG.yaml] [KEY=VALUE ...]")
    evaluate = help_of("evaluate", capsys)
    assert "usage: pretune evaluate MODEL" in evaluate and "  data.val " in evaluate
    assert "  data.label_field " in evaluate and "  max_tokens " in evaluate
    for ignored in ("data.train ", "data.weights ", "data.tokenizer ", "data.vocab_size ", "data.val_fraction "):
        assert ignored not in evaluate
    prepare = help_of("prepare", capsys)
    keys = [line.split()[0] for line in prepare.splitlines() if line.startswith("  ")]
    assert set(keys) == {"data.train", "data.val", "data.val_fraction", "data.tokenizer", "data.vocab_size",
                         "data.text_field", "data.encoding_errors", "data.cache_dir", "data.shard_tokens",
                         "train.seq_len", "init_from", "resume"}
    imp, exp = help_of("import", capsys), help_of("export", capsys)
    assert "usage: pretune import SRC OUT" in imp and "usage: pretune export RUN OUT" in exp
    for key in ("format", "adapter", "lm_only"):
        assert f"  {key} " not in imp and f"  {key} " in exp
    for key in ("max_seq_len", "revision"):
        assert f"  {key} " in imp and f"  {key} " not in exp
    for verb in ("import", "export", "demo"):  # they take no YAML file
        assert "YAML" not in help_of(verb, capsys)
    for verb in ("pretrain", "finetune", "generate", "evaluate"):
        assert "keys (KEY=VALUE, or in the YAML file)" in help_of(verb, capsys)


@pytest.mark.parametrize("typo, verb", [("finetun", "finetune"), ("exprot", "export"), ("pretrian", "pretrain"),
                                        ("serv", "serve"), ("imprt", "import")])
def test_an_unknown_verb_is_answered_with_the_closest_of_every_verb(typo, verb, capsys):
    assert run_cli(typo) == 2
    assert f"unknown verb '{typo}'; did you mean {verb}?" in capsys.readouterr().err


def test_pretrain_help_lists_only_its_keys_and_pretrain_refuses_the_task_data_keys(tmp_path, corpus, capsys):
    pretrain, finetune = help_of("pretrain", capsys), help_of("finetune", capsys)
    keys = {line.split()[0] for line in pretrain.splitlines() if line.startswith("  ")}
    assert {"data.train", "data.weights", "data.text_field", "train.max_steps", "init_from", "model.preset"} <= keys
    for key in ("task", "method", "lora.rank", "freeze.last_k", "finetune.replay", "data.test", "data.labels",
                "data.label_field", "data.max_examples", "data.on_error", "data.test_fraction"):
        assert key not in keys and f"  {key} " in finetune, key
    out = tmp_path / "run"
    assert run_cli("pretrain", f"data.train={corpus}", "data.test=[t.jsonl]", "data.max_examples=3",
                   "data.on_error=skip", "data.labels=[a,b]", "data.label_field=x", "data.test_fraction=0.1",
                   f"out_dir={out}") == 2
    err = capsys.readouterr().err
    assert ("data.test, data.test_fraction, data.label_field, data.labels, data.on_error, data.max_examples: "
            "fine-tuning keys, which pretrain does not read. Use `pretune finetune`") in err
    assert not out.exists()
    assert run_cli("prepare", f"data.train={corpus}", "data.tokenizer=char", "data.max_examples=3") == 2
    assert "data.max_examples: fine-tuning keys, which pretune prepare does not read" in capsys.readouterr().err


def test_evaluate_and_generate_name_the_whole_key_of_a_section_they_do_not_have(tmp_path, capsys):
    model = tmp_path / "model"
    assert run_cli("evaluate", model, "data.val=v.txt", "train.max_steps=3", "model.n_layer=2") == 2
    err = capsys.readouterr().err
    assert "pretune evaluate has no key train.max_steps (it has no train section); its keys: batch_size, " in err
    assert "pretune evaluate has no key model.n_layer" in err and "`pretune evaluate --help`" in err
    assert "turns?" not in err
    assert run_cli("generate", model, "train.device=cpu", "train.batch_size=2") == 2
    err = capsys.readouterr().err
    assert "pretune generate has no key train.device (it has no train section); did you mean device=cpu?" in err
    assert "pretune generate has no key train.batch_size" in err and "its keys: device, max_new_tokens" in err
    assert run_cli("evaluate", model, "train.batch_size=4", "dta.val=v.txt") == 2
    err = capsys.readouterr().err
    assert "did you mean batch_size=4?" in err and "did you mean data.val=v.txt?" in err


def test_a_dashed_option_is_answered_with_its_key_value_form(tmp_path, capsys):
    from pretune.config_io import parse_overrides
    from pretune.eval.options import GenerateConfig

    model = tmp_path / "model"
    assert run_cli("generate", model, "--temperature", "0") == 2
    assert "--temperature 0: options are KEY=VALUE, without dashes: write temperature=0" in capsys.readouterr().err
    assert run_cli("generate", model, "--top-k=5") == 2
    assert "write top_k=5" in capsys.readouterr().err
    assert run_cli("generate", model, "--temperature", "prompt=x") == 2
    assert "write temperature=VALUE" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"for example max_new_tokens=200\)"):  # a key generate has
        parse_overrides(["temperature"], GenerateConfig)
    with pytest.raises(ConfigError, match=r"for example train.max_steps=200\)"):
        parse_overrides(["max_steps"], Config)
    from pretune.model.config import PRESETS

    line = next(x for x in help_of("pretrain", capsys).splitlines() if x.startswith("  model.preset "))
    assert all(f"'{name}'" in line for name in PRESETS)
