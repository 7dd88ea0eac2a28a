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
    if top_p is not None and top_p < 1:  # top_p 0 keeps the most likely token alone
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # the smallest set whose mass reaches top_p: a token goes once the more likely ones before it
        # reach top_p (an exact tie counts as reaching it, as in transformers' TopPLogitsWarper); the
        # mass before each token is summed over those tokens alone, so a tie is not lost to rounding
        before = torch.cat([torch.zeros_like(sorted_p[..., :1]), sorted_p[..., :-1].cumsum(-1)], dim=-1)
        drop = before >= top_p
        drop[..., 0] = False  # the most likely token always stays
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@torch.no_grad()
def stream_tokens(model: GPT, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                  stop_ids: set[int] | None = None, slide: bool = True) -> Iterator[int]:
    """Yield new token ids one at a time. temperature=0 is greedy.

    A prompt longer than the context (model.max_seq_len) keeps its last max_seq_len - 1 tokens. Past
    the context the window slides, as nanoGPT's sampler does, but by half a context at a time: when
    the cache is full, it is filled again from the newest max_seq_len / 2 tokens, so a long output
    costs about two tokens' work per token instead of a whole context's. With slide=False the output
    ends where the context does, as the server's does (its finish_reason is then "length")."""
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    limit = model.cfg.max_seq_len
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token")
    context = list(prompt[-(limit - 1):])  # the tokens the cache holds, kept for refilling it
    if not slide:
        max_new_tokens = min(max_new_tokens, limit - len(context))
    dtype = next(model.parameters()).dtype

    def fill(tokens: list[int]) -> tuple[KVCache, torch.Tensor]:
        cache = KVCache.empty(model.cfg, 1, min(limit, len(tokens) + max_new_tokens), device, dtype)
        last = torch.tensor([len(tokens) - 1], device=device)  # logits at the last token only
        return cache, model(torch.tensor([tokens], device=device), cache=cache, select=last)

    cache, logits = fill(context)
    for i in range(max_new_tokens):
        if temperature <= 0:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(filter_logits(logits, temperature, top_k, top_p), 1, generator=gen)[:, 0]
        token = int(nxt)
        if stop_ids and token in stop_ids:
            return
        yield token
        if i + 1 == max_new_tokens:
            return
        context.append(token)
        if cache.pos < cache.k.shape[3]:  # room for one more token
            logits = model(nxt.view(1, 1), cache=cache)[:, -1]
        else:  # the context is full: slide
            context = context[-(limit // 2):]
            cache, logits = fill(context)


# Prompt tokens that text streams decode in front of the new ones: a tokenizer that drops a word's
# leading space at the start of a text (SentencePiece's "▁") keeps it after them.
PREFIX_TOKENS = 4


class TextStream:
    """Incremental detokenisation with stop strings: push token ids, get the text that is safe to show.

    The new text is the whole output decoded at once, so a character split across tokens comes out
    whole; `prefix` (the prompt's last tokens) is decoded in front of it and left out of what is
    returned, so the first word keeps its leading space as it would in prompt + output."""

    def __init__(self, tokenizer, stop: list[str], prefix: list[int] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already returned
        self.prefix = list(prefix)
        self.base = tokenizer.decode(self.prefix) if self.prefix else ""

    def text(self) -> str:
        """The output so far, decoded."""
        if self.prefix:
            text = self.tokenizer.decode(self.prefix + self.ids)
            if text.startswith(self.base):  # not so when the prompt ends inside a character
                return text[len(self.base):]
        return self.tokenizer.decode(self.ids)

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (new text, whether a stop string was reached)."""
        self.ids.append(token)
        text = self.text()
        safe = len(text)
        while safe > self.sent and text[safe - 1] == "\ufffd":  # maybe half of a UTF-8 character
            safe -= 1
        # stops are looked for in whole characters only, never in a half-decoded one's U+FFFD
        hits = [at for at in (text.find(s, max(0, self.sent - len(s) + 1), safe) for s in self.stop) if at >= 0]
        if hits:
            at = max(min(hits), self.sent)
            out, self.sent = text[self.sent:at], len(text)
            return out, True
        hold = 0  # keep back the longest tail that may still grow into a stop string
        for s in self.stop:
            hold = max([hold] + [k for k in range(1, min(len(s), safe - self.sent + 1))
                                 if text.endswith(s[:k], 0, safe)])
        safe -= hold
        out = text[self.sent:safe]
        self.sent = max(self.sent, safe)
        return out, False

    def flush(self) -> str:
        """The held-back text, when generation ends without a stop string."""
        text = self.text()
        out, self.sent = text[self.sent:], len(text)
        return out


def generate(model: GPT, prompt: list[int], max_new_tokens: int, **kw) -> list[int]:
    return list(stream_tokens(model, prompt, max_new_tokens, **kw))
