"""The configs of the evaluation verbs: `pretune generate` and `pretune evaluate` (no torch here)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pretune.config import DataConfig


@dataclass
class GenerateConfig:
    """`pretune generate MODEL [KEY=VALUE ...]`."""

    prompt: str = "\n"
    """Text to continue."""
    max_new_tokens: int = 200
    """Tokens to sample after the prompt (at least 1)."""
    temperature: float = 0.8
    """Sampling temperature, 0 or more; 0 is greedy."""
    top_k: int | None = 200
    """Sample from the k most likely tokens only; 0 or None: no top-k cut (as in transformers)."""
    top_p: float | None = None
    """Nucleus sampling, 0 to 1: the smallest set of tokens whose probability reaches p; 0 keeps the
    most likely token alone (greedy, as the server's top_p=0), 1 or None: no cut."""
    seed: int | None = None
    """Seed for reproducible samples."""
    num_samples: int = 1
    """How many continuations to print (at least 1)."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda'."""

    def problems(self) -> list[str]:
        """Every impossible value, each naming its key and the fix."""
        p = []
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            p.append(f"max_new_tokens={self.max_new_tokens}: must be at least 1 (the tokens to sample)")
        p += sampling_problems(self.temperature, self.top_k, self.top_p)
        if self.num_samples < 1:
            p.append(f"num_samples={self.num_samples}: must be at least 1 (how many continuations to print)")
        return p


def _at_least(value: float, low: float) -> bool:
    """A finite number >= low (NaN and infinities are not)."""
    return math.isfinite(value) and value >= low


def sampling_problems(temperature: float, top_k: int | None, top_p: float | None) -> list[str]:
    """The impossible sampling settings of `pretune generate` and `pretune chat`, each naming its key."""
    p = []
    if not _at_least(temperature, 0):
        p.append(f"temperature={temperature}: must be 0 (greedy) or more")
    if top_k is not None and top_k < 0:
        p.append(f"top_k={top_k}: must be 1 or more, or 0 (or null) for no top-k cut")
    if top_p is not None and not (_at_least(top_p, 0) and top_p <= 1):
        p.append(f"top_p={top_p}: must be between 0 and 1 (1 or null: no nucleus cut; 0: greedy)")
    return p


@dataclass
class EvaluateConfig:
    """`pretune evaluate MODEL data.val=FILE [KEY=VALUE ...]`."""

    data: DataConfig = field(default_factory=DataConfig)
    """data.val: the text or task records to evaluate on (files, globs, directories); task records are
    read with the field names of `pretune finetune` (data.text_field, data.label_field, ...)."""
    task: str | None = None
    """'classification', 'instruction', 'text2text' or 'preference' for the task's figures, 'lm' for
    loss, perplexity and bits per byte; None: the task a fine-tuned model was trained for, else 'lm'."""
    max_len: int | None = None
    """Task records: longest example in tokens (longer ones are cut, and counted); None: the
    finetune.max_len the model was tuned with (its task.json), else 256."""
    truncation: str | None = None
    """Task records: which end of a long prompt is cut, 'left' or 'right'; None: as the model was tuned."""
    prompt_loss: bool | None = None
    """Instruction and text2text: whether the loss also counts prompt tokens; None: as the model was tuned."""
    turns: str | None = None
    """Instruction: loss on the 'last' assistant turn or on 'all' of them; None: as the model was tuned."""
    max_new_tokens: int | None = None
    """Generation tasks: tokens generated per example (at least 1); None: as many as the fine-tuned run
    scored itself with (its task.json), else 64."""
    eval_examples: int | None = None
    """Generation tasks: at most this many examples get generation figures (loss covers all; at least
    1); None: every example, as a run scores its test set."""
    reference: str | None = None
    """Preference: a reference model for DPO's reward margin (without one, the model's own margins)."""
    dpo_beta: float | None = None
    """Preference: DPO's beta for the reward margin; None: the one the model was tuned with, else 0.1."""
    predictions: str | None = None
    """Task records: also write each example's prediction and scores to this JSONL file."""
    seq_len: int | None = None
    """Context length in tokens, 1 or more (at most the model's max_seq_len); None (leave it unset):
    the model's max_seq_len."""
    max_tokens: int = 10_000_000
    """Evaluate at most this many tokens (at least one window of seq_len)."""
    batch_size: int = 16
    """Sequences per forward pass (at least 1)."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda'."""
    out: str | None = None
    """Also write the figures to this JSON file."""

    def problems(self) -> list[str]:
        from pretune.config import TASKS

        allowed = (*TASKS, "lm")
        problems = []
        if self.task is not None and self.task not in allowed:
            problems.append(f"task={self.task!r} must be one of {', '.join(allowed)}")
        if self.truncation not in (None, "left", "right"):
            problems.append(f"truncation={self.truncation!r} must be 'left' or 'right'")
        if self.turns not in (None, "last", "all"):
            problems.append(f"turns={self.turns!r} must be 'last' or 'all'")
        if self.max_len is not None and self.max_len < 2:
            problems.append(f"max_len={self.max_len} must be at least 2 tokens")
        if self.seq_len is not None and self.seq_len < 1:
            problems.append(f"seq_len={self.seq_len}: must be at least 1 token; leave it unset (null) for the "
                            "model's context")
        if self.max_tokens < 1:
            problems.append(f"max_tokens={self.max_tokens}: must be at least 1 (the tokens to evaluate)")
        elif self.seq_len is not None and self.max_tokens < self.seq_len:
            problems.append(f"max_tokens={self.max_tokens} is less than one window of seq_len={self.seq_len} "
                            f"tokens, so nothing would be scored; set max_tokens >= {self.seq_len} or a smaller "
                            "seq_len")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size}: must be at least 1 (sequences per forward pass)")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens}: must be at least 1 (tokens generated per example)")
        if self.eval_examples is not None and self.eval_examples < 1:
            problems.append(f"eval_examples={self.eval_examples}: must be at least 1 (the examples that get "
                            "generation figures; with none they would read 0)")
        if self.dpo_beta is not None and not (_at_least(self.dpo_beta, 0) and self.dpo_beta > 0):
            problems.append(f"dpo_beta={self.dpo_beta}: must be more than 0 (or null: as the model was tuned)")
        return problems
