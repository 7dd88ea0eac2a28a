import pytest

from pretune.data.tokenizer import EOS, Tokenizer, train_bpe, train_char

TEXT = "Hello, world!\nCafé — naïve façade. 1234 tabs\tand  spaces\n\nend"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_round_trip_save_load_and_byte_counts(tmp_path, kind):
    tok = train_char([TEXT]) if kind == "char" else train_bpe(iter([TEXT] * 20), 300)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert sum(tok.token_bytes[i] for i in ids) == len(TEXT.encode("utf-8"))
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode(TEXT) == ids and again.eos_id == tok.eos_id and again.pad_id == tok.pad_id
    assert tok.token_bytes[tok.eos_id] == 0 and tok.tok.id_to_token(tok.eos_id) == EOS


def test_special_tokens_are_not_split_and_skipped_on_decode():
    tok = train_char(["abc"])
    assert {tok.bos_id, tok.eos_id, tok.pad_id} <= tok.special_ids
    assert tok.decode([tok.bos_id] + tok.encode("cab") + [tok.eos_id]) == "cab"


def test_char_unknown_characters_map_to_unk():
    tok = train_char(["abc"])
    ids = tok.encode("abz")
    assert len(ids) == 3 and ids[2] == tok.tok.token_to_id("<|unk|>")


def test_transformers_loads_our_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is an optional extra")
    tok = train_char([TEXT])
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.encode(TEXT, add_special_tokens=False) == tok.encode(TEXT)
    assert hf.decode(tok.encode(TEXT)) == TEXT


def test_load_finds_the_chat_template_wherever_transformers_keeps_it(tmp_path):
    import json

    from pretune.data.tokenizer import Tokenizer, train_char

    tok = train_char(["hello world"])
    tok.save(tmp_path)
    assert Tokenizer.load(tmp_path).chat_template is None
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert Tokenizer.load(tmp_path / "tokenizer.json").chat_template == "{{ messages[0]['content'] }}"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json {{ x }}"}))
    assert Tokenizer.load(tmp_path).chat_template == "json {{ x }}"
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.load(tmp_path).chat_template == "d"
