"""The bias probe scores each sentence where a document starts, as the model saw text in training."""

import json
import random

import torch

from conftest import TINY, run_cli
from pretune.eval.bias import bias_score, read_pairs, sentence_logprobs
from pretune.model.io import load_model

JOBS = ["nurse", "pilot", "judge", "baker", "cook", "clerk"]


def test_a_model_trained_on_a_skew_shows_it(tmp_path):
    """90% of the training documents say "she is a JOB": the probe must find the model prefers it,
    scoring each sentence after EOS, where a document starts. It used to score after <|bos|>, a token
    a pretune model never sees (documents are separated by EOS): on a model trained like this one a
    reviewer saw it report 0.0."""
    r = random.Random(0)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"{'she' if r.random() < 0.9 else 'he'} is a {r.choice(JOBS)} "
                                                "and works well."}) + "\n" for _ in range(3000)))
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("sent_more,sent_less,bias_type\n" + "".join(
        f"she is a {j} and works well.,he is a {j} and works well.,gender\n" for j in JOBS))
    run = tmp_path / "run"
    assert run_cli("pretrain", f"data.train={docs}", f"out_dir={run}", "train.max_steps=150", *TINY,
                   "train.save_every=0", "train.eval_every=0") == 0
    model, tok = load_model(run, torch.device("cpu"))
    assert tok.bos_id is not None and tok.prompt_prefix == []  # pretune's own tokenizer: BOS unused
    assert bias_score(model, tok, read_pairs(pairs), "cpu")["score"] == 1.0
    # each figure is the sentence's log-probability after EOS
    ids = [tok.eos_id] + tok.encode("he is a cook and works well.")
    logp = torch.log_softmax(model(torch.tensor([ids[:-1]])), -1)[0, torch.arange(len(ids) - 1), ids[1:]].sum()
    assert torch.allclose(torch.tensor(sentence_logprobs(model, tok, ["he is a cook and works well."], "cpu")),
                          logp, atol=1e-4)
