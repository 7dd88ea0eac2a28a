"""Language-model evaluation: loss, perplexity and bits per byte on held-out text.

Bits per byte divide the summed loss (in bits) by the UTF-8 bytes of the target tokens, so models
with different tokenizers can be compared on the same text. Special tokens (EOS between documents)
carry no bytes and are left out of both sums.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def lm_metrics(model: torch.nn.Module, windows: Iterable[np.ndarray], token_bytes: list[int],
               device: torch.device, batch_size: int = 64, autocast_dtype=None) -> dict[str, float]:
    """Loss / perplexity over every target token; bits per byte over the byte-carrying ones."""
    was_training = model.training
    model.eval()
    nbytes_of = torch.tensor(token_bytes, dtype=torch.float64, device=device)
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    byte_nll = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = 0
    batch: list[np.ndarray] = []

    def run(rows: list[np.ndarray]):
        nonlocal total_nll, byte_nll, total_bytes, n_tokens
        arr = torch.from_numpy(np.stack(rows)).to(device, non_blocking=True)
        x, y = arr[:, :-1], arr[:, 1:]
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits = model(x)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                              reduction="none").double()
        b = nbytes_of[y.reshape(-1)]
        total_nll += nll.sum()
        byte_nll += (nll * (b > 0)).sum()
        total_bytes += b.sum()
        n_tokens += y.numel()

    for w in windows:
        batch.append(w)
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    model.train(was_training)
    if n_tokens == 0:
        return {"loss": float("nan"), "ppl": float("nan"), "bpb": float("nan"), "tokens": 0}
    loss = total_nll.item() / n_tokens
    nbytes = total_bytes.item()
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)),
            "bpb": byte_nll.item() / math.log(2) / nbytes if nbytes else float("nan"),
            "tokens": n_tokens}
