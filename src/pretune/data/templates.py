"""Chat templates: turn a list of messages into the text a model is trained on and prompted with.

Templates are Jinja, with the conventions of Hugging Face `chat_template` (the variables `messages`,
`add_generation_prompt`, `bos_token`, `eos_token` and the helper `raise_exception`), so a template
imported with a Hugging Face tokenizer works unchanged. They are rendered in a sandboxed, immutable
Jinja environment with `trim_blocks` and `lstrip_blocks`, as transformers renders them.

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
only. Serving uses `render_chat` with `add_generation_prompt=True`, which yields exactly that prompt.
"""

from __future__ import annotations

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
    """Check `messages` and return them as plain {role, content} dicts; the error names the index."""
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
        out.append({"role": role, "content": content})
    return out


def _raise_exception(message: str):
    raise ChatTemplateError(f"the chat template refused the messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str):
    """Compile once per distinct template text (sandboxed; no attribute access to Python internals)."""
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatTemplateError("chat templates need jinja2: pip install jinja2 (or pretune[serve])") from None

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from None


def _token_text(tokenizer, role: str) -> str:
    idx = getattr(tokenizer, f"{role}_id", None) if tokenizer is not None else None
    if idx is None:
        return ""
    tok = getattr(tokenizer, "tok", None)
    name = tok.id_to_token(idx) if tok is not None else None
    return name or ""


def chat_template_of(tokenizer) -> str:
    """The tokenizer's own chat template when it has one, else DEFAULT_CHAT_TEMPLATE."""
    return getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE


def render_chat(messages: list[dict], tokenizer, add_generation_prompt: bool = True) -> str:
    """Render `messages` with the tokenizer's chat template (or the default) into prompt text.

    With `add_generation_prompt`, the text ends with the header of a new assistant turn, ready for
    the model to continue. Raises ChatMessageError for a malformed message list and
    ChatTemplateError when the template fails.
    """
    msgs = validate_messages(messages)
    template = _compile(chat_template_of(tokenizer))
    import jinja2  # present: _compile imported it
    try:
        return template.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                               bos_token=_token_text(tokenizer, "bos"), eos_token=_token_text(tokenizer, "eos"))
    except ChatTemplateError:
        raise
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
        # SecurityError (the sandbox) is a TemplateError too
        raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None


def render_prompt_response(messages: list[dict], tokenizer) -> tuple[str, str]:
    """(prompt, response) for training with the loss on the last assistant turn only.

    The prompt is the conversation before the last message plus the generation prompt; the response
    is the rest of the fully rendered conversation: the last assistant content and whatever the
    template writes after it (EOS, an end-of-turn token, a newline). prompt + response equals
    render_chat(messages, add_generation_prompt=False).
    """
    msgs = validate_messages(messages)
    if msgs[-1]["role"] != "assistant":
        raise ChatMessageError(f"messages[{len(msgs) - 1}] must be the assistant turn to train on "
                               f"(its role is {msgs[-1]['role']!r})")
    full = render_chat(msgs, tokenizer, add_generation_prompt=False)
    if len(msgs) > 1:
        prompt = render_chat(msgs[:-1], tokenizer, add_generation_prompt=True)
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
    # The template renders a shorter history differently (for example, BOS only before the first
    # message): cut the full text where the last assistant content starts.
    content = msgs[-1]["content"]
    for candidate in (content, content.strip()):
        at = full.rfind(candidate) if candidate else -1
        if at >= 0:
            return full[:at], full[at:]
    raise ChatTemplateError("cannot find the last assistant message in the rendered conversation; the chat "
                            "template rewrites its content, so prompt and response cannot be split")
