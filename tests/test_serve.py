"""Serving: the batching engine against single-request generation, the OpenAI-compatible server through
the official `openai` client on a real uvicorn server, and `pretune chat` with fake stdin."""

from __future__ import annotations

import io
import socket
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from pretune.data.templates import render_chat
from pretune.data.tokenizer import train_char
from pretune.eval.generate import TextStream, generate
from pretune.model.config import ModelConfig
from pretune.model.gpt import GPT
from pretune.model.io import load_model, save_model_dir
from pretune.serve.engine import Engine, SamplingParams, generate_all

TEXT = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?<|>\n"
KEY = "sk-test-key"


def tiny_model(tmp_path):
    """GPT tiny + char tokenizer, saved and loaded back; weights scaled so that greedy choices are
    not near-ties (untrained logits are all close to zero)."""
    torch.manual_seed(0)
    tok = train_char([TEXT])
    model = GPT(ModelConfig(preset="tiny", vocab_size=tok.vocab_size))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(6)
    save_model_dir(model, tmp_path / "tiny", tokenizer=tok)
    return load_model(tmp_path / "tiny")


@pytest.fixture(scope="module", autouse=True)
def _threads(cpu_threads):
    """Few threads: on a busy machine, extra intra-op threads make tiny forwards many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(cpu_threads)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_tok(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("serve"))


def reference(model, tok, ids, n, stop_at_eos=True, **kw) -> str:
    return tok.decode(generate(model, ids, n, stop_ids={tok.eos_id} if stop_at_eos else set(), slide=False, **kw))


def drain(engine, sinks):
    while engine.rows or engine.waiting:
        engine.step()
    return {k: "".join(e.text for e in v) for k, v in sinks.items()}


# ----------------------------------------------------------------------------- engine


def test_batched_equals_single_with_joins(model_tok):
    model, tok = model_tok
    prompts = ["a", "hello world", "The quick brown fox", "xy", "zzz top. a b c d e f", "Q?"]
    engine = Engine(model, tok, max_batch=3)
    sinks = {i: [] for i in range(len(prompts))}
    params = SamplingParams(max_tokens=24, temperature=0)
    for i in (0, 1):
        engine.submit(tok.encode(prompts[i]), params, sinks[i].append)
    for _ in range(3):
        engine.step()
    for i in range(2, len(prompts)):  # join a running batch, wait for rows, then a fresh batch
        engine.submit(tok.encode(prompts[i]), params, sinks[i].append)
    got = drain(engine, sinks)
    assert engine.stats["prefills"] >= 3 and engine.stats["max_active"] == 3
    assert engine.stats["rows_stepped"] > engine.stats["steps"]  # rows really shared forwards
    for i, p in enumerate(prompts):
        assert got[i] == reference(model, tok, tok.encode(p), 24, temperature=0), p
        assert sinks[i][-1].finish_reason in ("stop", "length")


def test_generate_all_equals_one_at_a_time(model_tok):
    """Evaluation's batched greedy decoding gives each prompt's own tokens, EOS stops included,
    for prompts of many lengths, one longer than the context."""
    model, tok = model_tok
    ctx = model.cfg.max_seq_len
    prompts = [tok.encode(p) for p in ["a", "hello world", "\n", "The quick brown fox", "xy", "Q?", "zzz top."]]
    prompts.append(tok.encode("abc " * (ctx // 4 + 3)))  # longer than the context: its tail is kept,
    # as much of it as leaves room for the 20 new tokens
    want = [generate(model, ids[-(ctx - 20):], 20, temperature=0, stop_ids={tok.eos_id}, slide=False)
            for ids in prompts]
    got = generate_all(model, tok, prompts, 20, max_batch=3)
    assert got == want
    assert got[2] == [] and len(got[0]) == 20  # EOS at once (this model after a newline); the full 20
    assert len(prompts[-1]) > ctx and len(generate(model, prompts[-1], 20, temperature=0, slide=False)) <= 1
    assert generate_all(model, tok, prompts[:2], 0) == [[], []]


def test_generate_all_sizes_its_cache_to_the_prompts(model_tok, monkeypatch):
    """Evaluation knows its prompts: the cache holds the longest and its answer, not the whole
    context of the model times the batch (an imported model's context can be 128k tokens)."""
    from pretune.serve import engine as E

    model, tok = model_tok
    sizes, empty = [], E.KVCache.empty
    monkeypatch.setattr(E.KVCache, "empty", lambda cfg, b, n, *a: sizes.append(n) or empty(cfg, b, n, *a))
    prompts = [tok.encode(p) for p in ["a", "hello world", "xy"]]
    want = [generate(model, ids, 6, temperature=0, stop_ids={tok.eos_id}, slide=False) for ids in prompts]
    sizes.clear()
    assert generate_all(model, tok, prompts, 6, max_batch=2) == want
    assert sizes == [len(prompts[1]) + 6] and sizes[0] < model.cfg.max_seq_len


def test_admission_at_the_next_step(model_tok):
    """Jobs join the running batch at the next step whatever their prompt's length or max_tokens
    (tests/test_serve_fixes.py checks more of it)."""
    model, tok = model_tok
    engine = Engine(model, tok, max_batch=4)
    engine.stop_ids = set()  # every job runs to max_tokens, so the batch's life is known
    texts = {"a": ("Start", 40), "long": ("a prompt longer than the slot", 10), "short": ("hi", 10),
             "big": ("x", 250), "late": ("y", 5)}
    sinks = {k: [] for k in texts}
    jobs = {}

    def submit(k):
        prompt, n = texts[k]
        jobs[k] = engine.submit(tok.encode(prompt), SamplingParams(n, temperature=0), sinks[k].append)

    submit("a")
    engine.step()
    submit("long")
    submit("short")
    engine.step()
    assert not engine.waiting and len(engine.rows) == 3  # "long" too, though longer than "a" so far
    for _ in range(30):
        engine.step()
    submit("big")
    submit("late")
    engine.step()
    assert not engine.waiting and len(engine.rows) == 3  # "big" fits its row's context: it need not wait
    got = drain(engine, sinks)
    for k, (prompt, n) in texts.items():
        assert got[k] == reference(model, tok, tok.encode(prompt), n, stop_at_eos=False, temperature=0), k
        assert jobs[k].n_tokens == n


def test_seeded_sampling_matches_and_cancel(model_tok):
    model, tok = model_tok
    engine = Engine(model, tok, max_batch=4)
    sinks = {i: [] for i in range(4)}
    nucleus = dict(temperature=1.0, top_p=0.9)
    engine.submit(tok.encode("seeded one"), SamplingParams(20, seed=5, **nucleus), sinks[0].append)
    engine.submit(tok.encode("same settings"), SamplingParams(20, seed=6, **nucleus), sinks[3].append)
    engine.submit(tok.encode("two"), SamplingParams(20, temperature=0.7, seed=9), sinks[1].append)
    victim = engine.submit(tok.encode("cancel me"), SamplingParams(50, temperature=0), sinks[2].append)
    engine.step()
    engine.cancel(victim)
    got = drain(engine, sinks)
    assert got[0] == reference(model, tok, tok.encode("seeded one"), 20, temperature=1.0, top_p=0.9, seed=5)
    assert got[1] == reference(model, tok, tok.encode("two"), 20, temperature=0.7, seed=9)
    assert got[3] == reference(model, tok, tok.encode("same settings"), 20, temperature=1.0, top_p=0.9, seed=6)
    assert victim.finish_reason == "cancelled" and victim.n_tokens < 5 and engine.stats["cancelled"] == 1


def test_text_stream_holds_back_stop_prefixes():
    tok = train_char([TEXT])
    stream = TextStream(tok, ["lo w", "zz"])
    shown = []
    for ch in "hello world":
        text, stopped = stream.push(tok.encode(ch)[0])
        shown.append(text)
        if stopped:
            break
    assert "".join(shown) == "hel" and stopped
    assert shown == ["h", "e", "", "l", "", "", ""]  # "l", "lo", "lo " may grow into "lo w"
    stream = TextStream(tok, ["zz"])
    assert [stream.push(t)[0] for t in tok.encode("az")] == ["a", ""]
    assert stream.flush() == "z"


def test_text_stream_keeps_the_first_words_space_and_whole_characters():
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    from pretune.data.tokenizer import Tokenizer, train_bpe

    # SentencePiece style: "\u2581" marks a word's leading space, which decoding drops at the start
    words = ["<unk>", "<s>", "</s>", "\u2581The", "\u2581model", "\u2581is", "\u2581small"]
    sp = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    tok = Tokenizer(sp, bos="<s>", eos="</s>")
    prompt, new = tok.encode("The model"), tok.encode("The is small")[1:]
    assert tok.decode(prompt + new) == "The model is small" and tok.decode(new) == "is small"
    stream = TextStream(tok, [], prefix=prompt[-4:])
    assert "".join(stream.push(t)[0] for t in new) + stream.flush() == " is small"
    # byte-level BPE: a character of several bytes may span tokens; it is shown once whole
    text = "caf\u00e9 \u65e5\u672c\u8a9e " * 50
    bpe = train_bpe(iter([text]), vocab_size=262)
    ids = bpe.encode("\u65e5\u672c\u8a9e caf\u00e9")
    assert any("\ufffd" in bpe.decode([t]) for t in ids)  # some token holds part of a character
    stream = TextStream(bpe, [], prefix=bpe.encode("x ")[-4:])
    shown = [stream.push(t)[0] for t in ids]
    assert "".join(shown) + stream.flush() == "\u65e5\u672c\u8a9e caf\u00e9"
    assert not any("\ufffd" in piece for piece in shown)
    # a stop string is never found in a half-decoded character's stand-in U+FFFD
    stream = TextStream(bpe, ["\ufffd"], prefix=bpe.encode("x ")[-4:])
    pushed = [stream.push(t) for t in ids]
    assert not any(stopped for _, stopped in pushed)
    assert "".join(text for text, _ in pushed) + stream.flush() == "\u65e5\u672c\u8a9e caf\u00e9"


# ----------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def served(model_tok):
    pytest.importorskip("fastapi", reason="serving needs the serve extra")
    uvicorn = pytest.importorskip("uvicorn", reason="serving needs the serve extra")
    from pretune.serve.server import ServeConfig, create_app

    model, tok = model_tok
    cfg = ServeConfig(api_key=KEY, max_batch=4, max_concurrent=3, max_body_bytes=20_000, max_tokens_limit=200)
    app = create_app(model, tok, cfg, "tiny-test")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", engine=app.state.engine, app=app, model=model, tok=tok)
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture
def client(served):
    openai = pytest.importorskip("openai", reason="the server is tested with the official openai client")
    wait_idle(served)
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=20)


@contextmanager
def slow(served, throttle_s):
    """Make generation slow and never stop early at EOS, so that requests are surely in flight."""
    engine = served.engine
    stop_ids, engine.stop_ids, engine.throttle_s = engine.stop_ids, set(), throttle_s
    try:
        yield
    finally:
        engine.stop_ids, engine.throttle_s = stop_ids, 0.0


def wait_idle(served, timeout=10):
    deadline = time.time() + timeout
    while (served.engine.active or served.app.state.in_flight[0]) and time.time() < deadline:
        time.sleep(0.02)
    assert not served.engine.active and served.app.state.in_flight[0] == 0


def chat_reference(served, messages, n):
    ids = served.tok.encode(render_chat(messages, served.tok))
    return reference(served.model, served.tok, ids, n, temperature=0)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def test_models_and_health(served, client):
    import httpx

    assert [m.id for m in client.models.list().data] == ["tiny-test"]
    assert client.models.retrieve("tiny-test").owned_by == "pretune"
    assert httpx.get(served.url + "/health").json()["status"] == "ok"


def test_chat_plain_and_streamed(served, client):
    r = client.chat.completions.create(model="tiny-test", messages=MESSAGES, max_tokens=12, temperature=0)
    expected = chat_reference(served, MESSAGES, 12)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 12 else "stop")
    prompt_len = len(served.tok.encode(render_chat(MESSAGES, served.tok)))
    assert r.usage.prompt_tokens == prompt_len and r.usage.total_tokens == prompt_len + r.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="tiny-test", messages=MESSAGES, max_tokens=12,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and not chunks[-1].choices


def test_completions_stop_seed_and_tokens(served, client):
    expected = reference(served.model, served.tok, served.tok.encode("The cat"), 30, temperature=0)
    r = client.completions.create(model="tiny-test", prompt="The cat", max_tokens=30, temperature=0)
    assert r.choices[0].text == expected and r.object == "text_completion"
    assert len(expected) >= 8, "the test model should write at least 8 characters"
    stop = expected[5:7]
    r = client.completions.create(model="tiny-test", prompt="The cat", max_tokens=30, temperature=0,
                                  stop=[stop, "@@"])
    assert r.choices[0].text == expected[:expected.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-test", prompt="The cat", max_tokens=30, temperature=0, stop=stop, stream=True))
    assert streamed == expected[:expected.find(stop)]
    a, b = (client.completions.create(model="tiny-test", prompt="x", max_tokens=16, temperature=1.0, seed=3)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text
    ids = served.tok.encode("The cat")
    r = client.completions.create(model="tiny-test", prompt=ids, max_tokens=30, temperature=0)
    assert r.choices[0].text == expected


def test_concurrent_requests_are_batched(served, client):
    prompts = ["a", "The quick brown fox jumps", "mid length"]
    results = {}
    served.engine.throttle_s = 0.01
    steps0, rows0 = served.engine.stats["steps"], served.engine.stats["rows_stepped"]

    def ask(p):
        results[p] = client.completions.create(model="tiny-test", prompt=p, max_tokens=20, temperature=0)

    try:
        threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
    finally:
        served.engine.throttle_s = 0.0
    for p in prompts:
        assert results[p].choices[0].text == reference(served.model, served.tok, served.tok.encode(p), 20,
                                                       temperature=0)
    assert served.engine.stats["rows_stepped"] - rows0 > served.engine.stats["steps"] - steps0


def test_errors_in_openai_format(served, client):
    import httpx
    import openai

    bad = openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="../../etc/passwd", messages=MESSAGES)
    assert e.value.body["code"] == "model_not_found"
    for kw, param in (({"n": 2}, "n"), ({"temperature": 5}, "temperature"), ({"max_tokens": 10_000}, "max_tokens"),
                      ({"max_tokens": 250}, "max_tokens"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny-test", prompt="The cat", **kw)
        assert e.value.body["param"] == param, kw
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\]\.role"):
        client.chat.completions.create(model="tiny-test", messages=[MESSAGES[0], {"role": "tool", "content": "x"}])
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = served.url + "/v1/completions"
    r = httpx.post(url, content=b"{not json", headers=headers)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(url, content=b'{"prompt": "' + b"a" * 30_000 + b'"}', headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.post(url, content=iter([b'{"prompt": "', b"a" * 15_000, b"a" * 15_000, b'"}']), headers=headers)
    assert r.status_code == 413  # chunked, no Content-Length
    r = httpx.post(url, json={"prompt": "a" * 300}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(url, json={"prompt": "a"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(served.url + "/v1/nowhere", headers=headers)
    assert r.status_code == 404 and "error" in r.json()


def open_stream(http, url, body):
    """Start a streamed request and read its first event; returns the open response."""
    cm = http.stream("POST", url, json=body, headers={"Authorization": f"Bearer {KEY}"})
    r = cm.__enter__()
    assert r.status_code == 200
    lines = r.iter_lines()
    while not next(lines).startswith("data: "):
        pass
    return cm, lines


def test_too_many_concurrent_is_429(served, client):
    import httpx
    import openai

    before = served.engine.stats["cancelled"]
    body = {"model": "tiny-test", "prompt": "x", "max_tokens": 200, "temperature": 0.5, "stream": True}
    streams = []
    with slow(served, 0.05):
        with httpx.Client(timeout=20) as http:
            for _ in range(3):
                streams.append(open_stream(http, served.url + "/v1/completions", body))
            with pytest.raises(openai.RateLimitError) as e:
                client.completions.create(model="tiny-test", prompt="x", max_tokens=5)
            assert e.value.body["code"] == "rate_limit_exceeded"
            for cm, _ in streams:
                cm.__exit__(None, None, None)
    wait_idle(served, timeout=5)  # the closed streams cancelled their jobs and freed their places
    assert served.engine.stats["cancelled"] == before + 3


def test_disconnect_stops_generation(served, client):
    import httpx

    before = served.engine.stats["cancelled"]
    with slow(served, 0.02):
        with httpx.Client(timeout=20) as http:
            cm, lines = open_stream(http, served.url + "/v1/chat/completions",
                                    {"model": "tiny-test", "messages": MESSAGES, "max_tokens": 150,
                                     "temperature": 0.8, "stream": True})
            next(lines)
            cm.__exit__(None, None, None)  # hang up mid-stream
        deadline = time.time() + 10
        while served.engine.stats["cancelled"] == before and time.time() < deadline:
            time.sleep(0.02)
    job = served.engine.history[-1]
    assert job.finish_reason == "cancelled" and job.n_tokens < 100
    wait_idle(served)

    with slow(served, 0.02):  # a plain request whose client gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(served.url + "/v1/completions", json={"prompt": "x", "max_tokens": 200},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
        deadline = time.time() + 10
        while served.engine.stats["cancelled"] == before + 1 and time.time() < deadline:
            time.sleep(0.02)
    job = served.engine.history[-1]
    assert job.finish_reason == "cancelled" and job.n_tokens < 150
    wait_idle(served)


# ----------------------------------------------------------------------------- CLI


def test_serve_arguments(monkeypatch):
    from pretune.serve.server import load_serve_config

    monkeypatch.setenv("PRETUNE_API_KEY", "from-env")
    cfg, path = load_serve_config(["runs/x", "--port", "9001", "--max-batch=2", "max_concurrent=5"])
    assert (path, cfg.port, cfg.max_batch, cfg.max_concurrent, cfg.host) == ("runs/x", 9001, 2, 5, "127.0.0.1")
    assert cfg.api_key == "from-env"
    cfg, _ = load_serve_config(["runs/x", "--api-key", "given"])
    assert cfg.api_key == "given"
    from pretune.errors import ConfigError
    with pytest.raises(ConfigError, match="max_batch"):
        load_serve_config(["runs/x", "max_batch=0"])


def test_chat_session_history_and_commands(model_tok):
    from pretune.serve.chat import ChatConfig, ChatSession, chat_loop

    model, tok = model_tok
    engine = Engine(model, tok, max_batch=1).start()
    try:
        session = ChatSession(engine, tok, ChatConfig(system="Be brief.", max_tokens=10, temperature=0))
        out = io.StringIO()
        chat_loop(session, io.StringIO("hello\nhow are you\n/reset\nagain\n/exit\nnever read\n"), out)
        assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
        assert session.messages[1]["content"] == "again"
        replies = [line for line in out.getvalue().splitlines() if line.startswith("assistant> ")]
        assert len(replies) == 3 and "(history cleared)" in out.getvalue()
        history = [MESSAGES[0], {"role": "user", "content": "hello"}]
        first = chat_reference(SimpleNamespace(model=model, tok=tok), history, 10)
        assert out.getvalue().startswith("assistant> " + first)
    finally:
        engine.close()


def test_chat_cli_end_to_end(model_tok, tmp_path, monkeypatch, capsys):
    from pretune.cli import main

    model, tok = model_tok
    save_model_dir(model, tmp_path / "m", tokenizer=tok)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/exit\n"))
    assert main(["chat", str(tmp_path / "m"), "max_tokens=5", "temperature=0", "device=cpu"]) == 0
    assert capsys.readouterr().out.startswith("assistant> ")
    assert main(["serve", "--help"]) == 0 and "max_batch" in capsys.readouterr().out
