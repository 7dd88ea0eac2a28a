"""Token shards on disk (NumPy memmaps), cached by content hash, and mixtures of them.

A source (one entry of data.train) is tokenised once into shard files of uint16 (or uint32 when the
vocabulary does not fit), documents separated by EOS. The cache key is the hash of the file contents,
the tokenizer (its tokenizer.json and its EOS id), the dtype and the reading options, so a second run
reads the memmaps without tokenising again. Special-token text inside the corpus ("<|eos|>" written in
a document) is tokenised as plain text: only the EOS written between documents is a control token.

Batches are a pure function of (seed, step): every step draws its windows from a generator seeded by
both, so resuming at step s needs nothing but s, and each rank takes a disjoint slice of the same
global batch (the losses of 1 and N processes agree).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pretune.data.sources import DataError, ReadStats, expand_source, hash_files, iter_documents, read_as
from pretune.data.tokenizer import Tokenizer

# 2: special-token text in the corpus is plain text (1 encoded it as the token); 3: each document
# starts with the tokenizer's prompt prefix (BOS for Llama-family tokenizers; none for pretune's own);
# 4: a text file read in chunks is tokenised as one text (a SentencePiece-style tokenizer put a "▁",
# a space that is not in the text, at the start of every chunk)
FORMAT_VERSION = 4
BATCH_CHARS = 1 << 22  # text handed to the tokenizer per parallel call
SPLIT_SEARCH = 1 << 16  # tokens the train/validation cut may move to reach a document boundary


def default_cache_dir(configured: str | None = None) -> Path:
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("PRETUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pretune"


@dataclass
class Span:
    """A contiguous range of one shard's tokens."""

    array: np.ndarray
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class TokenStore:
    """The tokens of one source: spans over one or more memmapped shards."""

    name: str
    spans: list[Span]
    stats: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.spans)

    def split(self, fraction: float, eos_id: int | None = None) -> tuple["TokenStore", "TokenStore"]:
        """(first 1-fraction of the tokens, last fraction), as nanoGPT splits train and val.

        With `eos_id`, the cut moves forward to just after the next EOS, so the validation text
        starts with a whole document and no document is shared by both sides; it moves at most
        SPLIT_SEARCH tokens and half the validation part, and stays where it was when no EOS is that
        near (one long text file is one document: its cut falls inside it)."""
        cut = self.n_tokens - int(round(self.n_tokens * fraction))
        if eos_id is not None and 0 < cut < self.n_tokens:
            cut = self._after_eos(cut, eos_id, min(SPLIT_SEARCH, (self.n_tokens - cut) // 2))
        head, tail, seen = [], [], 0
        for s in self.spans:
            lo, hi = seen, seen + len(s)
            if hi <= cut:
                head.append(s)
            elif lo >= cut:
                tail.append(s)
            else:
                head.append(Span(s.array, s.start, s.start + cut - lo))
                tail.append(Span(s.array, s.start + cut - lo, s.end))
            seen = hi
        return TokenStore(self.name, head, self.stats), TokenStore(self.name + ":val", tail, self.stats)

    def _after_eos(self, cut: int, eos_id: int, reach: int) -> int:
        """The position just after the first EOS among tokens cut-1 .. cut-1+reach-1 (the token
        before the cut is looked at too: an EOS there means the cut is at a boundary already), or
        `cut` when there is none."""
        lo, hi = cut - 1, cut - 1 + reach
        seen = 0
        for s in self.spans:
            a, b = max(lo, seen), min(hi, seen + len(s))
            if a < b:
                found = np.flatnonzero(np.asarray(s.array[s.start + a - seen: s.start + b - seen]) == eos_id)
                if len(found):
                    return a + int(found[0]) + 1
            seen += len(s)
        return cut

    def windows(self, seq_len: int, max_tokens: int | None = None) -> Iterator[np.ndarray]:
        """Non-overlapping windows of seq_len+1 tokens (seq_len targets each), in order."""
        budget = max_tokens if max_tokens is not None else float("inf")
        for s in self.spans:
            pos = s.start
            while pos + seq_len + 1 <= s.end and budget >= seq_len:
                yield np.asarray(s.array[pos: pos + seq_len + 1], dtype=np.int64)
                pos += seq_len
                budget -= seq_len


def _dtype(tok: Tokenizer) -> type:
    return np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32


def _tokenise_to_shards(files: list[Path], tok: Tokenizer, text_field: str, errors: str,
                        out: Path, shard_tokens: int, field_key: str = "data.text_field") -> dict:
    """Stream documents through the tokenizer into shard_NNNNN.bin files; return the metadata."""
    dtype = _dtype(tok)
    stats = ReadStats()
    shard_sizes: list[int] = []
    state = {"fh": None, "n": 0}

    def write(ids: np.ndarray):
        while len(ids):
            if state["fh"] is None or state["n"] >= shard_tokens:
                if state["fh"] is not None:
                    state["fh"].close()
                    shard_sizes.append(state["n"])
                state["fh"] = open(out / f"shard_{len(shard_sizes):05d}.bin", "wb")
                state["n"] = 0
            room = shard_tokens - state["n"]
            ids[:room].astype(dtype).tofile(state["fh"])
            state["n"] += len(ids[:room])
            ids = ids[room:]

    # A document is BOS? text EOS: the BOS that the tokenizer's post-processor puts before a text
    # (Llama 2/3, Mistral), so that continued pre-training of such a model sees documents begin the
    # way its own pre-training did; pretune's tokenizers have none and write text EOS.
    prefix, starts = tok.prompt_prefix, [True]

    def flush(texts: list[str], ends: list[bool]):
        if not texts:
            return
        opens = []  # whether each text starts a document (else it continues the one before it)
        for end in ends:
            opens.append(starts[0])
            starts[0] = end
        pieces = []
        encoded = tok.encode_batch(texts, specials_as_text=True, continued=[not o for o in opens])
        for ids, end, first in zip(encoded, ends, opens):
            if first and prefix:
                pieces.append(prefix)
            pieces.append(ids)
            if end:
                pieces.append([tok.eos_id])
        write(np.fromiter((i for p in pieces for i in p), dtype=np.int64))

    texts: list[str] = []
    ends: list[bool] = []
    size = 0
    for f in files:
        for text, end in iter_documents(f, text_field, errors, stats, field_key):
            texts.append(text)
            ends.append(end)
            size += len(text)
            if size >= BATCH_CHARS:
                flush(texts, ends)
                texts, ends, size = [], [], 0
    flush(texts, ends)
    if state["fh"] is not None:
        state["fh"].close()
        shard_sizes.append(state["n"])
    return {"version": FORMAT_VERSION, "dtype": np.dtype(dtype).name, "shards": shard_sizes,
            "n_tokens": sum(shard_sizes), "documents": stats.documents, "bytes": stats.bytes,
            "replaced_chars": stats.replaced, "files": [str(f) for f in files]}


def records_field(files: list[Path], text_field: str) -> str | None:
    """data.text_field as far as it decides what `files` hold: the field when some file is read as
    records, else None (plain text has no fields; a cache key that held it would tokenise again)."""
    return text_field if any(read_as(f) != "text" for f in files) else None


def _tokenizer_hash(tok: Tokenizer) -> str:
    """The tokenizer.json and the EOS id written between documents: the same tokenizer.json with
    another eos_token in tokenizer_config.json writes other shards."""
    return hashlib.sha256(json.dumps([tok.tok.to_str(), tok.eos_id]).encode()).hexdigest()[:16]


def load_source(spec: str, tok: Tokenizer, text_field: str = "text", errors: str = "replace",
                cache_dir: str | None = None, shard_tokens: int = 1 << 27, key: str = "data.train",
                log=print, field_key: str = "data.text_field") -> TokenStore:
    """Tokenise one source into cached shards (or reuse them) and memory-map them. `key` names the
    source's setting and `field_key` the text field's, for errors.

    The tokenizer must have an EOS token: without one the documents would run together, each one's
    end predicting the next one's start."""
    if tok.eos_id is None:
        raise DataError(f"{key}: the tokenizer has no end-of-text token, so the documents of {spec} would "
                        "run together; set eos_token in the tokenizer's tokenizer_config.json to the token "
                        "that ends a text (such as </s> or <|endoftext|>)")
    files = expand_source(spec, key)
    dtype = _dtype(tok)
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, hash_files(files), _tokenizer_hash(tok),
                                        np.dtype(dtype).name, records_field(files, text_field), errors,
                                        shard_tokens]).encode()).hexdigest()[:24]
    root = default_cache_dir(cache_dir) / "shards"
    final = root / digest
    if not (final / "meta.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=root))
        try:
            meta = _tokenise_to_shards(files, tok, text_field, errors, tmp, shard_tokens, field_key)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                tmp.rename(final)
            except OSError:  # another process finished the same shards first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"tokenised {spec}: {meta['n_tokens']:,} tokens in {len(meta['shards'])} shard(s)")
    meta = json.loads((final / "meta.json").read_text())
    if meta["n_tokens"] == 0:
        raise DataError(f"{key}: {spec} holds no text (0 tokens); give a non-empty corpus")
    if meta["replaced_chars"]:
        log(f"warning: {spec}: {meta['replaced_chars']} invalid UTF-8 byte sequence(s) replaced by U+FFFD")
    spans = []
    for i, n in enumerate(meta["shards"]):
        arr = np.memmap(final / f"shard_{i:05d}.bin", dtype=meta["dtype"], mode="r", shape=(n,))
        spans.append(Span(arr, 0, n))
    stats = {k: meta[k] for k in ("n_tokens", "documents", "bytes", "replaced_chars")}
    return TokenStore(spec, spans, stats)


class BatchSampler:
    """Random windows from a weighted mixture of stores; a pure function of (seed, step)."""

    def __init__(self, stores: list[TokenStore], weights: list[float] | None, seq_len: int, seed: int):
        for s in stores:
            if s.n_tokens < seq_len + 1 or not any(len(sp) > seq_len for sp in s.spans):
                raise DataError(f"{s.name} has {s.n_tokens} training tokens, fewer than one sequence of "
                                f"train.seq_len={seq_len}+1; use more text or a shorter train.seq_len")
        w = np.asarray(weights if weights is not None else [s.n_tokens for s in stores], dtype=np.float64)
        self.probs = w / w.sum()
        self.stores, self.seq_len, self.seed = stores, seq_len, seed
        # Valid window starts per span, and their cumulative sums for O(log n) lookup.
        self.starts = [np.array([max(len(sp) - seq_len, 0) for sp in s.spans], dtype=np.int64)
                       for s in stores]
        self.cum = [np.cumsum(x) for x in self.starts]

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> np.ndarray:
        """The rows [rank::world] of step's global batch, shape (batch_size // world, seq_len + 1)."""
        rng = np.random.default_rng([self.seed, step])
        src = rng.choice(len(self.stores), size=batch_size, p=self.probs)
        u = rng.random(batch_size)
        rows = np.empty((batch_size // world, self.seq_len + 1), dtype=np.int64)
        for j, i in enumerate(range(rank, batch_size, world)):
            if j >= len(rows):
                break
            s = src[i]
            cum = self.cum[s]
            pos = int(u[i] * cum[-1])
            k = int(np.searchsorted(cum, pos, side="right"))
            within = pos - (cum[k - 1] if k else 0)
            span = self.stores[s].spans[k]
            a = span.start + within
            rows[j] = span.array[a: a + self.seq_len + 1]
        return rows
