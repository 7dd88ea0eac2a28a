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
    """data.val: the text to evaluate on (files, globs, directories)."""
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
