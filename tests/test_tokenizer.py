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


def sentencepiece_like() -> Tokenizer:
    """A Metaspace BPE with <unk>, <s>, </s> and a post-processor that prepends <s>, like Llama 2's."""
    from tokenizers import SentencePieceBPETokenizer, processors
    from tokenizers import Tokenizer as HFTokenizer

    sp = SentencePieceBPETokenizer(unk_token="<unk>")
    sp.train_from_iterator([TEXT] * 20, vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                           show_progress=False)
    raw = HFTokenizer.from_str(sp.to_str())
    raw.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", raw.token_to_id("<s>"))])
    return Tokenizer(raw)


def test_prompts_get_bos_only_from_a_post_processor_that_adds_it(tmp_path):
    for tok in (train_char([TEXT]), train_bpe(iter([TEXT] * 20), 300)):  # pretune's own: no BOS added
        assert tok.tok.post_processor is None and tok.prompt_prefix == []
        assert tok.encode_prompt("Hello, world") == tok.encode("Hello, world")
        tok.save(tmp_path)
        assert Tokenizer.load(tmp_path).encode_prompt("Hello") == tok.encode("Hello")
    sp = sentencepiece_like()
    bos, ids = sp.bos_id, sp.encode("Hello, world")
    assert sp.tok.id_to_token(bos) == "<s>" and sp.prompt_prefix == [bos]
    assert sp.encode_prompt("Hello, world") == [bos] + ids == sp.tok.encode("Hello, world").ids
    assert sp.encode_prompt("<s>Hello, world") == [bos] + ids  # a text that starts with BOS gets no second
    assert sp.encode_prompt("") == [bos] and sp.encode("Hello, world") == ids  # encode() never adds it
    sp.save(tmp_path / "sp")
    assert Tokenizer.load(tmp_path / "sp").encode_prompt("Hello, world") == [bos] + ids


def test_saved_config_names_the_tokenizers_own_unknown_token(tmp_path):
    import json

    for tok, unk in ((sentencepiece_like(), "<unk>"), (train_char([TEXT]), "<|unk|>")):
        tok.save(tmp_path)
        assert json.loads((tmp_path / "tokenizer_config.json").read_text())["unk_token"] == unk
    transformers = pytest.importorskip("transformers", reason="transformers is an optional extra")
    sentencepiece_like().save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.unk_token, hf.unk_token_id, hf.bos_token_id) == ("<unk>", 0, 1)


def test_an_unknown_token_counts_one_byte_and_its_loss_counts_in_bits_per_byte():
    import math

    import numpy as np
    import torch

    from pretune.eval.evaluate import lm_metrics

    tok = train_char(["abc"])
    unk = tok.tok.token_to_id("<|unk|>")
    assert tok.token_bytes[unk] == 1 and tok.token_bytes[tok.eos_id] == 0
    ids = tok.encode("abz")
    assert sum(tok.token_bytes[i] for i in ids) == 3

    class FavoursA(torch.nn.Module):  # every position predicts "a" with high probability
        def forward(self, x):
            logits = torch.zeros(*x.shape, tok.vocab_size)
            logits[..., tok.encode("a")[0]] = 5.0
            return logits

    a = tok.encode("a")[0]
    window = np.array([a, *ids, tok.eos_id])  # targets: a, b, z (unknown), EOS
    r = lm_metrics(FavoursA(), [window], tok.token_bytes, torch.device("cpu"))
    assert r["tokens"] == 4 and r["bytes"] == 3  # a, b and z: EOS carries no bytes
    nll_a = math.log(math.exp(5.0) + tok.vocab_size - 1) - 5.0
    nll_other = nll_a + 5.0  # the loss of any target but "a"
    assert math.isclose(r["bpb"], (nll_a + 2 * nll_other) / math.log(2) / 3, rel_tol=1e-6)  # z's loss counts
