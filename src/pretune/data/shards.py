"""Token shards on disk (NumPy memmaps), cached by content hash, and mixtures of them.

A source (one entry of data.train) is tokenised once into shard files of uint16 (or uint32 when the
vocabulary does not fit), documents separated by EOS. The cache key is the hash of the file contents,
the tokenizer and the reading options, so a second run reads the memmaps without tokenising again.

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

from pretune.data.sources import DataError, ReadStats, expand_source, hash_files, iter_documents
from pretune.data.tokenizer import Tokenizer

FORMAT_VERSION = 1
BATCH_CHARS = 1 << 22  # text handed to the tokenizer per parallel call


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

    def split(self, fraction: float) -> tuple["TokenStore", "TokenStore"]:
        """(first 1-fraction of the tokens, last fraction), as nanoGPT splits train and val."""
        cut = self.n_tokens - int(round(self.n_tokens * fraction))
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

    def windows(self, seq_len: int, max_tokens: int | None = None) -> Iterator[np.ndarray]:
        """Non-overlapping windows of seq_len+1 tokens (seq_len targets each), in order."""
        budget = max_tokens if max_tokens is not None else float("inf")
        for s in self.spans:
            pos = s.start
            while pos + seq_len + 1 <= s.end and budget >= seq_len:
                yield np.asarray(s.array[pos: pos + seq_len + 1], dtype=np.int64)
                pos += seq_len
                budget -= seq_len


def _tokenise_to_shards(files: list[Path], tok: Tokenizer, text_field: str, errors: str,
                        out: Path, shard_tokens: int) -> dict:
    """Stream documents through the tokenizer into shard_NNNNN.bin files; return the metadata."""
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
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

    def flush(texts: list[str], ends: list[bool]):
        if not texts:
            return
        pieces = []
        for ids, end in zip(tok.encode_batch(texts), ends):
            pieces.append(ids)
            if end and tok.eos_id is not None:
                pieces.append([tok.eos_id])
        write(np.fromiter((i for p in pieces for i in p), dtype=np.int64))

    texts: list[str] = []
    ends: list[bool] = []
    size = 0
    for f in files:
        for text, end in iter_documents(f, text_field, errors, stats):
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


def _tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.tok.to_str().encode()).hexdigest()[:16]


def load_source(spec: str, tok: Tokenizer, text_field: str = "text", errors: str = "replace",
                cache_dir: str | None = None, shard_tokens: int = 1 << 27, key: str = "data.train",
                log=print) -> TokenStore:
    """Tokenise one source into cached shards (or reuse them) and memory-map them."""
    files = expand_source(spec, key)
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, hash_files(files), _tokenizer_hash(tok),
                                        text_field, errors, shard_tokens]).encode()).hexdigest()[:24]
    root = default_cache_dir(cache_dir) / "shards"
    final = root / digest
    if not (final / "meta.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=root))
        try:
            meta = _tokenise_to_shards(files, tok, text_field, errors, tmp, shard_tokens)
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
