"""pretune: pre-train, continue pre-training or fine-tune a language model, and measure which pays off.

Importing this package is cheap on purpose (no torch): the CLI imports heavy modules lazily.
"""

__version__ = "0.1.0"
