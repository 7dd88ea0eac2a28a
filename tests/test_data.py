import json

import numpy as np
import pytest

from pretune.config import DataConfig
from pretune.data.corpus import PretrainData, build_tokenizer, load_corpus
from pretune.data.shards import BatchSampler, load_source
from pretune.data.sources import DataError, iter_records
from pretune.data.tokenizer import train_char


def test_shards_are_uint16_with_eos_between_documents(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "b.txt").write_text("de")
    tok = train_char(["abcde"])
    store = load_source(str(tmp_path), tok, log=lambda m: None)
    arr = np.concatenate([np.asarray(s.array[s.start:s.end]) for s in store.spans])
    assert arr.dtype == np.uint16
    assert arr.tolist() == tok.encode("abc") + [tok.eos_id] + tok.encode("de") + [tok.eos_id]


def test_second_load_uses_the_cache(tmp_path, corpus):
    tok = train_char([corpus.read_text()])
    logs = []
    cache = str(tmp_path / "cache")  # its own, whatever other tests tokenised before
    load_source(str(corpus), tok, cache_dir=cache, log=logs.append)
    load_source(str(corpus), tok, cache_dir=cache, log=logs.append)
    assert sum("tokenised" in m for m in logs) == 1
    corpus.write_text(corpus.read_text() + "new text\n")  # content changed -> tokenised again
    load_source(str(corpus), tok, cache_dir=cache, log=logs.append)
    assert sum("tokenised" in m for m in logs) == 2


def test_the_same_bytes_read_as_records_and_as_text_are_cached_apart(tmp_path):
    records = "".join(json.dumps({"text": f"line {i}", "id": i}) + "\n" for i in range(5))
    (tmp_path / "r.jsonl").write_text(records)
    (tmp_path / "r.txt").write_text(records)
    tok = train_char([records])
    as_records = load_source(str(tmp_path / "r.jsonl"), tok, log=lambda m: None)
    as_text = load_source(str(tmp_path / "r.txt"), tok, log=lambda m: None)
    assert as_records.n_tokens == sum(len(f"line {i}") + 1 for i in range(5))
    assert as_text.n_tokens == len(records) + 1


def test_shards_roll_over_and_split_holds_out_the_end(tmp_path):
    text = "abcdefghij" * 100
    (tmp_path / "c.txt").write_text(text)
    tok = train_char([text])
    store = load_source(str(tmp_path / "c.txt"), tok, shard_tokens=128, log=lambda m: None)
    assert len(store.spans) == 8 and store.n_tokens == 1001
    train, val = store.split(0.1)
    assert val.n_tokens == 100 and train.n_tokens == 901
    tail = np.concatenate([np.asarray(s.array[s.start:s.end]) for s in val.spans])
    assert tail[-1] == tok.eos_id and tail[:-1].tolist() == tok.encode(text[-99:])


def test_sampler_is_a_function_of_seed_and_step_and_ranks_are_disjoint(tmp_path, corpus):
    tok = train_char([corpus.read_text()])
    store = load_source(str(corpus), tok, log=lambda m: None)
    s = BatchSampler([store], None, 16, seed=3)
    assert np.array_equal(s.batch(7, 8), BatchSampler([store], None, 16, seed=3).batch(7, 8))
    assert not np.array_equal(s.batch(7, 8), s.batch(8, 8))
    whole = s.batch(5, 8)
    r0, r1 = s.batch(5, 8, rank=0, world=2), s.batch(5, 8, rank=1, world=2)
    assert np.array_equal(whole[0::2], r0) and np.array_equal(whole[1::2], r1)


def test_mixture_follows_weights(tmp_path):
    (tmp_path / "a.txt").write_text("a" * 5000)
    (tmp_path / "b.txt").write_text("b" * 5000)
    d = DataConfig(train=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], weights=[0.75, 0.25],
                   tokenizer="char")
    tok = build_tokenizer(d, log=lambda m: None)
    corpus = load_corpus(d, tok, 8, log=lambda m: None)
    data = PretrainData(corpus, 8, 400, None, seed=0)
    rows = data.micro_batches(0, 0, 1)[0]["input_ids"]
    share_a = (rows[:, 0] == tok.encode("a")[0]).float().mean().item()
    assert 0.68 < share_a < 0.82


def test_empty_corpus_and_missing_file_are_clear_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="holds no text"):
        build_tokenizer(DataConfig(train=[str(tmp_path / "empty.txt")], tokenizer="char"))
    tok = train_char(["abc"])
    with pytest.raises(DataError, match="holds no text"):
        load_source(str(tmp_path / "empty.txt"), tok, log=lambda m: None)
    with pytest.raises(DataError, match=r"data.train: .*nope.txt does not exist"):
        load_source(str(tmp_path / "nope.txt"), tok, log=lambda m: None)


def test_invalid_utf8_is_replaced_and_counted_or_fails_with_offset(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"good text\n" * 3 + b"bad \xff\xfe byte\n" + b"more\n")
    tok = train_char(["good text bad byte more\ufffd\n"])
    logs = []
    store = load_source(str(f), tok, log=logs.append)
    assert store.stats["replaced_chars"] == 2
    assert any("2 invalid UTF-8" in m for m in logs)
    with pytest.raises(DataError, match=r"bad.txt: bytes at offset 34 are not valid UTF-8"):
        load_source(str(f), tok, errors="strict", log=lambda m: None)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n" + '{"text": "broken"\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        list(iter_records(f))
    g = tmp_path / "e.jsonl"
    g.write_text(json.dumps({"body": "x"}) + "\n")
    tok = train_char(["x"])
    with pytest.raises(DataError, match=r"e.jsonl:1: record has no field 'text'"):
        load_source(str(g), tok, log=lambda m: None)


def test_records_without_a_suffix_are_tsv_when_the_header_has_a_tab_and_tsv_has_no_quoting(tmp_path):
    (tmp_path / "SMSCollection").write_text('Label\tSMS\nham\t"Hi" she said, ok\nham\t"Bye\nspam\tWIN a prize\n')
    (tmp_path / "plain").write_text("text,label\n\"a\tb\",x\n")
    # TSV has no quoting: a leading quote is text, and an unmatched one does not swallow the next lines
    assert [r["SMS"] for _, r in iter_records(tmp_path / "SMSCollection")] == ['"Hi" she said, ok', '"Bye', "WIN a prize"]
    assert [r["text"] for _, r in iter_records(tmp_path / "plain")] == ["a\tb"]


def test_jsonl_and_csv_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["ab", "ba"]) + "\n")
    (tmp_path / "b.csv").write_text('text,label\n"a, b",x\n')
    tok = train_char(["ab, "])
    store = load_source(str(tmp_path), tok, log=lambda m: None)
    arr = np.asarray(store.spans[0].array).tolist()
    e = tok.eos_id
    assert arr == tok.encode("ab") + [e] + tok.encode("ba") + [e] + tok.encode("a, b") + [e]


def test_text2text_takes_sentence_lists_and_several_references(tmp_path):
    """SciTLDR's layout: the source as a list of sentences, several reference targets; a wrong type is
    named with its file, line and field."""
    from pretune.data.tasks import TaskStats, normalise, read_records
    from pretune.eval import metrics as M

    d = DataConfig()
    r = normalise({"source": ["First one.", "Second one."], "target": ["tl;dr a", "tl;dr b"]}, "text2text", d,
                  tmp_path / "x.jsonl", 3)
    assert r["messages"][0]["content"] == "First one. Second one."
    assert r["messages"][1]["content"] == "tl;dr a" and r["references"] == ["tl;dr a", "tl;dr b"]
    with pytest.raises(DataError, match=r"x.jsonl:4: field 'source' holds dict .* expected text"):
        normalise({"source": {"a": 1}, "target": "t"}, "text2text", d, tmp_path / "x.jsonl", 4)
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"source": ["s."], "target": ["one", "two"]}) + "\n")
    assert read_records([str(f)], "text2text", d, TaskStats(), "data.train")[0]["references"] == ["one", "two"]

    # any reference counts: exact match, and the best reference for ROUGE and chrF
    assert M.exact_match(["two"], [["one", "two"]]) == 1.0 and M.exact_match(["two"], ["one"]) == 0.0
    assert M.rouge(["the cat sat"], [["a dog ran", "the cat sat"]])["rouge_l"] == 1.0
    assert M.chrf(["the cat sat"], [["a dog ran", "the cat sat"]]) == M.chrf(["the cat sat"], ["the cat sat"])
    assert M.chrf(["x y", "the cat sat"], [["x y"], ["dog", "the cat sat"]]) == 100.0


def _logs_of(spec, tok, **kw):
    logs = []
    store = load_source(str(spec), tok, log=logs.append, **kw)
    return store, logs


def test_gzipped_text_and_records_are_read_decompressed_and_cached_by_content(tmp_path):
    import gzip

    text = "hello gzip world\n" * 20
    (tmp_path / "plain.txt").write_text(text)
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "r.jsonl.gz").write_bytes(gzip.compress(b'{"text": "ab"}\n{"text": "ba"}\n'))
    tok = build_tokenizer(DataConfig(train=[str(tmp_path / "a.txt.gz")], tokenizer="char"))
    assert tok.vocab_size == 4 + len(set(text))  # trained on the text, not on compressed bytes
    plain, _ = _logs_of(tmp_path / "plain.txt", tok)
    packed, logs = _logs_of(tmp_path / "a.txt.gz", tok)
    assert np.asarray(packed.spans[0].array).tolist() == np.asarray(plain.spans[0].array).tolist()
    assert packed.stats["bytes"] == len(text)
    records, _ = _logs_of(tmp_path / "r.jsonl.gz", tok)
    assert records.n_tokens == 6  # two records of 2 characters, each with its EOS
    assert any("tokenised" in m for m in logs)
    assert not any("tokenised" in m for m in _logs_of(tmp_path / "a.txt.gz", tok)[1])
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress((text + "world\n").encode()))  # changed -> again
    assert any("tokenised" in m for m in _logs_of(tmp_path / "a.txt.gz", tok)[1])

    (tmp_path / "bad.txt.gz").write_bytes(b"not compressed at all\n")
    with pytest.raises(DataError, match=r"bad.txt.gz: not a readable gzip file"):
        load_source(str(tmp_path / "bad.txt.gz"), tok, log=lambda m: None)
    (tmp_path / "u.txt.gz").write_bytes(gzip.compress(b"hello\n\xff"))
    with pytest.raises(DataError, match=r"u.txt.gz: bytes at offset 6 of the decompressed text"):
        load_source(str(tmp_path / "u.txt.gz"), tok, errors="strict", log=lambda m: None)


def test_binary_and_unknown_compressed_formats_are_refused_but_odd_text_names_are_read(tmp_path):
    import gzip

    tok = train_char(["plain text"])
    for name in ("data.json", "x.zip", "x.parquet", "model.safetensors", "a.npy", "x.bz2", "x.tar.gz",
                 "x.json.gz", "x.raw.gz", "x.gz"):
        (tmp_path / name).write_bytes(gzip.compress(b"plain text") if name.endswith(".gz") else b"{}")
        with pytest.raises(DataError, match=rf"data.train: .*{name} is .*give \.txt, .*\.jsonl"):
            load_source(str(tmp_path / name), tok, log=lambda m: None)
    with pytest.raises(DataError, match=r"data.json is a JSON document"):  # a glob match too
        load_source(str(tmp_path / "data.*"), tok, log=lambda m: None)
    for name in ("input", "corpus.raw"):  # no suffix or an unusual one: plain text, as before
        (tmp_path / name).write_text("plain text")
        assert load_source(str(tmp_path / name), tok, log=lambda m: None).n_tokens == 11
    # a directory passes over what it does not read (as before) and takes gzipped text
    d = tmp_path / "dir"
    d.mkdir()
    (d / "meta.json").write_text("{}")
    (d / "a.txt.gz").write_bytes(gzip.compress(b"plain text"))
    assert load_source(str(d), tok, log=lambda m: None).n_tokens == 11


def test_a_bom_is_dropped_from_text_files_and_offsets_still_count_it(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbfab\n")
    tok = train_char(["ab\n\ufeff"])
    store = load_source(str(f), tok, log=lambda m: None)
    assert np.asarray(store.spans[0].array).tolist() == tok.encode("ab\n") + [tok.eos_id]
    g = tmp_path / "bad.md"
    g.write_bytes(b"\xef\xbb\xbfab\n\xff")
    with pytest.raises(DataError, match=r"bad.md: bytes at offset 6 are not valid UTF-8"):
        load_source(str(g), tok, errors="strict", log=lambda m: None)


def test_prepare_uses_the_tokenizer_pretrain_will_use_so_pretrain_reuses_its_shards(tmp_path, corpus, capsys):
    from conftest import TINY, run_cli

    from pretune.data.tokenizer import Tokenizer

    parent = tmp_path / "parent"
    steps = ["train.max_steps=1", "train.eval_every=0", "train.save_every=0"]
    assert run_cli("pretrain", f"data.train={corpus}", f"out_dir={parent}", *TINY, *steps) == 0
    n_parent = Tokenizer.load(parent).vocab_size
    other = tmp_path / "other.txt"
    other.write_text("the cat sat on the mat.\n" * 200)  # fewer characters: a char tokenizer of its own differs
    capsys.readouterr()
    assert run_cli("prepare", f"init_from={parent}", f"data.train={other}", *TINY) == 0
    out = capsys.readouterr().out
    assert f"tokenizer: {n_parent} tokens" in out and "tokenised" in out
    assert run_cli("pretrain", f"init_from={parent}", f"data.train={other}", f"out_dir={tmp_path / 'cpt'}",
                   *TINY, *steps) == 0
    assert "tokenised" not in capsys.readouterr().out  # the shards prepare wrote
    assert run_cli("prepare", f"resume={parent}") == 0  # a resumed run's own tokenizer
    out = capsys.readouterr().out
    assert f"tokenizer: {n_parent} tokens" in out and "tokenised" not in out
