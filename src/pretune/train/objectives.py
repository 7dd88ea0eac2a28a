"""Training objectives. Each returns a loss SUMMED over its targets; the loop divides by the number of
target tokens in the whole optimiser step, so every target token weighs the same whatever the
masking, padding or micro-batching.
"""

from __future__ import annotations

import torch

from pretune.model.gpt import cross_entropy_sum


class LMObjective:
    """Next-token prediction on `input_ids` -> `targets` (-100 marks tokens without loss)."""

    def count(self, batch: dict) -> int:
        return int((batch["targets"] != -100).sum())

    def __call__(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return cross_entropy_sum(model(batch["input_ids"]), batch["targets"])

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """A per-step regulariser added once per optimiser step (none for plain LM training)."""
        return None
