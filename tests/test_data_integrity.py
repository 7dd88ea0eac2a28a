"""What goes into the token shards is the training text and nothing else: literal special-token text
stays text, hidden and binary files stay out, validation text stays out of the tokenizer, and the
train/validation cut falls between documents."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

from pretune.config import DataConfig
from pretune.data.corpus import build_tokenizer, load_corpus
from pretune.data.shards import load_source
from pretune.data.sources import DataError, expand_source, iter_documents
from pretune.data.tokenizer import EOS, Tokenizer, train_bpe, train_char

QUIET = {"log": lambda m: None}


def _ids(store) -> list[int]:
    return np.concatenate([np.asarray(s.array[s.start:s.end]) for s in store.spans]).tolist()


def test_special_token_text_in_the_corpus_is_encoded_as_text(tmp_path):
    text = "alpha <|eos|> beta <|bos|> gamma"
    (tmp_path / "sp.jsonl").write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "delta"}) + "\n")
    tok = train_bpe(iter(["alpha beta gamma delta <| eos bos |>"] * 20), 300)
    ids = _ids(load_source(str(tmp_path / "sp.jsonl"), tok, **QUIET))
    assert ids.count(tok.eos_id) == 2 and tok.bos_id not in ids  # only the two real document ends
    assert tok.decode(ids, skip_special=False) == text + EOS + "delta" + EOS
    # the tokenizer itself still matches special tokens (chat templates rely on it)
    assert tok.encode("<|eos|>") == [tok.eos_id] and not tok.tok.encode_special_tokens


def test_evaluation_text_encodes_special_token_text_as_training_text_does(tmp_path):
    (tmp_path / "train.txt").write_text("a <|eos|> b\n" * 50)
    (tmp_path / "val.txt").write_text("a <|eos|> b\n" * 50)
    tok = train_char(["a <|eos|> b\n"])
    d = DataConfig(train=[str(tmp_path / "train.txt")], val=[str(tmp_path / "val.txt")], tokenizer="char")
    corpus = load_corpus(d, tok, 8, **QUIET)
    for store in corpus.train + corpus.val:
        assert _ids(store).count(tok.eos_id) == 1


def test_a_directory_passes_over_hidden_files_and_folders(tmp_path):
    d = tmp_path / "data"
    for rel in ("a.txt", "._a.txt", ".ipynb_checkpoints/a-checkpoint.txt", ".git/description.txt",
                "__MACOSX/data/._b.txt", "sub/b.txt"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text("hello\n")
    assert [f.relative_to(d).as_posix() for f in expand_source(str(d))] == ["a.txt", "sub/b.txt"]
    hidden = tmp_path / ".hidden_parent" / "corpus"  # only parts below the directory given count
    hidden.mkdir(parents=True)
    (hidden / "c.txt").write_text("hello\n")
    assert [f.name for f in expand_source(str(hidden))] == ["c.txt"]


def test_the_cache_key_holds_the_eos_id(tmp_path):
    (tmp_path / "two.jsonl").write_text('{"text": "ab"}\n{"text": "ba"}\n')
    tok = train_char(["ab"])
    other = Tokenizer(tok.tok, eos="<|bos|>")  # the same tokenizer.json, another EOS
    a = _ids(load_source(str(tmp_path / "two.jsonl"), tok, **QUIET))
    b = _ids(load_source(str(tmp_path / "two.jsonl"), other, **QUIET))
    assert a.count(tok.eos_id) == 2 and b.count(other.eos_id) == 2 and tok.eos_id not in b


def test_the_tokenizer_is_trained_only_on_the_training_part(tmp_path):
    f = tmp_path / "leak.txt"
    f.write_text("abc abc abc\n" * 900 + "Ωζ xyzzy_only_in_tail " * 30)
    bpe = build_tokenizer(DataConfig(train=[str(f)], tokenizer="bpe", vocab_size=300), **QUIET)
    assert not [t for t in bpe.tok.get_vocab() if "zzy" in t]
    char = build_tokenizer(DataConfig(train=[str(f)], tokenizer="char"), **QUIET)
    assert char.tok.token_to_id("Ω") is None and char.tok.token_to_id("a") is not None
    # with data.val given, or nothing held out, every training character is the tokenizer's
    for d in (DataConfig(train=[str(f)], tokenizer="char", val=[str(f)]),
              DataConfig(train=[str(f)], tokenizer="char", val_fraction=0.0)):
        assert build_tokenizer(d, **QUIET).tok.token_to_id("Ω") is not None


def test_the_validation_cut_moves_to_the_next_document_boundary(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text("".join(json.dumps({"text": f"doc {i:02d}: " + "ab " * (10 + i % 7)}) + "\n" for i in range(50)))
    d = DataConfig(train=[str(p)], tokenizer="char", val_fraction=0.1)
    tok = build_tokenizer(d, **QUIET)
    corpus = load_corpus(d, tok, 16, **QUIET)
    head, tail = _ids(corpus.train[0]), _ids(corpus.val[0])
    assert head[-1] == tok.eos_id and tok.decode(tail).startswith("doc ")
    assert len(head) + len(tail) == corpus.train[0].n_tokens + corpus.val[0].n_tokens
    # one long document (a text file): no boundary near the cut, so the plain cut stays
    (tmp_path / "c.txt").write_text("abcdefghij" * 100)
    train, val = load_source(str(tmp_path / "c.txt"), tok, **QUIET).split(0.1, tok.eos_id)
    assert val.n_tokens == 100 and train.n_tokens == 901


def test_a_jsonl_text_field_that_is_not_a_string_is_an_error(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "ok"}\n{"text": null}\n{"text": ""}\n{"text": "fine"}\n')
    assert [t for t, _ in iter_documents(f)] == ["ok", "fine"]  # empty ones are skipped, as before
    for i, bad in enumerate(('["a", "b"]', "5", '{"k": 1}', "false")):
        f.write_text('{"text": "ok"}\n' + f'{{"text": {bad}}}\n')
        kind = ("list", "int", "dict", "bool")[i]
        with pytest.raises(DataError, match=rf"x.jsonl:2: field 'text' holds {kind}"):
            list(iter_documents(f))


def test_binary_files_are_refused_by_suffix_or_by_a_nul_byte(tmp_path):
    tok = train_char(["plain text"])
    (tmp_path / "part1.txt").write_text("plain text")
    (tmp_path / "figure.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(DataError, match=r"data.train: .*figure.png is .*image"):
        load_source(str(tmp_path / "*"), tok, **QUIET)
    for name in ("a.pdf", "b.jpg", "c.pyc", "d.so"):
        (tmp_path / name).write_bytes(b"x")
        with pytest.raises(DataError, match=rf"{name} is "):
            load_source(str(tmp_path / name), tok, **QUIET)
    (tmp_path / "blob").write_bytes(b"text\x00\x01\x02")
    with pytest.raises(DataError, match=r"blob: a NUL byte at offset 4"):
        load_source(str(tmp_path / "blob"), tok, **QUIET)
    (tmp_path / "r.jsonl").write_bytes(b'{"text": "a"}\n\x00\n')
    with pytest.raises(DataError, match=r"r.jsonl: a NUL byte at offset 14"):
        load_source(str(tmp_path / "r.jsonl"), tok, **QUIET)


def test_a_tokenizer_without_eos_is_refused_with_the_fix(tmp_path):
    (tmp_path / "two.jsonl").write_text('{"text": "alpha"}\n{"text": "beta"}\n')
    hf = HFTokenizer(models.WordLevel({"[UNK]": 0, "[EOS]": 1, "alpha": 2, "beta": 3}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["[UNK]", "[EOS]"])
    tok = Tokenizer(hf)
    assert tok.eos_id is None
    with pytest.raises(DataError, match=r"no end-of-text token.*eos_token.*tokenizer_config.json"):
        load_source(str(tmp_path / "two.jsonl"), tok, **QUIET)
    ids = _ids(load_source(str(tmp_path / "two.jsonl"), Tokenizer(hf, eos="[EOS]"), **QUIET))
    assert ids == [2, 1, 3, 1]


def test_documents_begin_with_the_bos_a_post_processor_adds(tmp_path, monkeypatch):
    """A Llama-style tokenizer (its post-processor prepends BOS) gets BOS text EOS per document, once
    per document also when a long text file is read in chunks; pretune's own tokenizers get none."""
    from tokenizers import processors

    import pretune.data.sources as sources

    (tmp_path / "two.jsonl").write_text('{"text": "ab"}\n{"text": "ba"}\n')
    (tmp_path / "long.txt").write_text("ab\n" * 40)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 16)  # the text file arrives in several pieces
    plain = train_char(["ab"])
    raw = HFTokenizer.from_str(plain.tok.to_str())
    raw.post_processor = processors.TemplateProcessing(single="<|bos|> $A",
                                                       special_tokens=[("<|bos|>", plain.bos_id)])
    llama = Tokenizer(raw)
    assert llama.prompt_prefix == [llama.bos_id] and plain.prompt_prefix == []
    bos, eos = llama.bos_id, llama.eos_id
    assert _ids(load_source(str(tmp_path / "two.jsonl"), llama, **QUIET)) == [bos, *llama.encode("ab"), eos,
                                                                            bos, *llama.encode("ba"), eos]
    long = _ids(load_source(str(tmp_path / "long.txt"), llama, **QUIET))
    assert long == [bos, *llama.encode("ab\n" * 40), eos]
    assert bos not in _ids(load_source(str(tmp_path / "two.jsonl"), plain, **QUIET))
