"""Language-model evaluation: loss, perplexity and bits per byte on held-out text.

Bits per byte divide the summed loss (in bits) by the UTF-8 bytes of the target tokens, so models
with different tokenizers can be compared on the same text. Special tokens (EOS between documents)
carry no bytes and are left out of both sums; the unknown token counts one byte (Tokenizer.token_bytes),
so its loss is kept. The text scored is the held-out text as decoded and tokenised for the shards
(data/shards.py): special-token text in it is plain text, as in training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from pretune.train.dist import all_reduce_sum, rank_share


@torch.no_grad()
def lm_metrics(model: torch.nn.Module, windows: Iterable[np.ndarray], token_bytes: list[int],
               device: torch.device, batch_size: int = 64, autocast_dtype=None, rt=None) -> dict[str, float]:
    """Loss / perplexity over every target token; bits per byte over the byte-carrying ones.

    Bits per byte are measured on the decoded UTF-8 text the tokens stand for: a byte that was not
    UTF-8 in the file is U+FFFD (3 bytes) here, as data.encoding_errors=replace read it.

    With a distributed runtime `rt`, each rank scores its share of the batches and the per-batch
    sums are combined in batch order, so the figures do not depend on the number of processes."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    was_training = model.training
    model.eval()
    nbytes_of = torch.tensor(token_bytes, dtype=torch.float64, device=device)
    windows = list(windows)
    batches = [windows[i: i + batch_size] for i in range(0, len(windows), batch_size)]
    # per batch: summed NLL, NLL of byte-carrying targets, their bytes, target count
    sums = torch.zeros(len(batches), 4, dtype=torch.float64, device=device)
    for c in rank_share(len(batches), rt):
        arr = torch.from_numpy(np.stack(batches[c if c is not None else 0])).to(device, non_blocking=True)
        x, y = arr[:, :-1], arr[:, 1:]
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits = model(x)
        if c is None:
            continue  # a stand-in forward so every rank joins FSDP's gathers
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                              reduction="none").double()
        b = nbytes_of[y.reshape(-1)]
        sums[c, 0], sums[c, 1], sums[c, 2], sums[c, 3] = nll.sum(), (nll * (b > 0)).sum(), b.sum(), y.numel()
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
