"""The server's request parameters: sampling parameters it does not implement are refused with an
OpenAI-shaped 400 unless they carry their neutral value, wrongly typed ones are refused, and the
`developer` role is a system message. Requests go through the app in-process (Starlette's TestClient)."""

from __future__ import annotations

import pytest
import torch

from pretune.data.tokenizer import train_char
from pretune.model.config import ModelConfig
from pretune.model.gpt import GPT

pytest.importorskip("fastapi", reason="serving needs the serve extra")
pytest.importorskip("httpx", reason="the test client needs httpx")

TEXT = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?<|>\n"
PROMPT = {"model": "tiny", "prompt": "The cat", "max_tokens": 6, "temperature": 0}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def client(cpu_threads):
    from fastapi.testclient import TestClient

    from pretune.serve.server import ServeConfig, create_app

    before = torch.get_num_threads()
    torch.set_num_threads(cpu_threads)
    torch.manual_seed(0)
    tok = train_char([TEXT])
    model = GPT(ModelConfig(preset="tiny", vocab_size=tok.vocab_size))
    with torch.no_grad():  # spread the weights so greedy choices are not near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(6)
    app = create_app(model.eval(), tok, ServeConfig(max_batch=2, max_tokens_limit=64), "tiny")
    with TestClient(app) as c:
        yield c
    torch.set_num_threads(before)


def post(client, chat: bool, body: dict):
    return client.post("/v1/chat/completions" if chat else "/v1/completions", json=body)


def output(response) -> str:
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


REFUSED = [  # (chat?, extra body, param, code)
    (False, {"presence_penalty": 1.5}, "presence_penalty", "unsupported_parameter"),
    (True, {"presence_penalty": -0.5}, "presence_penalty", "unsupported_parameter"),
    (False, {"frequency_penalty": "x"}, "frequency_penalty", "invalid_type"),
    (False, {"frequency_penalty": 3}, "frequency_penalty", "invalid_value"),
    (True, {"frequency_penalty": 0.2}, "frequency_penalty", "unsupported_parameter"),
    (False, {"logit_bias": {"5": 100}}, "logit_bias", "unsupported_parameter"),
    (True, {"logit_bias": {"5": -100}}, "logit_bias", "unsupported_parameter"),
    (False, {"logit_bias": [5]}, "logit_bias", "invalid_type"),
    (False, {"logit_bias": {"a": 1}}, "logit_bias", "invalid_type"),
    (False, {"logit_bias": {"5": "high"}}, "logit_bias", "invalid_type"),
    (False, {"logit_bias": {"5": 101}}, "logit_bias", "invalid_value"),
    (True, {"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
    (True, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     "unsupported_parameter"),
    (True, {"response_format": "json"}, "response_format", "invalid_type"),
    (True, {"response_format": {"type": "yaml"}}, "response_format", "invalid_value"),
    (True, {"tool_choice": "required"}, "tool_choice", "unsupported_parameter"),
    (True, {"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    (False, {"logprobs": 0}, "logprobs", "unsupported_parameter"),  # 0 asks for the sampled tokens' own
    (True, {"logprobs": True}, "logprobs", "unsupported_parameter"),
    (False, {"suffix": " and the end."}, "suffix", "unsupported_parameter"),
]


@pytest.mark.parametrize("chat, extra, param, code", REFUSED)
def test_unimplemented_or_mistyped_parameters_are_refused(client, chat, extra, param, code):
    r = post(client, chat, (CHAT if chat else PROMPT) | extra)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert param in error["message"]


NEUTRAL = [{"presence_penalty": 0, "frequency_penalty": 0.0}, {"logit_bias": {}}, {"logit_bias": None},
           {"logit_bias": {"5": 0}}, {"response_format": {"type": "text"}}, {"response_format": None},
           {"tool_choice": "none", "functions": []}, {"logprobs": None}, {"suffix": None},
           {"suffix": ""},
           # vLLM's sampling extensions at their neutral values, and keys that change nothing
           {"min_tokens": 0, "ignore_eos": False, "repetition_penalty": 1.0, "min_p": 0, "stop_token_ids": []},
           {"include_stop_str_in_output": False, "modalities": ["text"], "skip_special_tokens": True,
            "spaces_between_special_tokens": True, "bad_words": []},
           {"user": "someone", "metadata": {"a": "b"}, "store": False, "service_tier": "auto",
            "parallel_tool_calls": True},
           {"guided_json": None, "prompt_logprobs": None, "anything_else": None}]


@pytest.mark.parametrize("chat", [False, True])
def test_neutral_values_are_accepted_and_change_nothing(client, chat):
    base = CHAT if chat else PROMPT
    plain = output(post(client, chat, base))
    for extra in NEUTRAL:
        assert output(post(client, chat, base | extra)) == plain, extra


def test_top_p_zero_is_greedy(client):
    from pretune.eval.generate import filter_logits

    greedy = output(post(client, False, PROMPT))
    for _ in range(2):  # temperature 1 (the default) with top_p 0: the most likely token each time
        assert output(post(client, False, PROMPT | {"top_p": 0, "temperature": None})) == greedy
    r = post(client, False, PROMPT | {"top_p": -0.1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"
    logits = torch.tensor([[0.5, 2.0, 1.9, -1.0]])
    assert filter_logits(logits, 1.0, None, 0.0).tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_developer_role_is_a_system_message(client):
    from pretune.serve.requests import chat_messages as _chat_messages

    parts = [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]
    assert _chat_messages({"messages": [{"role": "developer", "content": parts}]}) == [
        {"role": "system", "content": "Be brief."}]
    as_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    as_developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    expected = output(post(client, True, CHAT | {"messages": as_system}))
    assert output(post(client, True, CHAT | {"messages": as_developer})) == expected
    r = post(client, True, CHAT | {"messages": [{"role": "tool", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_bodies_no_tokenizer_can_take_are_refused_as_invalid_json(client):
    for body in (b'{"prompt": "a \\ud800 b", "max_tokens": 2}',  # a lone surrogate, valid JSON
                 b'{"messages": [{"role": "user", "content": "\\udc00"}]}',
                 b'{"prompt": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):  # nested too deep
        url = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
        r = client.post(url, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_json" and r.json()["error"]["type"] == "invalid_request_error"


def test_a_model_id_with_a_slash_is_retrieved():
    from fastapi.testclient import TestClient

    from pretune.serve.server import ServeConfig, create_app

    tok = train_char([TEXT])
    app = create_app(GPT(ModelConfig(preset="tiny", vocab_size=tok.vocab_size)).eval(), tok, ServeConfig(), "org/tiny")
    with TestClient(app) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "org/tiny"
        r = c.get("/v1/models/org/tiny")
        assert r.status_code == 200 and r.json()["id"] == "org/tiny"
        assert c.get("/v1/models/org/other").status_code == 404
