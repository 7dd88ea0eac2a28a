from pathlib import Path

import pytest

from pretune.config import Config, load_config
from pretune.config_io import parse_overrides
from pretune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_overrides_are_typed_and_nested():
    cfg = load_config(Config, None, ["train.max_steps=200", "optim.lr=1e-3", "data.train=[a.txt,b.txt]",
                                     "data.weights=[0.75,0.25]", "out_dir=runs/x", "train.progress=false"])
    assert cfg.train.max_steps == 200 and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.data.train == ["a.txt", "b.txt"] and cfg.data.weights == [0.75, 0.25]
    assert cfg.out_dir == "runs/x" and cfg.train.progress is False
    assert load_config(Config, None, ["data.train=one.txt"]).data.train == ["one.txt"]


def test_every_problem_is_reported_with_key_and_hint():
    with pytest.raises(ConfigError) as e:
        load_config(Config, None, ["train.max_step=3", "optim.lr=abc", "data.trian=x", "bogus=1", "max_steps=9",
                                   "train.rank=4"])
    msg = str(e.value)
    assert "unknown key train.max_step; did you mean train.max_steps?" in msg
    assert "unknown key data.trian; did you mean data.train?" in msg
    assert "optim.lr: expected a number, got 'abc'" in msg
    assert "unknown key bogus; known keys here: " in msg
    # a key given in the wrong section (or with none) points to where it lives
    assert "unknown key max_steps; did you mean train.max_steps?" in msg
    assert "unknown key train.rank; did you mean lora.rank?" in msg
    assert len(e.value.problems) == 6


def test_semantic_checks_name_the_fix():
    with pytest.raises(ConfigError) as e:
        load_config(Config, None, ["train.batch_size=10", "train.micro_batch_size=3", "optim.schedule=linear",
                                   "data.train=[a,b]", "data.weights=[1]"])
    msg = str(e.value)
    assert "train.micro_batch_size" in msg and "optim.schedule='linear'" in msg and "data.weights" in msg


def test_not_key_value():
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        parse_overrides(["max_steps"])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    if path.name.startswith("study"):  # a study file: every key and arm checked, nothing run
        from conftest import SHARED_DATA
        from pretune.errors import ConfigError
        from pretune.study.config import load_study

        try:
            study = load_study(str(path))
        except ConfigError as e:  # without ../shared/data, its files are all that may be wrong
            if SHARED_DATA.is_dir():
                raise
            assert all("shared/data" in p and "does not exist" in p for p in e.problems), e.problems
            return
        assert study.tasks and study.arms
        return
    cfg = load_config(Config, path, [])
    assert cfg.train.max_steps > 0


def test_an_early_stop_metric_the_run_does_not_report_is_refused_before_training():
    from pretune.config import Config, load_config
    from pretune.errors import ConfigError

    for args, bad in ((["task=classification", "train.early_stop_metric=val_acc"], "val_acc"),
                      (["task=classification", "finetune.classifier=verbalizer", "train.early_stop_metric=val_loss"],
                       "val_loss"),
                      (["train.early_stop_metric=val_accuracy"], "val_accuracy")):
        with pytest.raises(ConfigError, match=f"early_stop_metric='{bad}' is not an evaluation figure"):
            load_config(Config, None, args)
    for args in (["task=classification", "train.early_stop_metric=val_accuracy"],
                 ["task=preference", "train.early_stop_metric=val_reward_accuracy"],
                 ["train.early_stop_metric=val_bpb"]):
        load_config(Config, None, args)


def test_shard_tokens_and_a_too_small_bpe_vocabulary_are_refused_before_any_work():
    from pretune.config import BPE_MIN_VOCAB
    from pretune.data.tokenizer import train_bpe

    for n in ("0", "-3"):  # 0 or less wrote empty shard files forever
        with pytest.raises(ConfigError, match=f"data.shard_tokens={n} must be > 0"):
            load_config(Config, None, [f"data.shard_tokens={n}"])
    for n in (-5, 0, 10, BPE_MIN_VOCAB - 1):  # -5 crashed in the trainer; the rest gave 260 tokens silently
        with pytest.raises(ConfigError, match=f"data.vocab_size={n} .* set data.vocab_size >= {BPE_MIN_VOCAB}"):
            load_config(Config, None, [f"data.vocab_size={n}"])
    load_config(Config, None, [f"data.vocab_size={BPE_MIN_VOCAB}"])
    load_config(Config, None, ["data.tokenizer=char", "data.vocab_size=10"])  # not read by a char tokenizer
    # the true minimum: the trainer gives this many tokens however small a size it is asked for
    assert train_bpe(iter(["ab ab ab"] * 20), 10).vocab_size == BPE_MIN_VOCAB
    assert train_bpe(iter(["ab ab ab"] * 20), BPE_MIN_VOCAB + 1).vocab_size == BPE_MIN_VOCAB + 1


def test_patience_and_early_stopping_without_evaluations_are_refused_before_training():
    stop = ["train.early_stop_metric=val_loss"]
    for n in ("0", "-1"):  # -1 stopped after the first step and crashed; 0 turned early stopping off silently
        with pytest.raises(ConfigError, match=rf"train.patience={n} must be >= 1.*leave train.patience unset"):
            load_config(Config, None, [*stop, f"train.patience={n}"])
    load_config(Config, None, [*stop, "train.patience=1"])
    load_config(Config, None, stop)  # no patience: the best model is kept, the run never stops early
    # without evaluations there is nothing to watch: it was ignored silently
    with pytest.raises(ConfigError, match=r"train.early_stop_metric='val_loss' needs evaluations, but "
                                          r"train.eval_every=0 turns them off; set train.eval_every"):
        load_config(Config, None, [*stop, "train.eval_every=0", "train.patience=2"])
    with pytest.raises(ConfigError, match=r"early_stop_metric='val_loss' needs validation data.*data.val_fraction=0"):
        load_config(Config, None, [*stop, "data.val_fraction=0"])
    load_config(Config, None, [*stop, "data.val_fraction=0", "data.val=[v.txt]"])
    load_config(Config, None, ["train.eval_every=0"])  # no early stopping: evaluations may be off


def test_wsd_decay_fraction_must_be_a_share_of_the_run():
    for f in ("0.0", "-0.5", "1.5"):  # 0 and -0.5 dropped to the minimum at the last step; 1.5 never reached the peak
        with pytest.raises(ConfigError, match=rf"optim.decay_fraction={f} must be in \(0, 1\]"):
            load_config(Config, None, ["optim.schedule=wsd", f"optim.decay_fraction={f}"])
    for f in ("0.01", "0.2", "1"):
        load_config(Config, None, ["optim.schedule=wsd", f"optim.decay_fraction={f}"])


@pytest.mark.parametrize("args, message", [
    (["optim.lr=nan"], "optim.lr=nan must be a finite number > 0"),  # NaN fails both < 0 and == 0
    (["optim.lr=inf"], "optim.lr=inf must be a finite number > 0"),
    (["optim.lr=.nan"], "optim.lr=nan must be a finite number > 0"),  # YAML's spelling too
    (["lora.alpha=nan"], "lora.alpha=nan must be a finite number > 0"),
    (["train.grad_clip=nan"], "train.grad_clip=nan must be a finite number >= 0"),
    (["data.train=[a,b]", "data.weights=[1,nan]"], r"data.weights=\[1.0, nan\] must be finite"),
    (["optim.beta1=1.5"], r"optim.beta1=1.5 must be in \[0, 1\)"),
    (["optim.beta2=-0.1"], r"optim.beta2=-0.1 must be in \[0, 1\)"),
    (["optim.eps=-1"], "optim.eps=-1.0 must be > 0"),
    (["optim.weight_decay=-3"], "optim.weight_decay=-3.0 must be >= 0"),
    (["train.eval_batch_size=0"], "train.eval_batch_size=0 must be > 0"),
    (["train.eval_tokens=-5"], "train.eval_tokens=-5 must be > 0; set train.eval_every=0"),
    (["train.threads=0"], r"train.threads=0 must be > 0; leave train.threads unset \(null\)"),
    (["finetune.max_new_tokens=-1"], "finetune.max_new_tokens=-1 must be > 0"),
    (["finetune.replay_weight=nan"], "finetune.replay_weight=nan must be a finite number >= 0"),
    (["meter.device_power_w=-5"], "meter.device_power_w=-5.0 must be >= 0"),
    (["lora.rank=0"], "lora.rank=0 must be > 0"),
    (["freeze.last_k=-1"], "freeze.last_k=-1 must be >= 1"),
    (["model.n_layer=0"], r"model.n_layer=0 must be >= 1; leave it unset \(null\)"),
    (["model.n_head=0"], "model.n_head=0 must be >= 1"),  # was a ZeroDivisionError at build time
    (["model.d_model=0"], "model.d_model=0 must be >= 1"),
    (["model.head_dim=0"], "model.head_dim=0 must be >= 1"),
    (["model.d_model=66"], "model.d_model=66 is not divisible by model.n_head=4"),
    (["model.preset=tinyy"], "unknown model.preset 'tinyy'; choose one of tiny"),
    (["method=freeze", "freeze.last_k=99"], r"freeze.last_k=99 must be in 1..2 \(model.n_layer"),
])
def test_out_of_range_and_nan_values_are_refused_naming_the_key(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Config, None, args)


def test_range_checks_accept_the_edges_and_leave_an_unknown_architecture_to_build_time():
    load_config(Config, None, ["optim.beta1=0", "optim.beta2=0.999", "optim.weight_decay=0", "train.threads=1",
                               "method=freeze", "freeze.last_k=2", "finetune.eval_examples=0"])
    # the parent's n_layer is only known when it is loaded (finetune.set_trainable checks it there)
    load_config(Config, None, ["init_from=runs/base", "method=freeze", "freeze.last_k=12"])
    load_config(Config, None, ["init_from=runs/base", "model.preset=whatever"])  # ignored with a warning


def test_override_text_is_kept_for_string_fields():
    from pretune.eval.options import GenerateConfig

    for text in ("no", "12:30", "#the", "1e3", "on", " leading space", "a: b", "[x]"):
        assert load_config(GenerateConfig, None, [f"prompt={text}"]).prompt == text
    assert load_config(GenerateConfig, None, ["prompt="]).prompt == ""
    cfg = load_config(Config, None, ["data.labels=[no,yes]", "out_dir=2024-01-01", "lora.targets=[on, off]",
                                     "data.train=[a.txt, 'b,c.txt']", "track.mlflow_uri=0123"])
    assert cfg.data.labels == ["no", "yes"] and cfg.out_dir == "2024-01-01" and cfg.lora.targets == ["on", "off"]
    assert cfg.data.train == ["a.txt", "b,c.txt"] and cfg.track.mlflow_uri == "0123"
    # numbers and booleans are still parsed, strictly, by the field's type
    cfg = load_config(Config, None, ["train.max_steps=1e3", "optim.lr=3e-4", "train.progress=no",
                                     "data.train=[a,b]", "data.weights=[1, 0.5]"])
    assert cfg.train.max_steps == 1000 and cfg.optim.lr == pytest.approx(3e-4) and cfg.train.progress is False
    assert cfg.data.weights == [1.0, 0.5]
    with pytest.raises(ConfigError) as e:
        load_config(Config, None, ["train.progress=maybe", "train.max_steps=1.5", "optim.lr=fast"])
    assert {"train.progress: expected true or false, got 'maybe'", "train.max_steps: expected an integer, got '1.5'",
            "optim.lr: expected a number, got 'fast'"} == set(e.value.problems)
    with pytest.raises(ConfigError, match=r"data.train=\[a,b is not a list; write data.train=\[a,b\]"):
        load_config(Config, None, ["data.train=[a,b"])


def test_a_yaml_file_that_turns_text_into_a_bool_or_number_is_refused(tmp_path):
    path = tmp_path / "yn.yaml"
    path.write_text("data:\n  labels: [no, yes]\nout_dir: 12:30\n")
    with pytest.raises(ConfigError) as e:
        load_config(Config, path, [])
    msg = str(e.value)
    assert "data.labels[0]: expected text, but YAML read the unquoted value as true/false (False); quote" in msg
    assert "out_dir: expected text, but YAML read the unquoted value as a number (750)" in msg
    path.write_text("data:\n  labels: ['no', 'yes']\nout_dir: '12:30'\ntrain:\n  compile: false\n")
    cfg = load_config(Config, path, [])
    assert cfg.data.labels == ["no", "yes"] and cfg.out_dir == "12:30"
    assert cfg.train.compile == "false"  # the one text key whose values are true/false: a YAML bool is meant


def test_null_or_none_unsets_an_optional_key_and_is_refused_elsewhere():
    from pretune.eval.options import EvaluateConfig

    for word in ("null", "None", "~"):
        cfg = load_config(Config, None, [f"data.cache_dir={word}", f"init_from={word}", f"train.seq_len={word}",
                                         f"train.early_stop_metric={word}", f"data.labels={word}"])
        assert (cfg.data.cache_dir, cfg.init_from, cfg.train.seq_len, cfg.train.early_stop_metric,
                cfg.data.labels) == (None,) * 5
        assert load_config(EvaluateConfig, None, [f"seq_len={word}"]).seq_len is None
    with pytest.raises(ConfigError) as e:
        load_config(Config, None, ["out_dir=None", "train.max_steps=null"])
    assert e.value.problems == [f"{k}: null is not allowed: this key has no unset value; give one, or leave the "
                                "key out for its default" for k in ("out_dir", "train.max_steps")]
    with pytest.raises(ConfigError, match=r"data.train=None: null is not allowed: this key is a list; give data.train=\[\]"):
        load_config(Config, None, ["data.train=None"])
    # a wrong value for an optional key says how to unset it
    with pytest.raises(ConfigError, match=r"train.seq_len: expected an integer, got 'none' \(or null to leave it unset\)"):
        load_config(Config, None, ["train.seq_len=none"])


def test_a_mapping_key_takes_a_mapping_or_says_how_to_set_it():
    cfg = load_config(Config, None, ["model.rope_scaling={factor: 8, original_max_position_embeddings: 256}"])
    assert cfg.model.rope_scaling == {"factor": 8, "original_max_position_embeddings": 256}
    assert load_config(Config, None, ["model.rope_scaling.factor=2"]).model.rope_scaling == {"factor": 2}
    assert load_config(Config, None, ["model.rope_scaling=null"]).model.rope_scaling is None
    with pytest.raises(ConfigError, match=r"model.rope_scaling: expected a mapping, got 2; give one as "
                                          r"model.rope_scaling=\{name: value, ...\}.*model.rope_scaling.NAME=VALUE"):
        load_config(Config, None, ["model.rope_scaling=2"])


def test_a_section_the_config_does_not_have_is_answered_key_by_key():
    from pretune.config_io import from_dict
    from pretune.eval.options import GenerateConfig

    with pytest.raises(ConfigError) as e:
        load_config(Config, None, ["trian.max_steps=3", "foo.bar=1"])
    assert e.value.problems == ["unknown key trian.max_steps; did you mean train.max_steps=3?",
                                ("unknown key foo.bar; known keys: data.*, dist.*, finetune.*, freeze.*, init_from, "
                                 "lora.*, meter.*, method, model.*, optim.*, out_dir, overwrite, resume, seed, task, "
                                 "track.*, train.*")]
    with pytest.raises(ConfigError) as e:  # a YAML file's section too, values shown as the file gives them
        from_dict(GenerateConfig, {"train": {"device": "cpu", "progress": False, "max_steps": 3}},
                  what="pretune generate")
    assert e.value.problems[:2] == [
        "pretune generate has no key train.device (it has no train section); did you mean device=cpu?",
        ("pretune generate has no key train.progress (it has no train section); its keys: device, max_new_tokens, "
         "num_samples, prompt, seed, temperature, top_k, top_p (`pretune generate --help` says what each does)")]
