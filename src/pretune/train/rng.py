"""Each process's random state (dropout, LoRA dropout), saved in checkpoints and restored on resume.

A fresh run seeds rank r with seed + 1 + r (train.loop). A checkpoint holds the state of every rank
that wrote it; a run resumed on more processes than that gives each rank without a saved state a
stream of its own, seeded from (seed, step, rank): distinct across ranks, the same every time that
checkpoint is resumed on that many processes.
"""

from __future__ import annotations

import hashlib

import torch


def rng_state() -> dict:
    """This process's random state: the CPU's, and its own GPU's when there is one (not every visible
    GPU's, so a run resumes where fewer GPUs are visible)."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    cuda = rng.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # written before: one state per visible GPU
            cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda)


def resumed_rank_seed(seed: int, step: int, rank: int) -> int:
    """The seed of a rank that its checkpoint holds no random state for (63 bits of a hash: no
    arithmetic coincidence with another rank's, or with a fresh run's seed + 1 + r)."""
    digest = hashlib.sha256(f"pretune-rng:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_missing_rank(seed: int, step: int, rank: int) -> None:
    """Seed this process (CPU and GPUs) for a rank the checkpoint at `step` has no random state for."""
    torch.manual_seed(resumed_rank_seed(seed, step, rank))
