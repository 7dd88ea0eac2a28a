"""OpenAI request bodies, read and checked: the sampling parameters and the chat messages of a
request, or an APIError that the server returns in OpenAI's error format.

Parameters that would change the output but are not implemented (n > 1, echo, suffix, logprobs,
logit_bias, presence/frequency penalties, a JSON response_format, tools) are refused with 400
rather than ignored; their neutral values (n 1, penalties 0, logit_bias {}, response_format text)
are accepted.
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


# Parameters this server does not implement -> the values that leave the output unchanged.
_NEUTRAL_ONLY = (
    ("n", lambda v: v in (None, 1)), ("best_of", lambda v: v in (None, 1)),
    ("echo", lambda v: not v), ("suffix", lambda v: not v),
    ("logprobs", lambda v: v is None or v is False),  # 0 asks for the sampled tokens' own
    ("top_logprobs", lambda v: not v), ("tools", lambda v: not v), ("functions", lambda v: not v),
    ("tool_choice", lambda v: v in (None, "none", "auto")),
    ("function_call", lambda v: v in (None, "none", "auto")),
)


def check_unimplemented(body: dict) -> None:
    """Refuse (400) parameters that would change the output but are not implemented, and wrongly typed
    ones; their neutral values (presence_penalty 0, logit_bias {}, response_format text, ...) pass, so
    clients that always send them work."""
    for key, neutral in _NEUTRAL_ONLY:
        if not neutral(body.get(key)):
            raise _unsupported(key, body[key])
    _check_penalty(body, "presence_penalty")
    _check_penalty(body, "frequency_penalty")
    _check_logit_bias(body)
    _check_response_format(body)


def parse_sampling(body: dict, prompt_len: int, cfg: "ServeConfig", ctx: int, chat: bool):
    """(SamplingParams, stream, include_usage) from an OpenAI request body; APIError on bad values."""
    from pretune.serve.engine import SamplingParams

    check_unimplemented(body)
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    room = ctx - prompt_len
    max_tokens = _number(body, key, None, 1, cfg.max_tokens_limit, integer=True)
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
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise APIError(400, "stream_options must be an object", param="stream_options")
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    top_p = _number(body, "top_p", None, 0.0, 1.0)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0 if top_p == 0 else temperature,  # top_p 0 keeps the most likely token: greedy
        top_p=top_p,
        top_k=_number(body, "top_k", None, 1, 1 << 30, integer=True),
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
