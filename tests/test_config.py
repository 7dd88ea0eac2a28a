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
