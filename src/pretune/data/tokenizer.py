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

    def encode_batch(self, texts: list[str], specials_as_text: bool = False) -> list[list[int]]:
        """Encode many texts in parallel (the Rust side uses every core).

        With `specials_as_text`, a special token's text inside the texts ("<|eos|>" in a web page
        about tokenizers) is encoded as the plain text it is, not as the control token: corpus text
        must not end documents or start turns where its author did not. The switch is set on the
        underlying tokenizer only for this call, since chat templates rely on specials matching."""
        before = self.tok.encode_special_tokens
        self.tok.encode_special_tokens = specials_as_text
        try:
            return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]
        finally:
            self.tok.encode_special_tokens = before

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    @cached_property
    def special_ids(self) -> set[int]:
        return {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None} | {
            self.tok.token_to_id(t.content) for t in self.tok.get_added_tokens_decoder().values()
            if t.special}

    @cached_property
    def token_bytes(self) -> list[int]:
        """UTF-8 byte length of each token's text (0 for special tokens), for bits per byte.

        The unknown token stands for text the vocabulary lacks (a character the char tokenizer never
        saw): it counts 1 byte, at least what it replaced, so its loss stays in the bits-per-byte sum
        instead of vanishing with the bytes of the control tokens."""
        from pretune.data.templates import _unk_text

        out = []
        byte_level = _uses_byte_level(self.tok)
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
                out.append(len(piece.replace("\u2581", " ").encode("utf-8")))
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

        def token(key):
            value = meta.get(key)
            return value.get("content") if isinstance(value, dict) else value

        return cls(tok, bos=token("bos_token"), eos=token("eos_token"), pad=token("pad_token"),
                   chat_template=read_chat_template(file.parent, meta))


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
