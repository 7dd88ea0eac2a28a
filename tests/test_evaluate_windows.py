"""`pretune evaluate`'s windows: every token of the text is scored once, the last partial window too."""

import math

import numpy as np
import torch
import torch.nn.functional as F

from pretune.data.shards import Span, TokenStore
from pretune.eval.evaluate import lm_metrics, lm_windows
from pretune.model.config import ModelConfig, resolve_model_config
from pretune.model.gpt import GPT


def _store(n: int, vocab: int = 50, shards: tuple[int, ...] | None = None) -> TokenStore:
    tokens = np.random.default_rng(0).integers(0, vocab, n).astype(np.uint16)
    cuts = [0, *np.cumsum(shards or (n,))]
    return TokenStore("t", [Span(tokens, a, b) for a, b in zip(cuts, cuts[1:])])


def _targets(windows) -> list[tuple[int, int]]:
    """(token, its context's last token) of each target scored, in order."""
    out = []
    for w in windows:
        w, k = w if isinstance(w, tuple) else (w, 0)
        out += [(int(w[i + 1]), int(w[i])) for i in range(k, len(w) - 1)]
    return out


def test_every_target_of_a_text_is_scored_once_the_last_partial_window_too():
    store = _store(430)
    t = store.spans[0].array.astype(np.int64)
    windows = list(lm_windows([store], 64))
    assert _targets(windows) == [(int(t[i + 1]), int(t[i])) for i in range(429)]  # 430 tokens: 429 targets
    last, context = windows[-1]
    assert len(last) == 65 and context == 64 - 429 % 64  # as much preceding text as fits
    assert all(not isinstance(w, tuple) and len(w) == 65 for w in windows[:-1])
    assert len(_targets(lm_windows([store], 64, max_tokens=100))) == 100  # the budget, exactly
    assert len(_targets(lm_windows([_store(430, shards=(200, 20, 210))], 64))) == 427  # one less per span


def test_lm_metrics_counts_the_tail_once_and_keeps_whole_windows_as_they_were():
    torch.manual_seed(0)
    model = GPT(resolve_model_config(ModelConfig(n_layer=1, d_model=32, n_head=2, max_seq_len=64), 50)).eval()
    store = _store(150)
    r = lm_metrics(model, lm_windows([store], 64), [1] * 50, torch.device("cpu"), batch_size=4)
    assert r["tokens"] == 149 and r["bytes"] == 149
    # by hand: two whole windows, then the last 21 targets of the window ending with the text
    t = torch.from_numpy(store.spans[0].array.astype(np.int64))
    with torch.no_grad():
        parts = [F.cross_entropy(model(w[None, :-1])[0], w[1:], reduction="none")
                 for w in (t[0:65], t[64:129], t[85:150])]
    expected = torch.cat([parts[0], parts[1], parts[2][-21:]]).double().mean().item()
    assert math.isclose(r["loss"], expected, rel_tol=1e-6)
    # pre-training's validation: plain whole windows, the figures of all their targets as before
    whole = lm_metrics(model, store.windows(64), [1] * 50, torch.device("cpu"), batch_size=4)
    assert whole["tokens"] == 128
    assert math.isclose(whole["loss"], torch.cat(parts[:2]).double().mean().item(), rel_tol=1e-6)
