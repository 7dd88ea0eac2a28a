"""Shared fixtures: a private shard cache, small corpora, and a helper that runs the CLI in-process."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PRETUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def make_corpus(path: Path, lines: int = 2000, seed: int = 0) -> Path:
    """Repetitive English-like text: learnable by a tiny model in a few dozen steps."""
    rng = random.Random(seed)
    words = ("the quick brown fox jumps over a lazy dog while the cat sits on the mat and a bird "
             "sings in the old tree by the river").split()
    with open(path, "w") as fh:
        for _ in range(lines):
            fh.write(" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) + ".\n")
    return path


def sentiment(path: Path, n: int = 240, seed: int = 0) -> Path:
    """A toy sentiment task in JSONL: "the cat was great" -> positive, balanced labels."""
    rng = random.Random(seed)
    good, bad = ["great", "lovely", "fine", "superb"], ["awful", "poor", "broken", "sad"]
    with open(path, "w") as fh:
        for i in range(n):
            label = "positive" if i % 2 == 0 else "negative"
            word = rng.choice(good if label == "positive" else bad)
            fh.write(json.dumps({"text": f"the {rng.choice(['cat', 'dog', 'mat'])} was {word}", "label": label}) + "\n")
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    return make_corpus(tmp_path / "corpus.txt")


TINY = ["model.preset=tiny", "train.seq_len=32", "train.batch_size=8", "train.eval_every=10",
        "train.log_every=1", "train.save_every=10", "train.progress=false", "train.threads=1",
        "optim.lr=3e-3", "optim.warmup_steps=5", "data.tokenizer=char", "train.eval_tokens=2000"]


def run_cli(*args: str) -> int:
    from pretune.cli import main

    return main([str(a) for a in args])


# fine-tuning settings over TINY: the tokenizer and the length come from the base model and the task
FT = [a for a in TINY if not a.startswith(("data.tokenizer", "train.seq_len"))] + ["finetune.max_len=64"]


def pretrain_base(root: Path, lines: int, steps: int) -> Path:
    """A small pre-trained model (char tokenizer) for fine-tuning tests to start from."""
    corpus = make_corpus(root / "corpus.txt", lines=lines)
    out = root / "base"
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={out}", f"train.max_steps={steps}", *TINY,
                   "train.save_every=0") == 0
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def realdata(name: str) -> Path:
    p = SHARED_DATA / name
    if not p.exists():
        pytest.skip(f"real data {p} is absent (../shared/data is only on project machines)")
    return p


@pytest.fixture(scope="session")
def cpu_threads():
    return int(os.environ.get("PRETUNE_TEST_THREADS", "1"))
