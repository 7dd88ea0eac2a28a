"""From data config to what training needs: a tokenizer, train/val token stores, batches."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pretune.config import DataConfig
from pretune.data.shards import BatchSampler, TokenStore, default_cache_dir, load_source, records_field
from pretune.data.sources import DataError, ReadStats, expand_source, hash_files, iter_documents
from pretune.data.tokenizer import Tokenizer, train_bpe, train_char
from pretune.files import atomic_dir, atomic_write_bytes


def _held_out(d: DataConfig) -> float:
    """The share of each training source that load_corpus holds out for validation: none when
    data.val names the validation text."""
    return 0.0 if d.val else d.val_fraction


def _iter_text(d: DataConfig) -> Iterator[str]:
    """The text the tokenizer trains on: of each source, its first 1 - data.val_fraction of
    characters, so no merge or character is learnt from text that is only ever scored.

    load_corpus cuts in tokens (after the tokenizer exists, and then at a document boundary), this
    cut is in characters, so the two fall near each other but not on the same character; what lies
    between is a little training text the tokenizer does not see, or the other way round. Counting
    the characters first costs one more read of each source, once per tokenizer (it is cached)."""
    fraction = _held_out(d)
    for spec in d.train:
        files = expand_source(spec)
        budget = None  # characters of this source still to give
        if fraction > 0:
            total = sum(len(text) for text in _texts(files, d))
            budget = total - int(round(total * fraction))
        for text in _texts(files, d):
            if budget is not None:
                if budget <= 0:
                    break
                text = text[:budget]
                budget -= len(text)
            yield text


def _texts(files: list[Path], d: DataConfig) -> Iterator[str]:
    for f in files:
        for text, _ in iter_documents(f, d.text_field, d.encoding_errors, ReadStats()):
            yield text


def build_tokenizer(d: DataConfig, log=print) -> Tokenizer:
    """Load data.tokenizer if it is a path; else train a char or BPE tokenizer (cached by content)."""
    if d.tokenizer not in ("char", "bpe"):
        p = Path(d.tokenizer)
        if not p.exists():
            raise DataError(f"data.tokenizer={d.tokenizer!r} is neither 'char', 'bpe' nor an existing "
                            "tokenizer.json (or a directory holding one)")
        return Tokenizer.load(p)
    if not d.train:
        raise DataError("data.train is empty: give the training text (files, globs or directories)")
    files = [f for spec in d.train for f in expand_source(spec)]
    key = hashlib.sha256(json.dumps([hash_files(files), d.tokenizer, d.vocab_size, records_field(files, d.text_field),
                                     d.encoding_errors, "held-out", _held_out(d)]).encode()).hexdigest()[:24]
    cached = default_cache_dir(d.cache_dir) / "tokenizers" / key
    if (cached / "tokenizer.json").is_file():
        try:
            return Tokenizer.load(cached)
        except Exception as e:  # a file cut short by a run killed before the cache was written atomically
            log(f"warning: the cached tokenizer {cached} is unreadable ({type(e).__name__}); training it again")
    tok = train_char(_iter_text(d)) if d.tokenizer == "char" else train_bpe(_iter_text(d), d.vocab_size)
    if tok.vocab_size <= 4:
        raise DataError("data.train holds no text: every source is empty")
    try:
        with atomic_dir(cached) as tmp:  # whole or not at all: a run killed while saving leaves no half file here
            tok.save(tmp)
    except OSError:
        if not (cached / "tokenizer.json").is_file():
            raise
        # another process (a rank of this run, or a parallel run) wrote the same tokenizer first
    log(f"trained a {d.tokenizer} tokenizer: {tok.vocab_size} tokens")
    return tok


@dataclass
class Corpus:
    train: list[TokenStore]
    val: list[TokenStore]
    weights: list[float] | None

    def val_sets(self, seq_len: int, max_tokens: int) -> list[tuple[str, list[np.ndarray]]]:
        """(label, windows) of each validation source, the token budget split evenly among them: a
        small replay source is scored beside a large domain one, so forgetting stays visible."""
        share = max_tokens // max(len(self.val), 1)
        return [(label, list(store.windows(seq_len, share)))
                for label, store in zip(source_labels([s.name for s in self.val]), self.val)]

    def val_windows(self, seq_len: int, max_tokens: int) -> Iterator[np.ndarray]:
        for _, windows in self.val_sets(seq_len, max_tokens):
            yield from windows

    def describe(self) -> dict:
        return {"train": {s.name: s.n_tokens for s in self.train},
                "val": {s.name: s.n_tokens for s in self.val}, "weights": self.weights}


def load_corpus(d: DataConfig, tok: Tokenizer, seq_len: int, log=print) -> Corpus:
    """Tokenise (or reuse cached shards of) every source and split off validation text."""
    if not d.train:
        raise DataError("data.train is empty: give the training text (files, globs or directories)")
    kw = dict(text_field=d.text_field, errors=d.encoding_errors, cache_dir=d.cache_dir,
              shard_tokens=d.shard_tokens, log=log)
    train, val = [], []
    for spec in d.train:
        store = load_source(spec, tok, key="data.train", **kw)
        if d.val:
            train.append(store)
        else:
            head, tail = store.split(d.val_fraction, tok.eos_id)
            train.append(head)
            if d.val_fraction > 0:
                val.append(tail)
    for spec in d.val:
        val.append(load_source(spec, tok, key="data.val", **kw))
    if val and sum(s.n_tokens for s in val) < seq_len + 1:
        raise DataError(f"the validation text has {sum(s.n_tokens for s in val)} tokens, fewer than one "
                        f"sequence of {seq_len}+1; give more text in data.val, raise data.val_fraction "
                        "or shorten train.seq_len")
    for store in val:
        if store.n_tokens < seq_len + 1:
            log(f"warning: the validation part of {store.name.removesuffix(':val')} has {store.n_tokens} tokens, "
                f"fewer than one sequence of {seq_len}+1, so its loss is not measured; raise data.val_fraction "
                f"or give it in data.val")
    return Corpus(train, val, d.weights)


class PretrainData:
    """StepData for language modelling: random windows of seq_len+1 tokens from the mixture."""

    def __init__(self, corpus: Corpus, seq_len: int, batch_size: int, micro_batch_size: int | None,
                 seed: int, world: int = 1):
        if batch_size % world:
            raise DataError(f"train.batch_size={batch_size} is not divisible by the {world} processes")
        self.sampler = BatchSampler(corpus.train, corpus.weights, seq_len, seed)
        self.seq_len, self.batch_size = seq_len, batch_size
        local = batch_size // world
        self.micro = min(micro_batch_size or local, local)

    def micro_batches(self, step: int, rank: int, world: int) -> list[dict[str, torch.Tensor]]:
        rows = torch.from_numpy(self.sampler.batch(step, self.batch_size, rank, world))  # pinned by the loop on CUDA
        return [{"input_ids": rows[i: i + self.micro, :-1], "targets": rows[i: i + self.micro, 1:]}
                for i in range(0, len(rows), self.micro)]


def source_labels(names: list[str]) -> list[str]:
    """Short names of data sources for per-source figures: the file or folder name ("domain.txt"),
    the whole spec where two share one."""
    short = [Path(n.removesuffix(":val")).name or n for n in names]
    return [s if short.count(s) == 1 else n.removesuffix(":val") for s, n in zip(short, names)]


def save_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2).encode())
