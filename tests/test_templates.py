"""Chat templates: the default format, HF-style templates, prompt/response split, validation, sandbox."""

from __future__ import annotations

import pytest

pytest.importorskip("jinja2", reason="chat templates need jinja2 (the hf or eval extra)")

from pretune.data.templates import (DEFAULT_CHAT_TEMPLATE, ChatMessageError, ChatTemplateError,  # noqa: E402
                                    render_chat, render_prompt_response, render_turns, stop_ids)
from pretune.data.tokenizer import train_char  # noqa: E402
from pretune.errors import UserError  # noqa: E402

# The Llama 3 Instruct template as published (without the tool-use parts of 3.1).
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
]


@pytest.fixture
def tok():
    return train_char(["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?<|>\n"])


def with_template(tok, template):
    tok.chat_template = template
    return tok


def test_default_format(tok):
    tok.chat_template = None
    text = render_chat(CONVERSATION[:2], tok)
    assert text == "<|bos|><|system|>\nYou are terse.\n<|user|>\nHello\n<|assistant|>\n"
    full = render_chat(CONVERSATION[:3], tok, add_generation_prompt=False)
    assert full.endswith("<|assistant|>\nHi.<|eos|>\n")
    # EOS and BOS become their special ids when encoded; the role markers stay plain text
    ids = tok.encode(full)
    assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 1
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    assert render_chat(CONVERSATION[:3], tok, add_generation_prompt=False) == full


@pytest.mark.parametrize("template", [None, LLAMA3, CHATML], ids=["default", "llama3", "chatml"])
def test_prompt_plus_response_is_the_conversation(tok, template):
    tok = with_template(tok, template)
    prompt, response = render_prompt_response(CONVERSATION, tok)
    assert prompt + response == render_chat(CONVERSATION, tok, add_generation_prompt=False)
    assert prompt == render_chat(CONVERSATION[:-1], tok, add_generation_prompt=True)
    assert response.startswith("Blue.")
    end = {None: "<|eos|>\n", LLAMA3: "<|eot_id|>", CHATML: "<|im_end|>\n"}[template]
    assert response == "Blue." + end


def test_tokenizer_template_is_used(tok):
    tok = with_template(tok, CHATML)
    text = render_chat([{"role": "user", "content": "x"}], tok)
    assert text == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def test_single_assistant_message_splits(tok):
    tok = with_template(tok, LLAMA3)  # BOS only before the first message: the fallback path
    prompt, response = render_prompt_response([{"role": "assistant", "content": "Yes."}], tok)
    assert prompt.endswith("<|end_header_id|>\n\n") and response == "Yes.<|eot_id|>"


@pytest.mark.parametrize("messages, needle", [
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "messages[1].role"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
    ([{"role": "user"}], "messages[0].content"),
    (["hello"], "messages[0]"),
    ([], "non-empty"),
])
def test_bad_messages_name_the_index(tok, messages, needle):
    with pytest.raises(ChatMessageError) as e:
        render_chat(messages, tok)
    assert needle in str(e.value) and isinstance(e.value, UserError)


def test_response_must_be_assistant(tok):
    with pytest.raises(ChatMessageError, match=r"messages\[1\]"):
        render_prompt_response(CONVERSATION[:2], tok)


def test_raise_exception_and_sandbox(tok):
    tok = with_template(tok, "{{ raise_exception('only user turns') }}")
    with pytest.raises(ChatTemplateError, match="only user turns"):
        render_chat([{"role": "user", "content": "x"}], tok)
    tok.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        render_chat([{"role": "user", "content": "x"}], tok)
    tok.chat_template = "{% for m in messages %}{{ m.content }"
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat([{"role": "user", "content": "x"}], tok)
    tok.chat_template = "{% set x = messages.append(1) %}"  # immutable: no mutation of the inputs
    with pytest.raises(ChatTemplateError):
        render_chat([{"role": "user", "content": "x"}], tok)


@pytest.mark.parametrize("template", [None, LLAMA3, CHATML], ids=["default", "llama3", "chatml"])
def test_every_assistant_turn_is_split_off(tok, template):
    tok = with_template(tok, template)
    pieces = render_turns(CONVERSATION, tok)
    assert "".join(text for text, _ in pieces) == render_chat(CONVERSATION, tok, add_generation_prompt=False)
    end = {None: "<|eos|>\n", LLAMA3: "<|eot_id|>", CHATML: "<|im_end|>\n"}[template]
    assert [text for text, trained in pieces if trained] == ["Hi." + end, "Blue." + end]
    assert pieces[-1] == (render_prompt_response(CONVERSATION, tok)[1], True)
    assert not any("Hello" in text or "colour" in text for text, trained in pieces if trained)


def test_every_turn_needs_a_template_that_keeps_earlier_turns(tok):
    # hides earlier answers as reasoning-stripping templates do: the first answer cannot be placed
    tok = with_template(tok, "{% for m in messages %}<{{ m['role'] }}>{% if m['role'] == 'assistant' and "
                             "not loop.last %}...{% else %}{{ m['content'] }}{% endif %}{{ '\\n' }}{% endfor %}"
                             "{% if add_generation_prompt %}<assistant>{% endif %}")
    with pytest.raises(ChatTemplateError, match=r"messages\[2\].*finetune.turns=last"):
        render_turns(CONVERSATION, tok)
    assert render_prompt_response(CONVERSATION, tok)[1] == "Blue.\n"  # the last turn alone still works


def test_generation_stops_at_the_templates_end_of_turn_token():
    from pretune.data.tokenizer import train_bpe

    tok = train_bpe(iter(["some text to learn from " * 20]), vocab_size=300)
    tok.chat_template = None
    assert stop_ids(tok) == {tok.eos_id}  # pretune's default ends a turn with EOS itself
    tok.tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML
    assert stop_ids(tok) == {tok.eos_id, tok.tok.token_to_id("<|im_end|>")}
    tok.chat_template = "{{ raise_exception('no') }}"
    assert stop_ids(tok) == {tok.eos_id}
