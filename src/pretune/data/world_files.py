"""The generated world on disk: corpora, task files with train/val/test splits, world.json.

:func:`write_world` writes what :func:`pretune.data.world.generate_world` built, splitting each task
with :func:`split_records` (deterministic, stratified by label). Bytes only, so the same seed
always gives byte-identical files.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from pretune.data.world import BIAS_FIELDS, TASKS, Record, World


def split_records(records: Sequence[Record], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                  seed: int = 0, label_key: str | None = "label") -> tuple[list[Record], list[Record], list[Record]]:
    """Deterministically split ``records`` into (train, val, test).

    When every record has ``label_key``, the split is stratified: each label is
    split separately, and a label with at least 3 records gets at least one
    record in every split whose fraction is positive.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    rng = random.Random(f"pretune-split:{seed}")
    stratify = label_key is not None and len(records) > 0 and all(label_key in r for r in records)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(str(r[label_key]) if stratify else "", []).append(i)
    splits: tuple[list[Record], list[Record], list[Record]] = ([], [], [])
    for key in sorted(groups):
        idx = groups[key]
        rng.shuffle(idx)
        n = len(idx)
        n_val, n_test = round(n * fractions[1]), round(n * fractions[2])
        if stratify and n >= 3:
            n_val, n_test = max(n_val, int(fractions[1] > 0)), max(n_test, int(fractions[2] > 0))
            while n_val + n_test > n - int(fractions[0] > 0):
                n_val, n_test = (n_val - 1, n_test) if n_val >= n_test else (n_val, n_test - 1)
        n_test = min(n_test, n - n_val)
        for part, chunk in zip(splits, (idx[n_val + n_test:], idx[:n_val], idx[n_val:n_val + n_test])):
            part.extend(records[i] for i in chunk)
    for part in splits:
        rng.shuffle(part)
    return splits


def _jsonl(records: Sequence[Record]) -> str:
    return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records)


def write_world(world: World, out_dir: str | os.PathLike) -> dict[str, str]:
    """Write all corpora, datasets, splits and ``world.json`` into ``out_dir``.

    Returns a dict mapping each file name (e.g. ``"general.txt"``,
    ``"reviews_train.jsonl"``) to its path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = {
        "general.txt": "\n\n".join(world.general_docs) + "\n",
        "general_val.txt": "\n\n".join(world.general_val_docs) + "\n",
        "domain.txt": "\n\n".join(world.domain_docs) + "\n",
    }
    split_keys = {"facts_qa": "label", "reviews": "label", "support": "intent", "summaries": None}
    for task in TASKS:
        records = getattr(world, task)
        texts[f"{task}.jsonl"] = _jsonl(records)
        # facts_qa keeps a large test set: every test question is about an entity no training
        # question mentions, so its score measures what pre-training stored, and needs examples
        fractions = (0.3, 0.1, 0.6) if task == "facts_qa" else (0.8, 0.1, 0.1)
        parts = split_records(records, fractions, seed=world.config.seed, label_key=split_keys[task])
        for name, part in zip(("train", "val", "test"), parts):
            texts[f"{task}_{name}.jsonl"] = _jsonl(part)
    entities = {"config": asdict(world.config), "people": world.people, "companies": world.companies,
                "places": world.places, "skew": world.skew}
    texts["world.json"] = json.dumps(entities, indent=2, ensure_ascii=True) + "\n"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=BIAS_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(world.bias_pairs)
    texts["bias_pairs.csv"] = buf.getvalue()
    for name, text in texts.items():
        (out / name).write_bytes(text.encode("ascii"))  # bytes: no platform newline translation
    return {name: str(out / name) for name in texts}
