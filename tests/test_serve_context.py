"""Serving a model whose context is long (an imported Llama 3.2: 131072 tokens) with a capped KV cache,
BOS on text prompts for tokenizers whose post-processor adds one, and the engine's queue."""

from __future__ import annotations

import io

import pytest
from interop_models import TEXT, pretune_model, save_run
from tokenizers import processors

from pretune.data.tokenizer import Tokenizer, train_bpe, train_char
from pretune.eval.generate import generate
from pretune.serve.engine import Engine, SamplingParams

pytest.importorskip("fastapi", reason="serving needs the serve extra")
pytest.importorskip("httpx", reason="the test client needs httpx")

from test_serve import _threads  # noqa: F401  (few threads for tiny forwards, as there)


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A run whose model has a 10000-token context (longer than serving's default cap of 8192)."""
    tok = train_char(TEXT)
    run = tmp_path_factory.mktemp("long") / "run"
    return save_run(pretune_model(tok, max_seq_len=10_000), tok, run)


def test_a_long_context_is_capped_for_serving(long_run, tmp_path):
    from fastapi.testclient import TestClient

    from pretune.interop.hf import export_hf
    from pretune.serve.server import ServeConfig, create_app, load_served_model

    hf_dir = export_hf(long_run, tmp_path / "hf", log=lambda s: None)
    for path in (long_run, hf_dir):
        notes = []
        model, tok = load_served_model(path, "cpu", None, notes.append)
        assert model.cfg.max_seq_len == 8192 and model.rope_cos.shape[0] == 8192
        assert len(notes) == 1 and "10000" in notes[0] and "max_seq_len=" in notes[0]
        notes.clear()
        assert load_served_model(path, "cpu", 48, notes.append)[0].cfg.max_seq_len == 48 and not notes
        assert load_served_model(path, "cpu", 20_000, notes.append)[0].cfg.max_seq_len == 10_000
        assert "10000" in notes[0]  # no more than the model has
    short, _ = load_served_model(long_run / "model", "cpu", 48, print)
    app = create_app(short, tok, ServeConfig(max_batch=3), "m")
    assert tuple(app.state.engine.cache.k.shape[1:4:2]) == (3, 48)  # rows x slots
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"prompt": "the quick", "max_tokens": 45})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "48" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"prompt": "the quick", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200, r.text


def test_serve_and_chat_take_max_seq_len(long_run, monkeypatch, capsys):
    from pretune.cli import main
    from pretune.errors import ConfigError
    from pretune.serve.server import load_serve_config

    assert load_serve_config(["runs/x", "max_seq_len=4096"])[0].max_seq_len == 4096
    with pytest.raises(ConfigError, match="max_seq_len"):
        load_serve_config(["runs/x", "max_seq_len=1"])
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/exit\n"))
    assert main(["chat", str(long_run), "max_tokens=3", "temperature=0", "device=cpu"]) == 0
    err = capsys.readouterr().err
    assert "10000" in err and "8192" in err and "max_seq_len=" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/exit\n"))
    assert main(["chat", str(long_run), "max_tokens=3", "temperature=0", "device=cpu", "max_seq_len=64"]) == 0
    assert "8192" not in capsys.readouterr().err


def llama_style(chat_template: str | None = None) -> Tokenizer:
    """Byte-level BPE whose post-processor prepends BOS, as Llama 2/3's and Mistral's do."""
    tok = train_bpe(iter(TEXT), vocab_size=300)
    tok.tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A",
                                                           special_tokens=[("<|bos|>", tok.bos_id)])
    return Tokenizer(tok.tok, chat_template=chat_template)


def test_text_prompts_get_the_bos_the_tokenizer_adds_and_chat_prompts_one_bos():
    from fastapi.testclient import TestClient

    from pretune.data.templates import render_chat
    from pretune.serve.server import ServeConfig, create_app

    template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok = llama_style(template)
    model = pretune_model(tok)
    app = create_app(model, tok, ServeConfig(max_batch=2), "m")
    ids = tok.encode("the quick")
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"prompt": "the quick", "max_tokens": 8, "temperature": 0}).json()
        assert r["usage"]["prompt_tokens"] == len(ids) + 1
        assert app.state.engine.history[-1].prompt == [tok.bos_id] + ids
        want = tok.decode(generate(model, [tok.bos_id] + ids, 8, temperature=0, stop_ids={tok.eos_id}))
        assert r["choices"][0]["text"] == want
        c.post("/v1/completions", json={"prompt": "<|bos|>the quick", "max_tokens": 2})  # BOS given: not twice
        assert app.state.engine.history[-1].prompt == [tok.bos_id] + ids
        c.post("/v1/completions", json={"prompt": ids, "max_tokens": 2})  # token ids are taken as they are
        assert app.state.engine.history[-1].prompt == ids
        messages = [{"role": "user", "content": "hi"}]
        r = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2}).json()
        prompt = app.state.engine.history[-1].prompt
        assert prompt == tok.encode(render_chat(messages, tok)) and prompt.count(tok.bos_id) == 1
        assert prompt[0] == tok.bos_id and r["usage"]["prompt_tokens"] == len(prompt)


def test_a_cancelled_queued_job_leaves_the_queue_while_the_batch_is_full():
    tok = train_char(TEXT)
    engine = Engine(pretune_model(tok), tok, max_batch=1)
    engine.stop_ids = set()  # the running job runs to its max_tokens
    events = []
    running = engine.submit(tok.encode("the"), SamplingParams(100, temperature=0), lambda e: None)
    engine.step()
    queued = engine.submit(tok.encode("a"), SamplingParams(5, temperature=0), events.append)
    engine.cancel(queued)
    engine.step()
    assert queued.finish_reason == "cancelled" and events[-1].finish_reason == "cancelled"
    assert not engine.waiting and engine.active == 1 and running.finish_reason is None
