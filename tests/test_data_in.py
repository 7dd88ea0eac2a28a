"""Data in: CSV records read strictly and named by the line where they start, record files streamed,
task directories, label ids, records the template refuses skipped, replaced bytes reported, replay
text with its own field, chat-template features of imported tokenizers, bits per byte for
SentencePiece-style and character tokenizers, and cache keys and writes."""

from __future__ import annotations

import gzip
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("jinja2", reason="chat templates need jinja2 (the hf or eval extra)")

from conftest import FT, pretrain_base, run_cli  # noqa: E402

from pretune.config import Config, DataConfig, load_config  # noqa: E402
from pretune.data import sources  # noqa: E402
from pretune.data.sources import DataError, iter_records  # noqa: E402
from pretune.data.tasks import TaskStats, encode, read_records  # noqa: E402
from pretune.data.templates import ChatTemplateError, render_chat, render_prompt_response  # noqa: E402
from pretune.data.tokenizer import Tokenizer, train_char  # noqa: E402
from pretune.errors import ConfigError  # noqa: E402

ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?<|>[]/_\n"


@pytest.fixture
def tok():
    return train_char([ALPHABET])


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return pretrain_base(tmp_path_factory.mktemp("base"), lines=300, steps=2)


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def classification(**kw) -> Config:
    return Config(task="classification", data=DataConfig(**kw))


# ----------------------------------------------------------------------------- CSV (B1, B9)


def test_a_csv_quote_that_is_never_closed_stops_naming_the_line_where_its_record_starts(tmp_path):
    f = tmp_path / "unterm.csv"
    rows = [f"pos,good film {i}" for i in range(40)]
    rows[2] = 'pos,"great movie 2 inch screen'  # line 4 (the header is line 1)
    f.write_text("label,text\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"unterm.csv:4: a quoted field of the record that starts here is never closed"):
        list(iter_records(f))
    skipped = []
    records = list(iter_records(f, on_error=skipped.append))
    assert [line for line, _ in records] == [2, 3] and len(skipped) == 1
    g = tmp_path / "after_quote.csv"
    g.write_text('text,label\n"ok" said he,pos\nfine,neg\n')  # text after a closing quote
    with pytest.raises(DataError, match=r"after_quote.csv:2: malformed CSV record"):
        list(iter_records(g))
    assert [r["text"] for _, r in iter_records(g, on_error=lambda e: None)] == ["fine"]


def test_csv_errors_name_the_first_line_of_a_record_that_spans_lines(tmp_path):
    f = tmp_path / "ml.csv"
    f.write_text('text,label\n"first line\nsecond line\nthird line",\ngood,pos\n')
    with pytest.raises(DataError, match=r"ml.csv:2: field 'label' is missing or empty"):
        read_records([str(f)], "classification", DataConfig(), TaskStats(), "data.train")
    g = tmp_path / "blank.csv"
    g.write_text('text,label\n\n"a\nb",x,extra\n\nc,y\n')  # blank lines before and between rows
    lines = []
    records = list(iter_records(g, on_error=lambda e: lines.append(str(e))))
    assert lines and lines[0].startswith(f"{g}:3: more fields than the header")
    assert [(line, r["text"], r["__line__"]) for line, r in records] == [(6, "c", 6)]


# ----------------------------------------------------------------------------- streaming (B8)


class _CountingFile(io.FileIO):
    """A file that counts the bytes read from it, however they are read."""

    read_bytes = 0

    def readinto(self, buffer):
        n = super().readinto(buffer)
        _CountingFile.read_bytes += n or 0
        return n

    def readall(self):
        data = super().readall()
        _CountingFile.read_bytes += len(data)
        return data


@pytest.mark.parametrize("name", ["big.jsonl", "big.csv"])
def test_record_files_are_streamed_not_read_whole(tmp_path, monkeypatch, name):
    f = tmp_path / name
    if name.endswith(".jsonl"):
        jsonl(f, [{"text": "lorem ipsum " * 40}] * 8000)
    else:
        f.write_text("text\n" + ("lorem ipsum " * 40 + "\n") * 8000)
    assert f.stat().st_size > 3_000_000
    monkeypatch.setattr(sources, "_open", lambda path: io.BufferedReader(_CountingFile(path)))
    _CountingFile.read_bytes = 0
    first = next(iter_records(f))
    assert first[0] in (1, 2) and _CountingFile.read_bytes < 100_000


def test_streamed_records_keep_the_line_and_offset_of_bad_utf8_and_gzip_too(tmp_path):
    rows = (json.dumps({"text": "fine"}) + "\n").encode() * 3 + b'{"text": "bad \xff here"}\n'
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + rows)  # a BOM, counted in offsets
    offset = 3 + 3 * len(json.dumps({"text": "fine"}) + "\n") + len('{"text": "bad ')
    with pytest.raises(DataError, match=rf"bad.jsonl:4: bytes at offset {offset} are not valid UTF-8"):
        list(iter_records(f, errors="strict"))
    g = tmp_path / "bad.jsonl.gz"
    g.write_bytes(gzip.compress(rows))
    with pytest.raises(DataError, match=rf"bad.jsonl.gz:4: bytes at offset {offset - 3} of the decompressed text"):
        list(iter_records(g, errors="strict"))
    stats = sources.ReadStats()
    assert [r["text"] for _, r in iter_records(g, stats=stats)][-1] == "bad \ufffd here"
    assert stats.replaced == 1 and stats.bytes == len(rows)
    c = tmp_path / "mac.csv"
    c.write_bytes(b"text,label\rold mac,pos\r\"two\rlines\",neg\r")  # lone CRs end lines, as before
    assert [(line, r["text"]) for line, r in iter_records(c)] == [(2, "old mac"), (3, "two\rlines")]


# ----------------------------------------------------------------------------- task directories (B5)


def test_a_directory_of_task_records_passes_over_its_readme_but_a_named_readme_is_refused(tmp_path):
    d = tmp_path / "taskdir"
    d.mkdir()
    jsonl(d / "cls.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    (d / "README.md").write_text("# A dataset card\nlabel,text\n")
    (d / "notes.txt").write_text("notes")
    records = read_records([str(d)], "classification", DataConfig(), TaskStats(), "data.train")
    assert [r["label"] for r in records] == ["pos", "neg"]
    with pytest.raises(DataError, match=r"README.md: task records come as JSONL, CSV or TSV"):
        read_records([str(d / "README.md")], "classification", DataConfig(), TaskStats(), "data.train")
    (d / "cls.jsonl").unlink()
    with pytest.raises(DataError, match=r"holds no file in a known format .* \.jsonl, \.csv and \.tsv"):
        read_records([str(d)], "classification", DataConfig(), TaskStats(), "data.train")


# ----------------------------------------------------------------------------- label ids (B2, B3)


IDS = [{"text": "good good", "label": 1}, {"text": "bad bad", "label": 0}] * 6


def test_a_label_id_out_of_range_is_named_with_its_file_and_line(tmp_path, tok):
    from pretune.finetune import _records

    f = jsonl(tmp_path / "ids_oor.jsonl", IDS + [{"text": "odd", "label": 2}])
    cfg = classification(train=[str(f)], labels=["neg", "pos"], val_fraction=0.0)
    with pytest.raises(DataError, match=r"ids_oor.jsonl:13: label id 2 is out of range for data.labels "
                                        r"\(2 names: neg, pos\)"):
        _records(cfg)
    skip = classification(train=[str(f)], labels=["neg", "pos"], val_fraction=0.0, on_error="skip")
    train, _, _, labels, _ = _records(skip)
    assert [r["label"] for r in train[:2]] == ["pos", "neg"]
    stats = TaskStats()
    examples = encode(train, skip, tok, labels, stats)
    assert len(examples) == 12 and stats.skipped == 1 and "ids_oor.jsonl:13: label id 2" in stats.errors[0]


def test_ids_in_one_file_and_names_in_another_go_together(tmp_path):
    from pretune.finetune import _records

    train = jsonl(tmp_path / "ids.jsonl", IDS)
    test = jsonl(tmp_path / "names.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    cfg = classification(train=[str(train)], test=[str(test)], labels=["neg", "pos"], val_fraction=0.0)
    train_recs, _, test_recs, labels, _ = _records(cfg)
    assert labels == ["neg", "pos"] and [r["label"] for r in train_recs[:2]] == ["pos", "neg"]
    assert [r["label"] for r in test_recs] == ["pos", "neg"]


def test_evaluate_maps_label_ids_to_names_as_fine_tuning_does(tmp_path, base_run):
    f = jsonl(tmp_path / "ids.jsonl", IDS)
    run = tmp_path / "l1"
    assert run_cli("finetune", f"init_from={base_run}", "task=classification", f"data.train={f}",
                   "data.labels=[neg,pos]", f"out_dir={run}", "train.max_steps=2", "data.val_fraction=0",
                   *FT) == 0
    out = tmp_path / "eval.json"
    assert run_cli("evaluate", run, f"data.val={f}", f"out={out}") == 0
    assert json.loads(out.read_text())["examples"] == 12


# ----------------------------------------------------------------------------- skipping (B6)


NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
             "supported') }}{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}"
             "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def test_on_error_skip_skips_a_record_the_template_refuses_or_an_unknown_label(tmp_path, tok):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    system = {"messages": [{"role": "system", "content": "be brief"}, *good["messages"]]}
    f = jsonl(tmp_path / "mixsys.jsonl", [good] * 11 + [system])
    tok.chat_template = NO_SYSTEM
    for on_error in ("fail", "skip"):
        cfg = Config(task="instruction", data=DataConfig(on_error=on_error))
        stats = TaskStats()
        records = read_records([str(f)], "instruction", cfg.data, stats, "data.train")
        if on_error == "fail":
            with pytest.raises(ChatTemplateError, match=r"mixsys.jsonl:12: the chat template refused the messages"):
                encode(records, cfg, tok, None, stats)
            continue
        assert len(encode(records, cfg, tok, None, stats)) == 11 and stats.skipped == 1
    tok.chat_template = "{% for m in messages %}{{ m.content }"  # a template fault stops the run anyway
    with pytest.raises(ChatTemplateError, match="does not compile"):
        encode(records, cfg, tok, None, TaskStats())
    val = jsonl(tmp_path / "val.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": "maybe"}])
    cfg = classification(on_error="skip")
    stats = TaskStats()
    records = read_records([str(val)], "classification", cfg.data, stats, "data.val")
    assert len(encode(records, cfg, tok, ["neg", "pos"], stats)) == 1 and stats.skipped == 1
    with pytest.raises(DataError, match=r"val.jsonl:2: label 'maybe' is not among the training labels"):
        encode(records, classification(), tok, ["neg", "pos"], TaskStats())


# ----------------------------------------------------------------------------- replaced bytes (B7)


def test_replaced_bytes_in_task_records_are_warned_of_and_counted_in_summary(tmp_path, base_run, capsys):
    f = tmp_path / "badutf.jsonl"
    rows = [json.dumps({"text": f"the cat {i}", "label": "a" if i % 2 else "b"}) for i in range(12)]
    f.write_bytes(("\n".join(rows) + "\n").encode() + b'{"text": "bad \xff\xfe bytes", "label": "a"}\n')
    logs = []
    stats = TaskStats()
    read_records([str(f)], "classification", DataConfig(), stats, "data.train", log=logs.append)
    assert stats.replaced == 2 and logs == [f"warning: {f}: 2 invalid UTF-8 byte sequence(s) replaced by U+FFFD"]
    out = tmp_path / "ft"
    assert run_cli("finetune", f"init_from={base_run}", "task=classification", f"data.train={f}", f"out_dir={out}",
                   "train.max_steps=2", *FT) == 0
    assert "2 invalid UTF-8 byte sequence(s) replaced" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["replaced_chars"] == 2


# ----------------------------------------------------------------------------- replay field (B4)


def test_replay_text_is_read_with_its_own_field(tmp_path, tok):
    from pretune.finetune import _replay_sampler

    general = jsonl(tmp_path / "general.jsonl", [{"text": "the cat sat on the mat. " * 4}] * 20)
    body = jsonl(tmp_path / "body.jsonl", [{"body": "a dog ran by the river. " * 4}] * 20)
    base = ["task=classification", "data.text_field=sentence", "finetune.replay_ratio=0.25",
            f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = load_config(Config, overrides=base + [f"finetune.replay=[{general}]"])
    assert cfg.finetune.replay_text_field == "text"
    assert _replay_sampler(cfg, tok, 16).batch(0, 4).shape == (4, 17)
    cfg = load_config(Config, overrides=base + [f"finetune.replay=[{body}]", "finetune.replay_text_field=body"])
    assert _replay_sampler(cfg, tok, 16).batch(0, 4).shape == (4, 17)
    cfg = load_config(Config, overrides=base + [f"finetune.replay=[{body}]"])  # the error names the replay's key
    with pytest.raises(DataError, match=r"body.jsonl:1: record has no field 'text' .*set finetune.replay_text_field"):
        _replay_sampler(cfg, tok, 16)


# ----------------------------------------------------------------------------- duplicate labels (B12)


@pytest.mark.parametrize("labels", ["[neg,pos,neg]", "['neg','pos',' neg']"])
def test_duplicate_labels_are_refused_naming_the_key(labels):
    with pytest.raises(ConfigError, match=r"data.labels=.* lists 'neg' more than once"):
        load_config(Config, overrides=["task=classification", f"data.labels={labels}"])


# ----------------------------------------------------------------------------- templates (B13, B14)


def test_the_generation_tag_of_transformers_renders_its_body(tok):
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                         "{% endgeneration %}{% else %}<{{ m.content }}>{% endif %}{% endfor %}")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert render_chat(msgs, tok, add_generation_prompt=False) == "<Hi>Yo"
    assert render_prompt_response(msgs, tok) == ("<Hi>", "Yo")


def test_extra_message_fields_reach_the_template(tok):
    tok.chat_template = (
        "{%- for m in messages %}{{- '<|' + m.role + '|>' }}{%- if m.reasoning_content is string %}"
        "{{- '<think>' + m.reasoning_content + '</think>' }}{%- endif %}{{- m.content + '\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}")
    msgs = [{"role": "user", "content": "2+2?", "name": "ann"},
            {"role": "assistant", "content": "4", "reasoning_content": "two and two"}]
    full = "<|user|>2+2?\n<|assistant|><think>two and two</think>4\n"
    assert render_chat(msgs, tok, add_generation_prompt=False) == full
    # the reasoning is generated after the generation prompt: part of the response, trained on
    assert render_prompt_response(msgs, tok) == ("<|user|>2+2?\n<|assistant|>", "<think>two and two</think>4\n")


# ----------------------------------------------------------------------------- bits per byte (B10, B11)


def _sentencepiece_tokenizer(tmp_path, docs) -> Tokenizer:
    """A tokenizer.json laid out as Llama 2's: Prepend("▁") + Replace(" ", "▁"), byte fallback, a
    decoder that strips the leading space, and a post-processor that puts <s> first."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, processors, trainers

    hf = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=[f"<0x{i:02X}>" for i in range(256)])
    hf.train_from_iterator(docs, trainer)
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", hf.token_to_id("<s>"))])
    d = tmp_path / "sptok"
    d.mkdir()
    hf.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return Tokenizer.load(d)


class _Uniform(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, x):
        return torch.zeros(*x.shape, self.vocab)


def _scored_bytes(tok, source: str, tmp_path) -> tuple[int, np.ndarray]:
    from pretune.data.shards import load_source
    from pretune.eval.evaluate import lm_metrics, lm_windows

    store = load_source(source, tok, cache_dir=str(tmp_path / "cache"), log=lambda m: None)
    r = lm_metrics(_Uniform(tok.vocab_size), lm_windows([store], 16), tok.token_bytes, torch.device("cpu"))
    ids = np.concatenate([np.asarray(s.array[s.start:s.end]) for s in store.spans])
    return r["bytes"], ids


def test_bits_per_byte_count_the_texts_bytes_with_a_sentencepiece_tokenizer(tmp_path):
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "café", "naïve"]
    docs = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(200)]
    tok = _sentencepiece_tokenizer(tmp_path, docs)
    f = jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    nbytes, _ = _scored_bytes(tok, str(f), tmp_path)
    assert nbytes == sum(len(d.encode()) for d in docs)  # the first token (<s>) is no target and has no bytes
    assert tok.prepends_space and tok.prompt_prefix == [tok.tok.token_to_id("<s>")]


def test_a_text_read_in_chunks_is_tokenised_as_one_text_without_a_space_at_each_cut(tmp_path, monkeypatch):
    rng = random.Random(1)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "café", "naïve"]
    lines = [" ".join(rng.choice(words) for _ in range(6)) + "\n" for _ in range(60)]
    tok = _sentencepiece_tokenizer(tmp_path, [line.strip() for line in lines])  # a line feed is a byte token
    text = "".join(lines)
    f = tmp_path / "long.txt"
    f.write_text(text)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 100)  # many chunks, each cut after a line break
    nbytes, ids = _scored_bytes(tok, str(f), tmp_path)
    whole = tok.tok.encode(text, add_special_tokens=False).ids
    assert ids.tolist() == tok.prompt_prefix + whole + [tok.eos_id]
    assert nbytes == len(text.encode())


def test_a_literal_metaspace_character_counts_its_three_bytes_with_the_char_tokenizer(tmp_path):
    text = "a \u2581 b é 漢 😀\r\n" * 20
    tok = train_char([text])
    assert sum(tok.token_bytes[i] for i in tok.encode(text)) == len(text.encode())
    assert not tok.prepends_space
    f = tmp_path / "u.txt"
    f.write_text(text, newline="")
    nbytes, _ = _scored_bytes(tok, str(f), tmp_path)
    assert nbytes == len(text.encode()) - len(text[0].encode())  # every token but the first is a target


# ----------------------------------------------------------------------------- cache keys and writes (B15)


def test_the_text_field_does_not_key_plain_text_sources(tmp_path, corpus):
    from pretune.data.corpus import build_tokenizer
    from pretune.data.shards import load_source

    cache = str(tmp_path / "cache")
    logs = []
    for field in ("text", "body"):
        tok = build_tokenizer(DataConfig(train=[str(corpus)], tokenizer="bpe", vocab_size=300, text_field=field,
                                         cache_dir=cache), log=logs.append)
    assert sum("trained a bpe tokenizer" in m for m in logs) == 1
    logs.clear()
    load_source(str(corpus), tok, "text", cache_dir=cache, log=logs.append)
    load_source(str(corpus), tok, "body", cache_dir=cache, log=logs.append)
    assert sum(m.startswith("tokenised") for m in logs) == 1
    records = jsonl(tmp_path / "r.jsonl", [{"text": "the cat", "body": "a dog"}])
    load_source(str(records), tok, "text", cache_dir=cache, log=logs.append)
    load_source(str(records), tok, "body", cache_dir=cache, log=logs.append)
    assert sum(m.startswith("tokenised") for m in logs) == 3  # records: the field decides the text


def test_the_tokenizer_cache_is_written_whole_or_not_at_all(tmp_path, corpus, monkeypatch):
    from pretune.data.corpus import build_tokenizer

    d = DataConfig(train=[str(corpus)], tokenizer="char", cache_dir=str(tmp_path / "cache"))
    real_save = Tokenizer.save

    def killed(self, directory):  # a run killed half-way through writing tokenizer.json
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.json").write_text('{"version": "1.0", "trunc')
        raise KeyboardInterrupt

    monkeypatch.setattr(Tokenizer, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        build_tokenizer(d)
    monkeypatch.setattr(Tokenizer, "save", real_save)
    assert not list((tmp_path / "cache" / "tokenizers").glob("*/tokenizer.json"))
    tok = build_tokenizer(d)
    cached = next((tmp_path / "cache" / "tokenizers").glob("*/tokenizer.json"))
    cached.write_text('{"version": "1.0", "trunc')  # cut short by a run of an earlier version
    logs = []
    assert build_tokenizer(d, log=logs.append).encode("the cat") == tok.encode("the cat")
    assert any("unreadable" in m for m in logs)


def test_two_processes_training_the_same_tokenizer_at_once_both_go_on(tmp_path, corpus, monkeypatch):
    """Ranks of one run (or parallel runs) may train the same tokenizer together: the one whose
    rename finds the other's directory already in place uses it instead of failing."""
    import contextlib

    from pretune.data import corpus as corpus_mod

    d = DataConfig(train=[str(corpus)], tokenizer="char", cache_dir=str(tmp_path / "cache"))
    first = corpus_mod.build_tokenizer(d)
    cached = next((tmp_path / "cache" / "tokenizers").glob("*/tokenizer.json")).parent
    (cached / "tokenizer.json").rename(tmp_path / "kept.json")  # not cached yet, as at the race's start

    @contextlib.contextmanager
    def raced(final):  # the other process's rename lands first: ours finds the name taken
        yield tmp_path / "mine"
        (tmp_path / "kept.json").rename(cached / "tokenizer.json")
        raise OSError(39, "Directory not empty")

    (tmp_path / "mine").mkdir()
    monkeypatch.setattr(corpus_mod, "atomic_dir", raced)
    assert corpus_mod.build_tokenizer(d).encode("the cat") == first.encode("the cat")
