"""The run directory: refusing to clobber, atomic writes, checkpoints, the final model, lineage.

A checkpoint is a directory written under a temporary name, every file fsynced, then renamed into
place: a crash leaves either the whole checkpoint or none of it, never half of one.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pretune.errors import UserError
from pretune.files import atomic_dir, atomic_write_bytes, atomic_write_json  # noqa: F401 (re-exported)
from pretune.model.io import load_model_state, model_state

CKPT_PREFIX = "step-"


class RunDirError(UserError, RuntimeError):
    """The run directory cannot be used as asked; the message says what to do."""


def prepare_out_dir(out_dir: str | Path, overwrite: bool, resume: bool) -> Path:
    """Create out_dir, refusing one that holds another run unless told to overwrite or resume."""
    out = Path(out_dir)
    if resume:
        if not (out / "config.yaml").is_file():
            raise RunDirError(f"resume={out}: no run there (no config.yaml); check the path")
        return out
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RunDirError(
                f"out_dir {out} already holds files (a previous run?). Choose another out_dir, "
                f"set overwrite=true to replace it, or resume={out} to continue that run.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith(CKPT_PREFIX)
                  and (d / "state.json").is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, keep_last: int,
                    tokenizer=None, protect: set[int] | None = None) -> Path:
    """Everything needed to continue exactly: weights, optimiser, loop state, random state."""
    from dataclasses import asdict

    final = run_dir / "checkpoints" / f"{CKPT_PREFIX}{step:06d}"
    with atomic_dir(final) as tmp:
        save_file(model_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(asdict(model.cfg), indent=2))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(dict(state, step=step, saved_at=time.time()), indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
    protect = protect or set()
    old = [d for d in checkpoint_dirs(run_dir) if int(d.name[len(CKPT_PREFIX):]) not in protect]
    for d in old[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model, optimizer, device) -> dict:
    load_model_state(model, load_file(str(ckpt / "model.safetensors"), device=str(device)))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
    rng = torch.load(ckpt / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((ckpt / "state.json").read_text())


def write_lineage(run_dir: Path, stage: str, parent: str | None, **extra) -> None:
    parent_lineage = None
    if parent:
        pl = Path(parent) / "lineage.json"
        if not pl.is_file():
            pl = Path(parent).parent / "lineage.json"
        if pl.is_file():
            parent_lineage = json.loads(pl.read_text())
    atomic_write_json(run_dir / "lineage.json", {
        "stage": stage, "parent": str(Path(parent).resolve()) if parent else None,
        "parent_lineage": parent_lineage, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra})
