"""Sampling with a KV cache: temperature, top-k, top-p, a seed, stop tokens."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pretune.model.gpt import GPT, KVCache


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
                  ) -> torch.Tensor:
    """(B, V) logits -> (B, V) probabilities after temperature, top-k and nucleus filtering."""
    logits = logits.float() / max(temperature, 1e-6)
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@torch.no_grad()
def stream_tokens(model: GPT, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                  stop_ids: set[int] | None = None) -> Iterator[int]:
    """Yield new token ids one at a time. temperature=0 is greedy."""
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    limit = model.cfg.max_seq_len
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token")
    prompt = prompt[-(limit - 1):] if len(prompt) >= limit else prompt
    max_new_tokens = min(max_new_tokens, limit - len(prompt))
    dtype = next(model.parameters()).dtype
    cache = KVCache.empty(model.cfg, 1, len(prompt) + max_new_tokens, device, dtype)
    last = torch.tensor([len(prompt) - 1], device=device)  # the prompt's logits at its last token only
    logits = model(torch.tensor([prompt], device=device), cache=cache, select=last)
    for _ in range(max_new_tokens):
        if temperature <= 0:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(filter_logits(logits, temperature, top_k, top_p), 1, generator=gen)[:, 0]
        token = int(nxt)
        if stop_ids and token in stop_ids:
            return
        yield token
        logits = model(nxt.view(1, 1), cache=cache)[:, -1]


def generate(model: GPT, prompt: list[int], max_new_tokens: int, **kw) -> list[int]:
    return list(stream_tokens(model, prompt, max_new_tokens, **kw))
