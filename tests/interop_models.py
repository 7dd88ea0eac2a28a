"""Tiny models and tokenizers shared by the interop tests (test_interop.py, test_gguf.py): random
weights spread wide enough that greedy decoding has no near-ties, and run directories as training
leaves them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretune.data.tokenizer import Tokenizer, train_bpe, train_char
from pretune.model.config import ModelConfig, resolve_model_config
from pretune.model.gpt import GPT
from pretune.model.io import save_model_dir

TEXT = ["the quick brown fox jumps over the lazy dog. café ", "a bird sings in the old tree by the river.\n",
        "User: hello there!\nAssistant: hi, how can I help?\n"] * 20
TOL = 1e-4
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """Byte-level BPE with a chat template (a fixture: import it into the test module)."""
    tok = train_bpe(iter(TEXT), vocab_size=300)
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def char() -> Tokenizer:
    return train_char(TEXT)


def spread(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    """Random weights (biases and norms included) far enough from init that logits are distinct."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "norm" in name else 0.0))
    return model.eval()


def pretune_model(tok: Tokenizer, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = resolve_model_config(ModelConfig(preset="tiny", vocab_size=tok.vocab_size + 3, **kw))
    return spread(GPT(cfg), seed)


def save_run(model: GPT, tok: Tokenizer, run: Path) -> Path:
    """A run directory as training leaves it: model/ and the tokenizer beside it."""
    save_model_dir(model, run / "model", tok)
    tok.save(run)
    return run
