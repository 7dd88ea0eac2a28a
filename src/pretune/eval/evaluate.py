"""Language-model evaluation: loss, perplexity and bits per byte on held-out text.

Bits per byte divide the summed loss (in bits) by the UTF-8 bytes of the target tokens, so models
with different tokenizers can be compared on the same text (not counting the "▁" that a
SentencePiece-style tokenizer puts before each document, which is not in the text). Special tokens (EOS between documents)
carry no bytes and are left out of both sums; the unknown token counts one byte (Tokenizer.token_bytes),
so its loss is kept. The text scored is the held-out text as decoded and tokenised for the shards
(data/shards.py): special-token text in it is plain text, as in training.

`pretune evaluate` scores every token of the text once (lm_windows): whole windows of seq_len targets,
then the tokens a last whole window leaves over, in one window that ends where the text ends and
reads as much of the text before them as fits, as context (the strided evaluation of the Hugging Face
perplexity recipe, with the stride the rest). Pre-training's validation keeps its whole windows
(TokenStore.windows, a fixed sample of eval_tokens): its figures stay comparable from step to step
and with earlier runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pretune.train.dist import all_reduce_sum, rank_share


Window = np.ndarray | tuple[np.ndarray, int]  # tokens, or (tokens, how many first targets are context only)


def lm_windows(stores, seq_len: int, max_tokens: int | None = None) -> Iterator[Window]:
    """Windows of the stores' tokens (data.shards.TokenStore) in which every target token is scored
    once, in order, at most max_tokens of them: whole windows of seq_len+1 tokens, and where a span's
    tokens leave fewer than seq_len targets over (or the budget does), one window ending with them that
    starts up to seq_len tokens earlier, as (tokens, n_context): its first n_context targets were
    scored already and are context only. Each span's first token is no target (nothing precedes it
    in the span): a source's targets are its tokens less one per span (one, unless it fills several
    shards)."""
    budget = max_tokens if max_tokens is not None else float("inf")
    for store in stores:
        for s in store.spans:
            pos = s.start  # the targets after pos are still to be scored
            while budget > 0 and pos + 1 < s.end:
                n = int(min(seq_len, s.end - pos - 1, budget))
                lo = max(s.start, pos + n - seq_len)
                w = np.asarray(s.array[lo: pos + n + 1], dtype=np.int64)
                yield w if lo == pos else (w, pos - lo)
                pos += n
                budget -= n


@torch.no_grad()
def lm_metrics(model: torch.nn.Module, windows: Iterable[Window], token_bytes: list[int],
               device: torch.device, batch_size: int = 64, autocast_dtype=None, rt=None) -> dict[str, float]:
    """Loss / perplexity over every target token; bits per byte over the byte-carrying ones.

    Bits per byte are measured on the decoded UTF-8 text the tokens stand for: a byte that was not
    UTF-8 in the file is U+FFFD (3 bytes) here, as data.encoding_errors=replace read it.

    A window is an array of tokens, or (tokens, n_context) as lm_windows gives the last one of a text:
    its first n_context targets are context and are not counted. Consecutive windows of one length
    share a batch (pre-training's windows all have one: its batches are those of batch_size windows).

    With a distributed runtime `rt`, each rank scores its share of the batches and the per-batch
    sums are combined in batch order, so the figures do not depend on the number of processes."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    was_training = model.training
    model.eval()
    nbytes_of = torch.tensor(token_bytes, dtype=torch.float64, device=device)
    # a tokenizer that prepends "▁" to every text (Llama 2, Mistral): a document's first token carries
    # a byte that is not in the text (data.tokenizer.TokenBytes)
    phantom = getattr(token_bytes, "phantom", None)
    phantom_of = torch.tensor(phantom, dtype=torch.float64, device=device) if phantom else None
    doc_start = torch.tensor(getattr(token_bytes, "after", ()), dtype=torch.long, device=device)
    batches: list[list[tuple[np.ndarray, int]]] = []
    for w in windows:
        w = w if isinstance(w, tuple) else (w, 0)
        if batches and len(batches[-1]) < batch_size and len(batches[-1][0][0]) == len(w[0]):
            batches[-1].append(w)
        else:
            batches.append([w])
    # per batch: summed NLL, NLL of byte-carrying targets, their bytes, target count
    sums = torch.zeros(len(batches), 4, dtype=torch.float64, device=device)
    for c in rank_share(len(batches), rt):
        batch = batches[c if c is not None else 0]
        arr = torch.from_numpy(np.stack([w for w, _ in batch])).to(device, non_blocking=True)
        x, y = arr[:, :-1], arr[:, 1:]
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits = model(x)
        if c is None:
            continue  # a stand-in forward so every rank joins FSDP's gathers
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                              reduction="none").double()
        b = nbytes_of[y.reshape(-1)]
        if phantom_of is not None:  # a target right after EOS (or BOS) opens a document
            b = b - phantom_of[y.reshape(-1)] * torch.isin(x.reshape(-1), doc_start)
        n = y.numel()
        if any(k for _, k in batch):  # leave out the targets that are context only
            context = torch.tensor([k for _, k in batch], device=device)
            keep = (torch.arange(y.shape[1], device=device)[None, :] >= context[:, None]).reshape(-1)
            nll, b, n = torch.where(keep, nll, 0.0), torch.where(keep, b, 0.0), int(keep.sum())
        sums[c, 0], sums[c, 1], sums[c, 2], sums[c, 3] = nll.sum(), (nll * (b > 0)).sum(), b.sum(), n
    model.train(was_training)
    if rt is not None:
        all_reduce_sum(sums, rt)  # each row is filled on one rank only: the sum is exact
    total_nll, byte_nll, nbytes, n_tokens = sums.sum(0).tolist()
    if n_tokens == 0:
        return {"loss": float("nan"), "ppl": float("nan"), "bpb": float("nan"), "tokens": 0, "bytes": 0}
    loss = total_nll / n_tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)),
            "bpb": byte_nll / math.log(2) / nbytes if nbytes else float("nan"),
            "tokens": int(n_tokens), "bytes": int(nbytes)}


def combine_lm_metrics(parts: list[dict]) -> dict[str, float]:
    """The figures of lm_metrics over the union of the parts' windows: loss per target token and
    bits per byte, each weighted by what it is a mean over."""
    if len(parts) == 1:
        return parts[0]
    tokens, nbytes = sum(p["tokens"] for p in parts), sum(p["bytes"] for p in parts)
    if tokens == 0:
        return {"loss": float("nan"), "ppl": float("nan"), "bpb": float("nan"), "tokens": 0, "bytes": 0}
    loss = sum(p["loss"] * p["tokens"] for p in parts if p["tokens"]) / tokens
    bpb = sum(p["bpb"] * p["bytes"] for p in parts if p["bytes"]) / nbytes if nbytes else float("nan")
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": bpb, "tokens": tokens, "bytes": nbytes}
