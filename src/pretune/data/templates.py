"""Chat templates: turn a list of messages into the text a model is trained on and prompted with.

Templates are Jinja, with the conventions of Hugging Face `chat_template` (the variables `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `pad_token`, `unk_token` and
`additional_special_tokens`, the helpers `raise_exception` and `strftime_now`, and transformers'
`tojson`: non-ASCII and "<" kept as they are, and the `{% generation %}...{% endgeneration %}` block
that marks assistant text for transformers' assistant-token mask, rendered as its body), so a template
imported with a Hugging Face tokenizer works unchanged. A message's fields other than role and content
(`reasoning_content`, `name`) reach the template as they are. They are rendered in a sandboxed, immutable Jinja environment with `trim_blocks`
and `lstrip_blocks`, as transformers renders them.

pretune's own default writes plain-text role markers (they are not special tokens in pretune's
character and BPE tokenizers) and ends every assistant turn with the tokenizer's EOS token, so a
model fine-tuned on it learns to stop::

    <|bos|><|system|>
    You are terse.
    <|user|>
    Hello
    <|assistant|>
    Hi.<|eos|>

Training uses `render_prompt_response`, which splits a conversation into the prompt (everything up
to and including the generation prompt of the last assistant turn) and the response (that turn's
content and whatever end-of-turn text the template writes), so the loss can fall on the response
only. Serving uses `render_chat` with `add_generation_prompt=True`, which yields exactly that prompt
(unless the template renders the history differently once an answer follows; see there).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from pretune.errors import UserError

DEFAULT_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] -}}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token + '\n' -}}{%- else -%}{{- '\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)
"""pretune's chat format: `<|role|>` on its own line, then the content; assistant turns end in EOS."""

ROLES = ("system", "user", "assistant")


class ChatMessageError(UserError, ValueError):
    """A message list that is not a list of {role, content} with a known role and text content."""


class ChatTemplateError(UserError, ValueError):
    """A chat template that does not compile or that refused the messages (`raise_exception`)."""


def validate_messages(messages: object) -> list[dict]:
    """Check `messages` (each with a known role and text content) and return them as plain dicts: role,
    content and the message's other fields, which the template may read (Qwen3's reasoning_content, a
    name); the error names the index."""
    if not isinstance(messages, list) or not messages:
        raise ChatMessageError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatMessageError(f"messages[{i}] must be an object with role and content, "
                                   f"not {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatMessageError(f"messages[{i}].role is {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatMessageError(f"messages[{i}].content must be a string, not {type(content).__name__}")
        out.append({**m, "role": role, "content": content})
    return out


def _raise_exception(message: str):
    raise ChatTemplateError(f"the chat template refused the messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    """JSON as transformers' templates write it: non-ASCII kept, no HTML escaping (Jinja's own
    `tojson` writes "<" as "\\u003c"), and json.dumps' indent, separators and sort_keys."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _generation_extension():
    """The Jinja extension for transformers' `{% generation %}...{% endgeneration %}`, which marks the
    assistant text that its return_assistant_tokens_mask reports: here the block renders its body as
    it is (the loss mask comes from render_prompt_response's split, not from the mark)."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            # a call block, so the body has a scope of its own, as in transformers
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return Generation


@lru_cache(maxsize=16)
def _compile(template: str):
    """Compile once per distinct template text (sandboxed; no attribute access to Python internals)."""
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatTemplateError("chat templates need jinja2: pip install jinja2 (or pretune[serve])") from None

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _generation_extension()])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from None


UNK_NAMES = ("<|unk|>", "<unk>", "[UNK]")
"""Names of the unknown token, tried when the tokenizer's model names none."""


def _token_text(tokenizer, role: str) -> str:
    idx = getattr(tokenizer, f"{role}_id", None) if tokenizer is not None else None
    if idx is None:
        return ""
    tok = getattr(tokenizer, "tok", None)
    name = tok.id_to_token(idx) if tok is not None else None
    return name or ""


def _unk_text(tok) -> str:
    """The unknown token's text: the one the tokenizer's model uses, else a usual name in its vocab."""
    model_unk = getattr(getattr(tok, "model", None), "unk_token", None)
    for name in ([model_unk] if isinstance(model_unk, str) else []) + list(UNK_NAMES):
        if tok.token_to_id(name) is not None:
            return name
    return ""


def special_tokens(tokenizer, additional: bool = True) -> dict:
    """The special-token variables a template sees, as transformers passes them: bos_token,
    eos_token, pad_token and unk_token ("" when the tokenizer has none) and, with `additional`,
    additional_special_tokens (the vocabulary's other special tokens; slow to list when there are
    hundreds, so only for a template that uses them)."""
    named = {f"{role}_token": _token_text(tokenizer, role) for role in ("bos", "eos", "pad")}
    tok = getattr(tokenizer, "tok", None)
    named["unk_token"] = _unk_text(tok) if tok is not None else ""
    if not additional:
        return named
    others = sorted((i, t.content) for i, t in tok.get_added_tokens_decoder().items()
                    if t.special and t.content not in named.values()) if tok is not None else []
    return {**named, "additional_special_tokens": [name for _, name in others]}


def chat_template_of(tokenizer) -> str:
    """The tokenizer's own chat template when it has one, else DEFAULT_CHAT_TEMPLATE."""
    return getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE


def check_template(tokenizer) -> None:
    """ChatTemplateError when the tokenizer's chat template (or the default) does not compile: a fault
    of every conversation alike, found before any is rendered."""
    _compile(chat_template_of(tokenizer))


def render_chat(messages: list[dict], tokenizer, add_generation_prompt: bool = True) -> str:
    """Render `messages` with the tokenizer's chat template (or the default) into prompt text.

    With `add_generation_prompt`, the text ends with the header of a new assistant turn, ready for
    the model to continue. Raises ChatMessageError for a malformed message list and
    ChatTemplateError when the template fails.
    """
    msgs = validate_messages(messages)
    text = chat_template_of(tokenizer)
    template = _compile(text)
    tokens = special_tokens(tokenizer, additional="additional_special_tokens" in text)
    import jinja2  # present: _compile imported it
    try:
        return template.render(messages=msgs, add_generation_prompt=add_generation_prompt, **tokens)
    except ChatTemplateError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
        # SecurityError (the sandbox) is a TemplateError too
        raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None


RESPONSE_MARK = "\ue000pretune-response\ue001"
"""Stands in for the last assistant content to find where the template writes it (private-use
characters, which no template rewrites and no real message holds)."""


def render_prompt_response(messages: list[dict], tokenizer) -> tuple[str, str]:
    """(prompt, response) for training with the loss on the last assistant turn only.

    prompt + response equals render_chat(messages, add_generation_prompt=False). The response is the
    last assistant content and whatever the template writes after it (EOS, an end-of-turn token, a
    newline). The prompt is the history rendered with the generation prompt, what serving sends,
    when the full conversation starts with it. A template that renders the history differently once
    the answer follows (BOS only before the first message, a marker before the last turn) is split
    where it writes the content: found by rendering a marker in its place, never by searching for
    the text. ChatTemplateError when neither way gives a split that is certain.

    What the template writes from the last message's other fields after the generation prompt (Qwen3's
    `<think>` block from reasoning_content) is part of the response: the marker message carries the
    content alone, so it renders differently and the turn after the generation prompt is kept whole.
    """
    msgs = validate_messages(messages)
    if msgs[-1]["role"] != "assistant":
        raise ChatMessageError(f"messages[{len(msgs) - 1}] must be the assistant turn to train on "
                               f"(its role is {msgs[-1]['role']!r})")
    full = render_chat(msgs, tokenizer, add_generation_prompt=False)
    content = msgs[-1]["content"]
    prompt = render_chat(msgs[:-1], tokenizer, add_generation_prompt=True) if len(msgs) > 1 else None
    if prompt is not None and full.startswith(prompt) and _opens_with(full[len(prompt):], content):
        return prompt, full[len(prompt):]
    split = _split_at_content(msgs, tokenizer, full)
    if split is not None:
        return split
    if prompt is not None and full.startswith(prompt):  # the template rewrites the answer: keep its turn whole
        return prompt, full[len(prompt):]
    raise ChatTemplateError("the chat template cannot be split into prompt and response: the conversation "
                            "rendered without the generation prompt does not start with the history rendered "
                            "with it, and the last assistant message's content is not written once, verbatim "
                            "(or stripped of surrounding whitespace); fix the template so the generation "
                            "prompt is a prefix of the full conversation")


def _opens_with(text: str, content: str) -> bool:
    return text.startswith(content) or text.startswith(content.strip())


def _split_at_content(msgs: list[dict], tokenizer, full: str) -> tuple[str, str] | None:
    """(text before the last assistant content, content and what follows) of `full`, from a rendering
    with RESPONSE_MARK in place of the content; None when the template does not write the mark
    exactly once or putting the content back does not give `full`."""
    marked = render_chat(msgs[:-1] + [{"role": "assistant", "content": RESPONSE_MARK}], tokenizer,
                         add_generation_prompt=False)
    if marked.count(RESPONSE_MARK) != 1:
        return None
    before, after = marked.split(RESPONSE_MARK)
    content = msgs[-1]["content"]
    for text in (content, content.strip()):
        if before + text + after == full:
            return before, text + after
    return None


def render_turns(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """The conversation as (text, trained) pieces for the loss on every assistant turn: each
    assistant turn is split off as `render_prompt_response` splits the last one (its content and
    end-of-turn text trained, the history before it not), and the pieces join to that prompt and
    response. Needs a template that writes each earlier turn as it wrote it when that turn was the
    last (ChatTemplateError otherwise: one that strips an earlier turn's reasoning, for example)."""
    msgs = validate_messages(messages)
    prompt, response = render_prompt_response(msgs, tokenizer)
    pieces, done = [], 0
    for i, m in enumerate(msgs[:-1]):
        if m["role"] != "assistant":
            continue
        before, turn = render_prompt_response(msgs[: i + 1], tokenizer)
        if len(before) < done or not prompt.startswith(before + turn):
            raise ChatTemplateError(f"finetune.turns=all: the chat template writes the assistant turn "
                                    f"messages[{i}] differently once later turns follow, so its loss cannot "
                                    f"be placed; use finetune.turns=last")
        pieces += [(prompt[done:len(before)], False), (turn, True)]
        done = len(before) + len(turn)
    pieces += [(prompt[done:], False), (response, True)]
    return [(text, trained) for text, trained in pieces if text or trained]


def start_ids(tokenizer) -> list[int]:
    """What a text is scored or continued after when nothing comes before it: the BOS the tokenizer's
    post-processor adds (imported Llama, Mistral), else EOS, which is what a pretune model has seen
    before every document (documents are separated by EOS; it never sees its tokenizer's <|bos|>)."""
    prefix = list(getattr(tokenizer, "prompt_prefix", []) or [])
    if prefix:
        return prefix
    return [tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id or 0]


def stop_ids(tokenizer) -> set[int]:
    """The token ids that end a generated answer: EOS, and the special tokens the chat template writes
    to end an assistant turn (Llama 3's <|eot_id|>, ChatML's <|im_end|>, Gemma's <end_of_turn>) where
    the tokenizer's EOS is another token, as transformers' generation_config lists them."""
    ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    tok = getattr(tokenizer, "tok", None)
    if tok is None or not getattr(tokenizer, "chat_template", None):
        return ids
    try:
        turn = render_prompt_response([{"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": RESPONSE_MARK}], tokenizer)[1]
    except (ChatTemplateError, ChatMessageError):
        return ids
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    after = turn.split(RESPONSE_MARK, 1)[-1]
    return ids | {i for i in tokenizer.encode(after) if i in special and i not in (tokenizer.bos_id,)}
