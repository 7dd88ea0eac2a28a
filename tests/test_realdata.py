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
