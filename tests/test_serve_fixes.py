"""Serving and chat, pinned after a bug hunt: jobs join the running batch at once whatever their
prompt's length (rows keep their own RoPE positions) and still give what they give alone; the server
refuses parameters it would ignore (vLLM's extensions, unknown keys, stream_options without stream,
max_completion_tokens on /v1/completions) and takes top_k 0 / -1 as no cut; `pretune chat` keeps its
history when a message is too long, checks its sampling settings as `pretune generate` does, and
repeats a seeded conversation after /reset."""

from __future__ import annotations

import io
import math

import pytest
import torch
from test_serve import _threads, drain, model_tok, reference  # noqa: F401  (fixtures and helpers)
from test_serve_params import output, post

from pretune.model.gpt import KVCache
from pretune.serve.engine import Engine, SamplingParams

# ----------------------------------------------------------------------------- model


def test_positions_decode_rows_of_different_lengths_as_alone(model_tok):
    """GPT.forward with `positions`: two rows of a cache at different lengths decode in one forward
    as each does alone (same RoPE positions, each row masked to its own slots)."""
    model, tok = model_tok
    prompts = [tok.encode("hi"), tok.encode("a longer prompt")]
    nxt = tok.encode("x")[0]
    alone = []
    with torch.no_grad():
        for ids in prompts:
            cache = KVCache.empty(model.cfg, 1, 32, "cpu", torch.float32)
            model(torch.tensor([ids]), cache=cache)
            alone.append(model(torch.tensor([[nxt]]), cache=cache)[0, -1])
        cache = KVCache.empty(model.cfg, 2, 32, "cpu", torch.float32)
        for row, ids in enumerate(prompts):
            model(torch.tensor([ids]), cache=KVCache(cache.k[:, row:row + 1], cache.v[:, row:row + 1]))
        cache.pos = max(map(len, prompts)) + 1
        positions = torch.tensor([[len(p)] for p in prompts])
        both = model(torch.tensor([[nxt], [nxt]]), cache=cache, positions=positions)[:, -1]
    for row in range(2):
        torch.testing.assert_close(both[row], alone[row], rtol=1e-5, atol=1e-5)
    assert cache.pos == len(prompts[1]) + 1  # the caller's: not advanced


# ----------------------------------------------------------------------------- engine


def test_a_long_prompt_joins_a_running_batch_at_once(model_tok):
    """A prompt longer than what the running rows hold, and a job whose max_tokens fill its context,
    join at the next step while another job decodes; each gives what it gives alone."""
    model, tok = model_tok
    ctx = model.cfg.max_seq_len
    engine = Engine(model, tok, max_batch=4)
    engine.stop_ids = set()  # every job runs to max_tokens, so that they surely overlap
    specs = {"short": ("Start", dict(max_tokens=60, temperature=0)),
             "long": ("a prompt much longer than the other one " * 3, dict(max_tokens=12, temperature=0)),
             "full": ("x", dict(max_tokens=ctx - 1, temperature=1.0, top_k=20, seed=11))}
    sinks = {k: [] for k in specs}
    jobs = {}

    def submit(k):
        prompt, kw = specs[k]
        jobs[k] = engine.submit(tok.encode(prompt), SamplingParams(**kw), sinks[k].append)

    submit("short")
    for _ in range(3):
        engine.step()
    assert len(tok.encode(specs["long"][0])) > jobs["short"].n_tokens + 5
    submit("long")
    submit("full")
    engine.step()
    assert not engine.waiting and len(engine.rows) == 3  # both joined at the next step
    assert all(job.n_tokens >= 1 for job in jobs.values())
    got = drain(engine, sinks)
    for k, (prompt, kw) in specs.items():
        kw = dict(kw)
        n = kw.pop("max_tokens")
        assert got[k] == reference(model, tok, tok.encode(prompt), n, stop_at_eos=False, **kw), k
        assert jobs[k].n_tokens == n


def test_batched_equals_alone_with_rows_moved(model_tok):
    """Staggered joins, a queue (max_batch 3), rows that finish or are cancelled while others run
    (the last row then moves into the hole): every greedy and seeded output equals its own alone."""
    model, tok = model_tok
    engine = Engine(model, tok, max_batch=3)
    plan = [  # (step to submit at, prompt, sampling)
        (0, "a", dict(max_tokens=30, temperature=0)),
        (0, "The quick brown fox", dict(max_tokens=4, temperature=0)),
        (1, "seeded one", dict(max_tokens=25, temperature=1.0, top_p=0.9, seed=5)),
        (2, "a much longer prompt than the others, to be sure", dict(max_tokens=20, temperature=0)),
        (2, "xy", dict(max_tokens=18, temperature=0.7, top_k=8, seed=9)),
        (5, "cancel me", dict(max_tokens=40, temperature=0)),
        (9, "Q?", dict(max_tokens=22, temperature=1.0, seed=3)),
        (9, "zzz top. a b c d e f", dict(max_tokens=15, temperature=0)),
    ]
    sinks = {i: [] for i in range(len(plan))}
    jobs, moved, step = {}, 0, 0
    while step < 1000 and (step <= plan[-1][0] or engine.rows or engine.waiting):
        for i, (at, prompt, kw) in enumerate(plan):
            if at == step:
                jobs[i] = engine.submit(tok.encode(prompt), SamplingParams(**kw), sinks[i].append)
        if 5 in jobs and jobs[5].n_tokens >= 3:  # cancelled while it runs
            engine.cancel(jobs[5])
        before = [r.job.id for r in engine.rows]
        engine.step()
        after = [r.job.id for r in engine.rows]
        moved += sum(1 for j in set(before) & set(after) if before.index(j) != after.index(j))
        step += 1
    assert moved >= 1, "no row moved: the test no longer covers it"
    assert jobs[5].finish_reason == "cancelled" and 0 < jobs[5].n_tokens < 40
    for i, (_, prompt, kw) in enumerate(plan):
        if i == 5:
            continue
        kw = dict(kw)
        n = kw.pop("max_tokens")
        assert "".join(e.text for e in sinks[i]) == reference(model, tok, tok.encode(prompt), n, **kw), prompt


# ----------------------------------------------------------------------------- server

PROMPT = {"model": "tiny", "prompt": "The cat", "max_tokens": 6, "temperature": 0}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def client(model_tok):
    pytest.importorskip("fastapi", reason="serving needs the serve extra")
    pytest.importorskip("httpx", reason="the test client needs httpx")
    from fastapi.testclient import TestClient

    from pretune.serve.server import ServeConfig, create_app

    model, tok = model_tok
    with TestClient(create_app(model, tok, ServeConfig(max_batch=2, max_tokens_limit=64), "tiny")) as c:
        yield c


def refused(response, param: str, code: str | None) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code), error
    return error["message"]


REFUSED = [  # (chat?, extra body, param, code)
    (False, {"min_tokens": 40}, "min_tokens", "unsupported_parameter"),
    (True, {"ignore_eos": True}, "ignore_eos", "unsupported_parameter"),
    (False, {"repetition_penalty": 1.5}, "repetition_penalty", "unsupported_parameter"),
    (True, {"min_p": 0.9}, "min_p", "unsupported_parameter"),
    (False, {"stop_token_ids": [5]}, "stop_token_ids", "unsupported_parameter"),
    (False, {"include_stop_str_in_output": True, "stop": ["e"]}, "include_stop_str_in_output",
     "unsupported_parameter"),
    (True, {"modalities": ["text", "audio"]}, "modalities", "unsupported_parameter"),
    (True, {"skip_special_tokens": False}, "skip_special_tokens", "unsupported_parameter"),
    (False, {"bad_words": ["cat"]}, "bad_words", "unsupported_parameter"),
    (False, {"allowed_token_ids": [1, 2]}, "allowed_token_ids", "unknown_parameter"),
    (False, {"prompt_logprobs": 1}, "prompt_logprobs", "unknown_parameter"),
    (True, {"guided_json": {"type": "object"}}, "guided_json", "unknown_parameter"),
    (True, {"guided_choice": ["yes", "no"]}, "guided_choice", "unknown_parameter"),
    (True, {"structured_outputs": {"regex": "a+"}}, "structured_outputs", "unknown_parameter"),
    (False, {"truncate_prompt_tokens": 3}, "truncate_prompt_tokens", "unknown_parameter"),
    (True, {"reasoning_effort": "high"}, "reasoning_effort", "unknown_parameter"),
    (False, {"repetition_penalty": True}, "repetition_penalty", "unsupported_parameter"),
]


@pytest.mark.parametrize("chat, extra, param, code", REFUSED)
def test_parameters_that_would_be_ignored_are_refused(client, chat, extra, param, code):
    message = refused(post(client, chat, (CHAT if chat else PROMPT) | extra), param, code)
    assert param in message


def test_a_misspelt_parameter_is_refused_with_a_suggestion(client):
    message = refused(post(client, True, CHAT | {"temprature": 1.5}), "temprature", "unknown_parameter")
    assert "did you mean temperature?" in message


def test_max_completion_tokens_is_refused_on_completions(client):
    """max_completion_tokens belongs to chat: /v1/completions refuses it rather than ignore it."""
    message = refused(post(client, False, PROMPT | {"max_completion_tokens": 3}), "max_completion_tokens",
                      "unknown_parameter")
    assert "/v1/completions takes max_tokens" in message


def test_max_tokens_beside_max_completion_tokens_is_checked(client):
    """On chat, a max_tokens given beside max_completion_tokens is checked too and must agree with it."""
    plain = {k: v for k, v in CHAT.items() if k != "max_tokens"}
    refused(post(client, True, plain | {"max_tokens": "abc", "max_completion_tokens": 3}), "max_tokens",
            "invalid_type")
    refused(post(client, True, plain | {"max_tokens": -1, "max_completion_tokens": 3}), "max_tokens",
            "invalid_value")
    refused(post(client, True, plain | {"max_tokens": 5, "max_completion_tokens": 3}), "max_completion_tokens",
            "invalid_value")
    r = post(client, True, plain | {"max_tokens": 3, "max_completion_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_stream_options_need_stream(client):
    for chat in (False, True):
        base = CHAT if chat else PROMPT
        for stream in ({}, {"stream": False}):
            message = refused(post(client, chat, base | stream | {"stream_options": {"include_usage": True}}),
                              "stream_options", None)
            assert message == "The 'stream_options' parameter is only allowed when 'stream' is enabled."
        assert post(client, chat, base | {"stream_options": None}).status_code == 200
        r = post(client, chat, base | {"stream": True, "stream_options": {"include_usage": True}})
        assert r.status_code == 200 and '"usage": {"prompt_tokens"' in r.text


def test_top_k_zero_and_minus_one_are_no_cut(client):
    sampled = PROMPT | {"temperature": 1.0, "seed": 7, "max_tokens": 12}
    plain = output(post(client, False, sampled))
    assert output(post(client, False, sampled | {"top_k": 0})) == plain
    assert output(post(client, False, sampled | {"top_k": -1})) == plain
    refused(post(client, False, sampled | {"top_k": -2}), "top_k", "invalid_value")


# ----------------------------------------------------------------------------- chat


def test_chat_keeps_its_history_when_a_message_is_too_long(model_tok):
    from pretune.serve.chat import ChatConfig, ChatSession, ConversationTooLong, chat_loop

    model, tok = model_tok
    engine = Engine(model, tok, max_batch=1).start()
    try:
        session = ChatSession(engine, tok, ChatConfig(system="be brief", max_tokens=5, temperature=0))
        session.send("hello", lambda s: None)
        session.send("how are you", lambda s: None)
        before = [dict(m) for m in session.messages]
        assert len(before) == 5
        with pytest.raises(ConversationTooLong):
            session.send("x" * (model.cfg.max_seq_len + 40), lambda s: None)
        assert session.messages == before
        out = io.StringIO()
        chat_loop(session, io.StringIO("y" * (model.cfg.max_seq_len + 40) + "\n"), out)
        assert "(error: the message is" in out.getvalue() and session.messages == before
    finally:
        engine.close()


def test_chat_seed_repeats_after_reset(model_tok):
    from pretune.serve.chat import ChatConfig, ChatSession, chat_loop

    model, tok = model_tok
    engine = Engine(model, tok, max_batch=1).start()
    try:
        session = ChatSession(engine, tok, ChatConfig(max_tokens=16, temperature=1.0, seed=4))
        out = io.StringIO()
        chat_loop(session, io.StringIO("hello\n/reset\nhello\n"), out)
        replies = [line for line in out.getvalue().splitlines() if line.startswith("assistant> ")]
        assert len(replies) == 2 and replies[0] == replies[1]
    finally:
        engine.close()


def test_chat_checks_sampling_like_generate(tmp_path, capsys):
    from pretune.cli import main
    from pretune.eval.options import GenerateConfig
    from pretune.serve.chat import ChatConfig

    bad = dict(temperature=math.nan, top_p=5.0, top_k=-3)
    problems = ChatConfig(**bad).problems()
    assert problems == GenerateConfig(**bad).problems()  # one check, shared
    assert sorted(p.split("=")[0] for p in problems) == ["temperature", "top_k", "top_p"]
    assert ChatConfig(temperature=0, top_p=0, top_k=0).problems() == []
    assert main(["chat", str(tmp_path / "absent"), "top_p=5", "top_k=-3", "temperature=nan"]) == 2
    err = capsys.readouterr().err
    assert all(key in err for key in ("top_p=5", "top_k=-3", "temperature=nan"))
