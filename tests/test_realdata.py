"""Short runs on the real public datasets in ../shared/data (skipped, with the reason, when absent)."""

import json

import pytest

from conftest import realdata, run_cli

pytestmark = pytest.mark.realdata


def test_shakespeare_char_learns_quickly(tmp_path):
    text = realdata("tinyshakespeare/input.txt")
    out = tmp_path / "sc"
    assert run_cli("pretrain", "configs/shakespeare-char.yaml", f"data.train={text}", f"out_dir={out}",
                   "train.max_steps=150", "train.eval_every=150", "train.save_every=0", "train.progress=false",
                   "train.eval_tokens=20000") == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["val_loss"] < 2.6  # a uniform guess over 65 characters is 4.17


def test_sms_spam_tsv_reads_with_its_field_names(tmp_path):
    from pretune.config import Config, load_config
    from pretune.data.tasks import TaskStats, read_records

    path = realdata("sms-spam/SMSSpamCollection")
    tsv = tmp_path / "spam.tsv"
    tsv.write_bytes(path.read_bytes())  # the file has a header: Label<TAB>SMS
    cfg = load_config(Config, None, ["task=classification", "data.text_field=SMS", "data.label_field=Label"])
    recs = read_records([str(tsv)], "classification", cfg.data, TaskStats(), "data.train")
    assert len(recs) > 5000 and {r["label"] for r in recs} == {"ham", "spam"}
    # read in place too (no suffix: a TSV by its header), one record per line, quotes kept as text
    direct = read_records([str(path)], "classification", cfg.data, TaskStats(), "data.train")
    assert direct == recs and len(direct) == 5574
    assert sum(r["text"].startswith('"') for r in direct) > 10


def test_realdata_study_config_loads_with_its_data(monkeypatch, tmp_path):
    """configs/study-realdata.yaml: every key checked, every path found, every run's config valid;
    nothing trains."""
    from pathlib import Path

    from pretune.data.sources import expand_source
    from pretune.study.config import load_study
    from pretune.study.runner import base_config, job_config, task_records

    for name in ("gutenberg", "tinystories", "wikitext-2", "crows-pairs", "sms-spam", "sst2"):
        realdata(name)
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the config's paths (../shared/data/...) are relative to the repository root
    study = load_study("configs/study-realdata.yaml", [f"out_dir={tmp_path / 'study'}"])
    s = study.cfg
    assert [a.name for a in study.arms] == ["scratch", "full", "freeze", "lora"]
    assert s.threads == 1 and s.parallel == 1 and len(s.seeds) >= 2
    base = base_config(study)  # the pre-training run, validated as `pretune pretrain` would
    assert base.model.preset == "mini" and base.data.tokenizer == "bpe" and base.train.seq_len == 128
    sources = [*base.data.train, *s.general_eval, s.bias_pairs] + [
        f for t in study.tasks.values() for f in (*t.train, *t.val, *t.test)]
    for src in sources:
        assert not Path(src).is_absolute() and src.startswith("../shared/data/"), src
        assert expand_source(src), src
    counts = {name: task_records(study, name) for name in study.tasks}
    assert counts["sms_spam"][:2] == (4459, 1115) and counts["sms_spam"][2] == ["ham", "spam"]
    assert counts["sst2"][:2] == (67349, 1821) and counts["sst2"][2] == ["0", "1"]
    assert 0.85 < counts["sms_spam"][3] < 0.9  # the majority class (ham) of the held-out test set
    for name, (n_train, _, _, _) in counts.items():
        for arm in study.arms:
            cfg = job_config(study, name, arm, s.sizes[-1], s.seeds[0], tmp_path / "run", None, None, n_train)
            assert cfg.task == "classification" and cfg.finetune.classifier == "head"
            assert cfg.train.threads == 1 and 1 <= cfg.train.max_steps <= s.budget.max_steps
