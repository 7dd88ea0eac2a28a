"""The configs of the evaluation verbs: `pretune generate` and `pretune evaluate` (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pretune.config import DataConfig


@dataclass
class GenerateConfig:
    """`pretune generate MODEL [KEY=VALUE ...]`."""

    prompt: str = "\n"
    """Text to continue."""
    max_new_tokens: int = 200
    """Tokens to sample after the prompt."""
    temperature: float = 0.8
    """Sampling temperature; 0 is greedy."""
    top_k: int | None = 200
    """Sample from the k most likely tokens only."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set of tokens whose probability reaches p."""
    seed: int | None = None
    """Seed for reproducible samples."""
    num_samples: int = 1
    """How many continuations to print."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda'."""


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
    max_new_tokens: int = 64
    """Generation tasks: tokens generated per example."""
    eval_examples: int = 200
    """Generation tasks: at most this many examples get generation figures (loss covers all)."""
    reference: str | None = None
    """Preference: a reference model for DPO's reward margin (without one, the model's own margins)."""
    dpo_beta: float | None = None
    """Preference: DPO's beta for the reward margin; None: the one the model was tuned with, else 0.1."""
    predictions: str | None = None
    """Task records: also write each example's prediction and scores to this JSONL file."""
    seq_len: int | None = None
    """Context length; None means the model's max_seq_len."""
    max_tokens: int = 10_000_000
    """Evaluate at most this many tokens."""
    batch_size: int = 16
    """Sequences per forward pass."""
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
        return problems
