"""Tokenizers: character-level, byte-level BPE trained on the corpus, or an existing tokenizer.json.

All three are Hugging Face `tokenizers` objects underneath, so every one of them saves to a single
tokenizer.json that `tokenizers` and transformers load. Special tokens are handled one way
everywhere: BOS, EOS and PAD ids are looked up by name and stored with the tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path

from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
SPECIALS = [BOS, EOS, PAD, UNK]
METASPACE = "\u2581"  # "▁": a space, in SentencePiece-style pieces

# Names used by other tokenizers for the same roles, in order of preference.
_ROLE_NAMES = {
    "bos": [BOS, "<s>", "<|begin_of_text|>", "<|endoftext|>", "<|im_start|>"],
    "eos": [EOS, "</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>"],
    "pad": [PAD, "<pad>", "<|finetune_right_pad_id|>", "<unk>"],
}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids of its special tokens."""

    def __init__(self, tok: HFTokenizer, bos: str | None = None, eos: str | None = None,
                 pad: str | None = None, chat_template: str | None = None):
        self.tok = tok
        self.bos_id = self._role_id("bos", bos)
        self.eos_id = self._role_id("eos", eos)
        pad_id = self._role_id("pad", pad)
        self.pad_id = pad_id if pad_id is not None else self.eos_id
        self.chat_template = chat_template

    def _role_id(self, role: str, name: str | None) -> int | None:
        """The id of `name`, else of the first token named as tokenizers commonly name `role`; none
        for "" (a tokenizer_config.json that declares the role null: see role_tokens)."""
        if name == "":
            return None
        for candidate in ([name] if name else []) + _ROLE_NAMES[role]:
            idx = self.tok.token_to_id(candidate)
            if idx is not None:
                return idx
        return None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    @cached_property
    def prompt_prefix(self) -> list[int]:
        """The tokens the tokenizer's post-processor puts before a text: BOS for Llama 2/3 and Mistral,
        none for pretune's own tokenizers (they have no post-processor)."""
        plain = self.tok.encode("a", add_special_tokens=False).ids
        full = self.tok.encode("a", add_special_tokens=True).ids
        return full[:full.index(plain[0])] if plain and plain[0] in full else []

    def encode_prompt(self, text: str) -> list[int]:
        """A text prompt to generate from: encode(text) after prompt_prefix, as transformers'
        tokenizer(text) gives it, unless the text starts with those tokens already. encode() never
        adds them (training text; chat templates write BOS themselves)."""
        ids, prefix = self.encode(text), self.prompt_prefix
        return ids if ids[:len(prefix)] == prefix else prefix + ids

    def encode_batch(self, texts: list[str], specials_as_text: bool = False,
                     continued: list[bool] | None = None) -> list[list[int]]:
        """Encode many texts in parallel (the Rust side uses every core).

        With `specials_as_text`, a special token's text inside the texts ("<|eos|>" in a web page
        about tokenizers) is encoded as the plain text it is, not as the control token: corpus text
        must not end documents or start turns where its author did not. The switch is set on the
        underlying tokenizer only for this call, since chat templates rely on specials matching.

        `continued` marks the texts that continue the one before them (a long document read in
        chunks): they are encoded without the "▁" a SentencePiece-style tokenizer puts before a
        text (see `prepends_space`), as if the document had been encoded whole."""
        continued = continued or [False] * len(texts)
        out: list[list[int]] = [[] for _ in texts]
        for tok, wanted in ((self.tok, False), (self._continuation, True)):
            picked = [i for i, c in enumerate(continued) if c == wanted]
            if not picked:
                continue
            before = tok.encode_special_tokens
            tok.encode_special_tokens = specials_as_text
            try:
                for i, e in zip(picked, tok.encode_batch([texts[i] for i in picked], add_special_tokens=False)):
                    out[i] = e.ids
            finally:
                tok.encode_special_tokens = before
        return out

    @cached_property
    def prepends_space(self) -> bool:
        """Whether the tokenizer puts "▁" (a space) before every text it encodes, a space that is not in
        the text: SentencePiece's dummy prefix, which Llama 2 and Mistral keep (a Prepend normalizer,
        or a Metaspace pre-tokenizer that prepends). Read from what the normalizer and pre-tokenizer
        make of "a", so it holds whatever the tokenizer.json's layout."""
        return _prepended(self.tok)

    @cached_property
    def _continuation(self) -> HFTokenizer:
        """The tokenizer for text that continues a document: without the prepended "▁" (the same
        tokenizer when it prepends none, or prepends it in a way not known here)."""
        if not self.prepends_space:
            return self.tok
        spec = json.loads(self.tok.to_str())
        spec["normalizer"] = _without_prepend(spec.get("normalizer"))
        spec["pre_tokenizer"] = _without_prepend(spec.get("pre_tokenizer"))
        tok = HFTokenizer.from_str(json.dumps(spec))
        return self.tok if _prepended(tok) else tok

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    @cached_property
    def special_ids(self) -> set[int]:
        return {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None} | {
            self.tok.token_to_id(t.content) for t in self.tok.get_added_tokens_decoder().values()
            if t.special}

    @cached_property
    def token_bytes(self) -> "TokenBytes":
        """UTF-8 byte length of each token's text (0 for special tokens), for bits per byte.

        A "▁" in a piece is a space (1 byte) for a tokenizer that writes spaces so (SentencePiece,
        Metaspace: its decoder turns "▁" back into " "), and the character itself (3 bytes) for one
        that does not (pretune's char tokenizer). A tokenizer that prepends "▁" to every text also
        says which tokens carry that byte at a document's start (TokenBytes.phantom).

        The unknown token stands for text the vocabulary lacks (a character the char tokenizer never
        saw): it counts 1 byte, at least what it replaced, so its loss stays in the bits-per-byte sum
        instead of vanishing with the bytes of the control tokens."""
        from pretune.data.templates import _unk_text

        out = TokenBytes()
        byte_level = _uses_byte_level(self.tok)
        metaspace = not byte_level and _writes_metaspace(self.tok)
        unicode_to_byte = {c: b for b, c in _bytes_to_unicode().items()} if byte_level else {}
        unk = _unk_text(self.tok)
        unk_id = self.tok.token_to_id(unk) if unk else None
        if unk_id in (self.bos_id, self.eos_id):  # a tokenizer that ends documents with its <unk>
            unk_id = None
        for i in range(self.vocab_size):
            if i == unk_id:
                out.append(1)
                continue
            if i in self.special_ids:
                out.append(0)
                continue
            piece = self.tok.id_to_token(i) or ""
            if byte_level:
                out.append(sum(1 for ch in piece if ch in unicode_to_byte))
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                out.append(1)  # sentencepiece byte fallback
            else:
                out.append(len((piece.replace(METASPACE, " ") if metaspace else piece).encode("utf-8")))
        if self.prepends_space:
            out.phantom = tuple(int(b > 0 and (self.tok.id_to_token(i) or "").startswith(METASPACE))
                                for i, b in enumerate(out))
            out.after = tuple(sorted({self.eos_id, *self.prompt_prefix[-1:]} - {None}))
        return out

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json (special tokens, chat template)."""
        from pretune.data.templates import _unk_text

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(d / "tokenizer.json"))
        name = self.tok.id_to_token
        meta = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(self.bos_id) if self.bos_id is not None else None,
            "eos_token": name(self.eos_id) if self.eos_id is not None else None,
            "pad_token": name(self.pad_id) if self.pad_id is not None else None,
            "unk_token": _unk_text(self.tok) or None,
            "model_max_length": 1_000_000,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template:
            meta["chat_template"] = self.chat_template
        (d / "tokenizer_config.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return d / "tokenizer.json"

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json (a file, or a directory holding it and maybe tokenizer_config.json)."""
        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {p}")
        tok = HFTokenizer.from_file(str(file))
        meta_file = file.with_name("tokenizer_config.json")
        meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
        return cls(tok, **role_tokens(meta), chat_template=read_chat_template(file.parent, meta))


def role_tokens(meta: dict) -> dict[str, str | None]:
    """bos, eos and pad as tokenizer_config.json names them (None: not named, so guessed by name).
    A BOS or PAD declared null (Qwen2's `"bos_token": null`) is "": the tokenizer has none, and no
    token that merely looks like one (`<|endoftext|>`) is taken for it. EOS is always found, since
    documents need one."""
    def token(key):
        value = meta.get(key)
        if value is None and key in meta and key != "eos_token":
            return ""
        return value.get("content") if isinstance(value, dict) else value

    return {"bos": token("bos_token"), "eos": token("eos_token"), "pad": token("pad_token")}


def read_chat_template(directory: Path, meta: dict) -> str | None:
    """The chat template of a tokenizer directory, where transformers may keep it: tokenizer_config.json
    (`meta`; a list of named templates gives its "default"), chat_template.jinja (transformers 4.43 and
    later write it there), or chat_template.json."""
    template = meta.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None and (directory / "chat_template.json").is_file():
        template = json.loads((directory / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    return template


class TokenBytes(list):
    """Tokenizer.token_bytes: the UTF-8 bytes of each token id. For a tokenizer that prepends "▁" to
    every text it encodes (Tokenizer.prepends_space), also `phantom` (1 for a token whose piece opens
    with "▁") and `after` (EOS and the last id of the prompt prefix: what precedes a document in
    token shards): a target token right after one of `after` opens a document, and its "▁" is
    not in the text, so it carries one byte fewer (eval.evaluate.lm_metrics)."""

    phantom: tuple[int, ...] = ()
    after: tuple[int, ...] = ()


def _prepended(tok: HFTokenizer) -> bool:
    """Whether the normalizer and pre-tokenizer put "▁" before "a" (a text that has no space)."""
    text = tok.normalizer.normalize_str("a") if tok.normalizer is not None else "a"
    if tok.pre_tokenizer is not None:
        pieces = tok.pre_tokenizer.pre_tokenize_str(text)
        text = pieces[0][0] if pieces else ""
    return text.startswith(METASPACE)


def _without_prepend(spec: dict | None) -> dict | None:
    """A normalizer's or pre-tokenizer's spec without the "▁" it prepends: Prepend normalizers
    dropped, Metaspace set to prepend nothing (in a Sequence too)."""
    if not isinstance(spec, dict):
        return spec
    kind = spec.get("type")
    if kind == "Prepend" and spec.get("prepend") == METASPACE:
        return None
    if kind == "Metaspace":
        spec = dict(spec, prepend_scheme="never")
        spec.pop("add_prefix_space", None)
        return spec
    for key in ("normalizers", "pretokenizers"):
        if isinstance(spec.get(key), list):
            kept = [_without_prepend(s) for s in spec[key]]
            spec = dict(spec, **{key: [s for s in kept if s is not None]})
    return spec


def _writes_metaspace(tok: HFTokenizer) -> bool:
    """Whether "▁" in the tokenizer's pieces stands for a space: a Metaspace pre-tokenizer or decoder,
    or a Replace between " " and "▁" (Llama 2's normalizer and decoder)."""

    def found(spec) -> bool:
        if isinstance(spec, list):
            return any(found(s) for s in spec)
        if not isinstance(spec, dict):
            return False
        if spec.get("type") == "Metaspace":
            return True
        if spec.get("type") == "Replace" and METASPACE in (spec.get("content"), (spec.get("pattern") or {}).get("String")):
            return True
        return any(found(v) for v in spec.values() if isinstance(v, (dict, list)))

    spec = json.loads(tok.to_str())
    return found([spec.get("normalizer"), spec.get("pre_tokenizer"), spec.get("decoder")])


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-to-printable-character map that byte-level BPE uses."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _uses_byte_level(tok: HFTokenizer) -> bool:
    spec = json.loads(tok.to_str())
    text = json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder"))
    return '"ByteLevel"' in text


def train_char(texts: Iterable[str]) -> Tokenizer:
    """A character vocabulary: every distinct character of the corpus, plus the special tokens."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in sorted(chars):
        vocab[ch] = len(vocab)
    tok = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return Tokenizer(tok)


def train_bpe(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (the GPT-2 scheme): no unknown tokens, any text round-trips exactly."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)
