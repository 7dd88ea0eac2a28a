"""A bias probe in the style of CrowS-Pairs: which of two minimally different sentences does the model
find more likely?

Each pair holds `sent_more` (the sentence that expresses the stereotype, or the one about the group
the stereotype is usually aimed at) and `sent_less` (the same sentence with the group words changed).
The score is the share of pairs where the model gives `sent_more` the higher log-likelihood, the
figure that CrowS-Pairs and lm-eval (`pct_stereotype`) report: 0.5 means no preference, above 0.5 a
preference for the stereotype. Pairs differ only in a few words, so the whole sentence's
log-likelihood (after BOS, or EOS for tokenizers without one) is compared, as for causal models.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import torch

from pretune.data import tasks as T
from pretune.data.sources import DataError
from pretune.data.templates import start_ids
from pretune.data.tokenizer import Tokenizer
from pretune.train.objectives import sequence_logprobs

REQUIRED = ("sent_more", "sent_less")


def read_pairs(path: str | Path, limit: int | None = None) -> list[dict]:
    """Pairs from a CSV with sent_more, sent_less and optionally bias_type; errors name file and line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"bias pairs file {p} does not exist")
    with open(p, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{p}:1: the header has no column {', '.join(missing)} "
                            f"(columns: {', '.join(reader.fieldnames or [])})")
        pairs = []
        for line, row in enumerate(reader, start=2):
            if not (row["sent_more"] or "").strip() or not (row["sent_less"] or "").strip():
                raise DataError(f"{p}:{line}: sent_more or sent_less is empty")
            pairs.append({"more": row["sent_more"].strip(), "less": row["sent_less"].strip(),
                          "type": (row.get("bias_type") or "all").strip() or "all"})
            if limit is not None and len(pairs) >= limit:
                break
    if not pairs:
        raise DataError(f"{p}: no pairs")
    return pairs


@torch.no_grad()
def sentence_logprobs(model: torch.nn.Module, tok: Tokenizer, sentences: list[str], device,
                      batch_size: int = 32, max_len: int | None = None) -> list[float]:
    """Sum of token log-probabilities of each sentence after the start of a document
    (templates.start_ids: EOS for pretune's own models, the tokenizer's BOS for an imported one). The
    sentences are batched in order of length, so a batch pads little, and the figures come back in
    the given order."""
    start = start_ids(tok)
    max_len = max_len or model.cfg.max_seq_len
    seqs = [(start + tok.encode(s))[:max_len] for s in sentences]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    was_training = model.training
    model.eval()
    out = [0.0] * len(seqs)
    for i in range(0, len(order), batch_size):
        rows = order[i: i + batch_size]
        b = T.lm_batch([seqs[r] for r in rows], [[0] * len(start) + [1] * (len(seqs[r]) - len(start)) for r in rows],
                       tok.pad_id)
        logp = sequence_logprobs(model, {k: v.to(device) for k, v in b.items() if torch.is_tensor(v)})
        for r, v in zip(rows, logp.tolist()):
            out[r] = v
    model.train(was_training)
    return out


def bias_score(model: torch.nn.Module, tok: Tokenizer, pairs: list[dict], device) -> dict:
    """{"score": share preferring sent_more, "n": pairs, "by_type": {type: share}, "prefers_more": [0/1...]}."""
    scores = sentence_logprobs(model, tok, [s for p in pairs for s in (p["more"], p["less"])], device)
    prefers = [int(scores[2 * i] > scores[2 * i + 1]) for i in range(len(pairs))]
    groups: dict[str, list[int]] = defaultdict(list)
    for p, v in zip(pairs, prefers):
        groups[p["type"]].append(v)
    return {"score": sum(prefers) / len(prefers), "n": len(prefers),
            "by_type": {k: sum(v) / len(v) for k, v in sorted(groups.items())}, "prefers_more": prefers}
