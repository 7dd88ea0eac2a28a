"""OpenAI request bodies, read and checked: the sampling parameters and the chat messages of a
request, or an APIError that the server returns in OpenAI's error format.

Served: model, messages (chat) or prompt (completions), max_tokens (and, on chat,
max_completion_tokens), temperature, top_p, top_k (vLLM's extension; 0 and -1 mean no cut), seed,
stop, stream and stream_options (with stream only). Parameters that would change the output but are
not implemented are refused with 400 rather than ignored: OpenAI's (n > 1, echo, suffix, logprobs,
logit_bias, presence/frequency penalties, a JSON response_format, tools, ...) and vLLM's extensions
(min_tokens, ignore_eos, repetition_penalty, min_p, stop_token_ids, include_stop_str_in_output,
skip_special_tokens=false, ...); their neutral values (n 1, penalties 0, repetition_penalty 1,
logit_bias {}, response_format text, modalities ["text"], ...) are accepted, so that clients that
always send them work. Keys that change nothing the server returns (user, metadata, store,
service_tier, ...) are accepted. Any other key with a value other than null is refused (400, naming
it, with a "did you mean" for a misspelt one): the official client sends only what its user set, so
an unknown key is something the user asked for that this server would otherwise silently not do
(OpenAI itself refuses unrecognized arguments).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pretune.serve.server import ServeConfig


class APIError(Exception):
    """An error answered to the client in OpenAI's format."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _number(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(key)
    if v is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise APIError(400, f"{key} must be {kind}, got {v!r}", param=key, code="invalid_type")
    if not lo <= v <= hi:
        raise APIError(400, f"{key}={v} is out of range; use {lo} to {hi}", param=key, code="invalid_value")
    return v


def _unsupported(key: str, value) -> APIError:
    return APIError(400, f"{key}={value!r} is not supported by this server (it would change the output, "
                    "and this server does not implement it); leave it out or give its neutral value",
                    param=key, code="unsupported_parameter")


def _check_penalty(body: dict, key: str) -> None:
    """presence_penalty / frequency_penalty: a number from -2 to 2; only 0 (no penalty) is served."""
    value = _number(body, key, 0.0, -2.0, 2.0)
    if value != 0:
        raise _unsupported(key, value)


def _check_logit_bias(body: dict) -> None:
    """logit_bias: an object {token id: bias from -100 to 100}; only an empty one (or all zeros)."""
    bias = body.get("logit_bias")
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise APIError(400, f"logit_bias must be an object mapping token ids to a bias from -100 to 100, "
                       f"got {bias!r}", param="logit_bias", code="invalid_type")
    for token, value in bias.items():
        if not token.isdigit():
            raise APIError(400, f"logit_bias keys must be token ids such as \"123\", got {token!r}",
                           param="logit_bias", code="invalid_type")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise APIError(400, f"logit_bias[{token!r}] must be a number, got {value!r}", param="logit_bias",
                           code="invalid_type")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias[{token!r}]={value} is out of range; use -100 to 100",
                           param="logit_bias", code="invalid_value")
    if any(v != 0 for v in bias.values()):
        raise _unsupported("logit_bias", bias)


RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def _check_response_format(body: dict) -> None:
    """response_format: {"type": "text" | "json_object" | "json_schema"}; only text is served."""
    fmt = body.get("response_format")
    if fmt is None:
        return
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise APIError(400, f"response_format must be an object with a type, such as {{\"type\": \"text\"}}; "
                       f"got {fmt!r}", param="response_format", code="invalid_type")
    if fmt["type"] not in RESPONSE_FORMATS:
        raise APIError(400, f"response_format.type={fmt['type']!r} is not one of {', '.join(RESPONSE_FORMATS)}",
                       param="response_format", code="invalid_value")
    if fmt["type"] != "text":
        raise _unsupported("response_format", fmt)


def _one_of(*values):
    """A check that a value is null or one of `values` (a boolean never stands for a number)."""
    return lambda v: v is None or any(v == x and isinstance(v, bool) == isinstance(x, bool) for x in values)


# Parameters this server does not implement -> the values that leave the output unchanged.
_NEUTRAL_ONLY = {
    "n": _one_of(1), "best_of": _one_of(1),
    "echo": lambda v: not v, "suffix": lambda v: not v,
    "logprobs": _one_of(False),  # 0 asks for the sampled tokens' own
    "top_logprobs": lambda v: not v, "tools": lambda v: not v, "functions": lambda v: not v,
    "tool_choice": _one_of("none", "auto"), "function_call": _one_of("none", "auto"),
    "modalities": _one_of(["text"]),
    # vLLM's (and TGI's) extensions, which clients send in extra_body
    "min_tokens": _one_of(0), "ignore_eos": _one_of(False), "repetition_penalty": _one_of(1),
    "min_p": _one_of(0), "typical_p": _one_of(1), "stop_token_ids": _one_of([]),
    "include_stop_str_in_output": _one_of(False), "skip_special_tokens": _one_of(True),
    "spaces_between_special_tokens": _one_of(True), "bad_words": _one_of([]),
    "use_beam_search": _one_of(False), "length_penalty": _one_of(1),
    "add_generation_prompt": _one_of(True), "continue_final_message": _one_of(False),
    "return_tokens_as_token_ids": _one_of(False), "chat_template_kwargs": _one_of({}),
}
# Checked by their own functions below.
_CHECKED = ("presence_penalty", "frequency_penalty", "logit_bias", "response_format")
# Served, on both endpoints.
SERVED = ("model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options")
# Accepted with any value: they change nothing the server returns (who asks, how it is billed or
# stored, hints about scheduling, caching or a predicted output).
HARMLESS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
            "safety_identifier", "prediction", "priority", "request_id")


def check_unimplemented(body: dict, chat: bool = True) -> None:
    """Refuse (400) parameters that would change the output but are not implemented, unknown ones,
    and wrongly typed ones; neutral values (presence_penalty 0, logit_bias {}, response_format text,
    ...) and null pass, so clients that always send them work."""
    own = ("messages", "max_completion_tokens") if chat else ("prompt",)
    known = (*SERVED, *own, *HARMLESS, *_CHECKED)
    for key, value in body.items():
        if key in _NEUTRAL_ONLY:
            if not _NEUTRAL_ONLY[key](value):
                raise _unsupported(key, value)
        elif value is not None and key not in known:
            raise _unknown(key, chat, [*known, *_NEUTRAL_ONLY])
    _check_penalty(body, "presence_penalty")
    _check_penalty(body, "frequency_penalty")
    _check_logit_bias(body)
    _check_response_format(body)


def _unknown(key: str, chat: bool, known: list[str]) -> APIError:
    import difflib

    where = "/v1/chat/completions" if chat else "/v1/completions"
    if key == "max_completion_tokens":
        hint = "; /v1/completions takes max_tokens"
    else:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
    return APIError(400, f"{key} is not a parameter of {where} that this server knows, so it would be "
                    f"ignored{hint} (leave it out, or give null)", param=key, code="unknown_parameter")


def _max_tokens(body: dict, cfg: "ServeConfig", chat: bool) -> tuple[str, int | None]:
    """(the key that sets it, max_tokens or None); on chat, max_tokens and max_completion_tokens are
    both checked, and must agree when both are given."""
    given = {}
    for key in ("max_tokens", "max_completion_tokens") if chat else ("max_tokens",):
        value = _number(body, key, None, 1, cfg.max_tokens_limit, integer=True)
        if value is not None:
            given[key] = value
    if len(set(given.values())) > 1:
        raise APIError(400, f"max_tokens={given['max_tokens']} and max_completion_tokens="
                       f"{given['max_completion_tokens']} differ; give one of them (max_completion_tokens "
                       "is the newer name)", param="max_completion_tokens", code="invalid_value")
    key = "max_completion_tokens" if "max_completion_tokens" in given else "max_tokens"
    return key, given.get(key)


def parse_sampling(body: dict, prompt_len: int, cfg: "ServeConfig", ctx: int, chat: bool):
    """(SamplingParams, stream, include_usage) from an OpenAI request body; APIError on bad values."""
    from pretune.serve.engine import SamplingParams

    check_unimplemented(body, chat)
    key, max_tokens = _max_tokens(body, cfg, chat)
    room = ctx - prompt_len
    if max_tokens is None:
        max_tokens = min(cfg.default_max_tokens, room)
    elif max_tokens > room:
        raise APIError(400, f"the prompt has {prompt_len} tokens and {key}={max_tokens}; together they exceed "
                       f"the model's context of {ctx} tokens: lower {key} or shorten the prompt",
                       param=key, code="context_length_exceeded")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(isinstance(s, str) for s in stop)):
        raise APIError(400, "stop must be a string or a list of at most 4 strings", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise APIError(400, f"stream must be true or false, got {stream!r}", param="stream")
    opts = body.get("stream_options")
    if opts is not None and not stream:  # OpenAI's words
        raise APIError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                       param="stream_options")
    opts = opts or {}
    if not isinstance(opts, dict):
        raise APIError(400, "stream_options must be an object", param="stream_options")
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    top_p = _number(body, "top_p", None, 0.0, 1.0)
    top_k = _number(body, "top_k", None, -1, 1 << 30, integer=True)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0 if top_p == 0 else temperature,  # top_p 0 keeps the most likely token: greedy
        top_p=top_p,
        top_k=top_k if top_k and top_k > 0 else None,  # 0 and -1 (vLLM's default): no top-k cut
        seed=_number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
        stop=list(stop or []))
    if params.seed is not None and params.seed < 0:
        params.seed %= 1 << 64
    return params, bool(stream), bool(opts.get("include_usage"))


def chat_messages(body: dict) -> list[dict]:
    """OpenAI messages -> [{role, content}]; content given as text parts is joined, and the role
    `developer` (which OpenAI's newer models take in place of `system`) is rendered as `system`."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "developer":  # OpenAI's name for system, newer models
            m = dict(m, role="system")
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            parts = m["content"]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in parts):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content")
            m = dict(m, content="".join(p["text"] for p in parts))
        out.append(m)
    return out
