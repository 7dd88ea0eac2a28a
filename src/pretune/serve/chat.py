"""`pretune chat MODEL`: talk to a model in the terminal.

Each line you type is a user message; the reply streams as it is generated. The conversation is
kept and rendered with the model's chat template (data/templates.py) for every turn; when it no
longer fits the model's context, the oldest turns are dropped (a system message stays); a message
too long to fit on its own is refused and the history kept. Commands: `/reset` clears the history,
`/exit` (or end of input) leaves. Ctrl-C stops a reply.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from pretune.errors import ConfigError, UserError


@dataclass
class ChatConfig:
    """`pretune chat MODEL [KEY=VALUE ...]`."""

    system: str | None = None
    """A system message that starts every conversation."""
    max_tokens: int = 256
    """Most tokens per reply (capped by what is left of the context)."""
    temperature: float = 0.7
    """Sampling temperature, 0 or more; 0 is greedy."""
    top_p: float | None = None
    """Nucleus sampling, 0 to 1: the smallest set of tokens whose probability reaches p; 0 keeps the
    most likely token alone (greedy), 1 or None: no cut."""
    top_k: int | None = None
    """Sample from the k most likely tokens only; 0 or None: no top-k cut."""
    seed: int | None = None
    """Seed for reproducible replies: turn i of a conversation uses seed + i (from 0 again after
    /reset, so the same conversation gets the same replies)."""
    max_seq_len: int | None = None
    """The context of the conversation; default the model's, capped at 8192 (a model with a longer
    one says so at start)."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda'."""

    def problems(self) -> list[str]:
        """Every impossible value, each naming its key and the fix."""
        from pretune.eval.options import sampling_problems

        p = []
        if self.max_tokens < 1:
            p.append(f"max_tokens={self.max_tokens}: must be at least 1")
        p += sampling_problems(self.temperature, self.top_k, self.top_p)
        if self.max_seq_len is not None and self.max_seq_len < 2:
            p.append(f"max_seq_len={self.max_seq_len}: must be at least 2 (a prompt token and a reply token)")
        return p


HELP_CONFIG = ChatConfig


class ConversationTooLong(UserError, ValueError):
    """The last message alone does not fit the model's context."""


class ChatSession:
    """A conversation with a model through an Engine: history, prompt building, streamed replies."""

    def __init__(self, engine, tokenizer, cfg: ChatConfig):
        self.engine, self.tokenizer, self.cfg = engine, tokenizer, cfg
        self.ctx = engine.ctx
        self.messages: list[dict] = []
        self.turn = 0
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays); the seed starts again from turn 0."""
        self.messages = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        self.turn = 0

    def prompt_ids(self, messages: list[dict]) -> tuple[list[int], list[dict]]:
        """(token ids, the messages they render): `messages` less its oldest turns, as few as need to
        go for a reply to fit. `messages` itself is left as it is; ConversationTooLong when its last
        message alone does not fit."""
        from pretune.data.templates import render_chat

        room = min(self.cfg.max_tokens, max(1, self.ctx // 4))  # keep at least this much for the reply
        messages = list(messages)
        while True:
            ids = self.tokenizer.encode(render_chat(messages, self.tokenizer))
            if len(ids) + room <= self.ctx:
                return ids, messages
            first = 1 if messages and messages[0]["role"] == "system" else 0
            if len(messages) - first <= 1:
                raise ConversationTooLong(f"the message is {len(ids)} tokens with the template; the model's "
                                          f"context is {self.ctx} tokens: send a shorter one")
            del messages[first]  # the oldest turn: a user message and the reply to it
            if len(messages) > first + 1 and messages[first]["role"] == "assistant":
                del messages[first]

    def send(self, text: str, write: Callable[[str], None]) -> str:
        """Add a user message, stream the reply through `write`, keep it in the history, return it.
        A message too long for the context (ConversationTooLong) leaves the history as it was."""
        from pretune.serve.engine import SamplingParams

        ids, self.messages = self.prompt_ids(self.messages + [{"role": "user", "content": text}])
        c = self.cfg
        params = SamplingParams(max_tokens=min(c.max_tokens, self.ctx - len(ids)), temperature=c.temperature,
                                top_p=c.top_p, top_k=c.top_k,
                                seed=None if c.seed is None else c.seed + self.turn)
        self.turn += 1
        parts: list[str] = []
        try:
            for ev in self.engine.generate(ids, params):
                if ev.error:
                    raise RuntimeError(f"generation failed: {ev.error}")
                if ev.text:
                    parts.append(ev.text)
                    write(ev.text)
        finally:  # an interrupted reply is kept as far as it went
            self.messages.append({"role": "assistant", "content": "".join(parts)})
        return "".join(parts)


def chat_loop(session: ChatSession, stdin: TextIO, stdout: TextIO, interactive: bool = False) -> None:
    """Read user lines from `stdin` until /exit or end of input; write replies to `stdout`."""
    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    if interactive:
        write("chat with the model; /reset clears the history, /exit leaves\n")
    while True:
        if interactive:
            write("you> ")
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            write("\n")
            return
        if not line:
            return
        text = line.rstrip("\r\n")
        command = text.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            session.reset()
            write("(history cleared)\n")
            continue
        if not command:
            continue
        write("assistant> ")
        try:
            session.send(text, write)
        except KeyboardInterrupt:
            write(" [stopped]")
        except ConversationTooLong as e:
            write(f"(error: {e})")
        write("\n")


def cmd_chat(argv: list[str]) -> int:
    """Load the model and chat on the terminal."""
    from pretune.cli import model_arg, split_args
    from pretune.config import load_config
    from pretune.serve.engine import Engine
    from pretune.serve.server import load_served_model
    from pretune.train.dist import pick_device

    yaml_path, model_path, overrides = split_args(argv)
    cfg = load_config(ChatConfig, yaml_path, overrides)
    if cfg.problems():
        raise ConfigError(cfg.problems())
    model, tok = load_served_model(model_arg(model_path, "chat"), pick_device(cfg.device), cfg.max_seq_len)
    if tok is None:
        raise UserError(f"{model_path} has no tokenizer.json; chat needs the model's tokenizer")
    engine = Engine(model, tok, max_batch=1).start()
    try:
        chat_loop(ChatSession(engine, tok, cfg), sys.stdin, sys.stdout, interactive=sys.stdin.isatty())
    finally:
        engine.close()
    return 0
