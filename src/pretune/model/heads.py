"""A classification head on the decoder: a linear layer on the last token's hidden state."""

from __future__ import annotations

import torch
import torch.nn as nn

from pretune.model.gpt import GPT


class ClassifierModel(nn.Module):
    """forward(input_ids, last) -> class logits (B, C); forward(input_ids) -> LM logits (for replay)."""

    def __init__(self, lm: GPT, n_classes: int):
        super().__init__()
        self.lm = lm
        self.cfg = lm.cfg
        self.head = nn.Linear(lm.cfg.d_model, n_classes)
        nn.init.normal_(self.head.weight, 0.0, 0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        if last is None:
            return self.lm(input_ids)
        hidden = self.lm(input_ids, return_hidden=True)  # (B, T, C); right padding leaves `last` exact
        return self.head(hidden[torch.arange(len(last), device=hidden.device), last])
