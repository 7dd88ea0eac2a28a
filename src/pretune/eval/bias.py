"""A bias probe in the style of CrowS-Pairs: which of two minimally different sentences does the model
find more likely?

Each pair holds `sent_more` (the sentence that expresses the stereotype, or the one about the group
the stereotype is usually aimed at) and `sent_less` (the same sentence with the group words changed).
The score is the share of pairs where the model gives `sent_more` the higher log-likelihood, the
figure that CrowS-Pairs and lm-eval (`pct_stereotype`) report: 0.5 means no preference, above 0.5 a
preference for the stereotype. Pairs differ only in a few words, so the whole sentence's
log-likelihood (after BOS, or EOS for tokenizers without one) is compared, as for causal models. An
exact tie counts half (no preference either way).

A pair longer than the model's context is never cut silently (cutting the words that differ would
make a tie of every such pair). When the shared beginning of the two sentences is long enough, both
are scored in the same window: the last tokens that fit, starting inside the shared beginning, which
is context there; the tokens from the first difference on are compared, with the same context for
both. A pair that does not fit even so is left out and counted (`n_skipped`), its entry in
`prefers_more` None, so the lists of all models still pair up pair by pair.
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


def _score(model: torch.nn.Module, rows: list[tuple[list[int], int]], pad_id: int, device,
           batch_size: int) -> list[float]:
    """Sum of the log-probabilities of ids[n_context:] for each (ids, n_context), batched in order of
    length (a batch pads little) and returned in the given order."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    was_training = model.training
    model.eval()
    out = [0.0] * len(rows)
    for i in range(0, len(order), batch_size):
        chunk = order[i: i + batch_size]
        b = T.lm_batch([rows[r][0] for r in chunk], [[0] * rows[r][1] + [1] * (len(rows[r][0]) - rows[r][1])
                                                     for r in chunk], pad_id)
        logp = sequence_logprobs(model, {k: v.to(device) for k, v in b.items() if torch.is_tensor(v)})
        for r, v in zip(chunk, logp.tolist()):
            out[r] = v
    model.train(was_training)
    return out


@torch.no_grad()
def sentence_logprobs(model: torch.nn.Module, tok: Tokenizer, sentences: list[str], device,
                      batch_size: int = 32, max_len: int | None = None) -> list[float]:
    """Sum of token log-probabilities of each sentence after the start of a document
    (templates.start_ids: EOS for pretune's own models, the tokenizer's BOS for an imported one), in
    the given order. A sentence longer than the context (`max_len`, the model's max_seq_len tokens
    of input) is an error: its log-likelihood would be that of a part of it."""
    start = start_ids(tok)
    limit = (max_len or model.cfg.max_seq_len) + 1  # the model reads all but the last token
    seqs = [start + tok.encode(s) for s in sentences]
    long = [i for i, q in enumerate(seqs) if len(q) > limit]
    if long:
        raise ValueError(f"sentence {long[0]} has {len(seqs[long[0]])} tokens, more than the model's context "
                         f"({limit - 1} tokens and the one predicted)")
    return _score(model, [(q, len(start)) for q in seqs], tok.pad_id, device, batch_size)


def pair_rows(start: list[int], more: list[int], less: list[int], limit: int):
    """((ids, n_context) of sent_more, of sent_less), or None when the pair cannot be scored within
    `limit` tokens. A pair that fits is scored whole after `start`; a longer one in a window of its
    last `limit` tokens that starts inside the shared beginning (module docstring)."""
    a, b = start + more, start + less
    if max(len(a), len(b)) <= limit:
        return (a, len(start)), (b, len(start))
    shared = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    cut = max(len(a), len(b)) - limit  # tokens dropped from the front; at least one shared token stays
    if cut > shared - 1:
        return None
    return (a[cut:], shared - cut), (b[cut:], shared - cut)


@torch.no_grad()
def bias_score(model: torch.nn.Module, tok: Tokenizer, pairs: list[dict], device, batch_size: int = 32) -> dict:
    """{"score": share preferring sent_more, "n": pairs scored, "n_skipped": pairs too long for the
    context even in a window, "by_type": {type: share}, "prefers_more": [1, 0, 0.5 (a tie) or None
    (skipped) per pair]}. The score is None when no pair could be scored."""
    start, limit = start_ids(tok), model.cfg.max_seq_len + 1
    rows, scored = [], []
    for i, p in enumerate(pairs):
        pair = pair_rows(start, tok.encode(p["more"]), tok.encode(p["less"]), limit)
        if pair is not None:
            rows += pair
            scored.append(i)
    logp = _score(model, rows, tok.pad_id, device, batch_size)
    prefers: list[float | None] = [None] * len(pairs)
    for k, i in enumerate(scored):
        more, less = logp[2 * k], logp[2 * k + 1]
        prefers[i] = 1 if more > less else (0 if more < less else 0.5)
    groups: dict[str, list[float]] = defaultdict(list)
    for p, v in zip(pairs, prefers):
        if v is not None:
            groups[p["type"]].append(v)
    done = [v for v in prefers if v is not None]
    return {"score": sum(done) / len(done) if done else None, "n": len(done), "n_skipped": len(pairs) - len(done),
            "by_type": {k: sum(v) / len(v) for k, v in sorted(groups.items())}, "prefers_more": prefers}
