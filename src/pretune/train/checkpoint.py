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


# Files by which overwrite=true knows a directory as pretune's (a run, a cross-validation root, the
# demo's): it never deletes a directory that holds none of them.
RUN_MARKERS = ("config.yaml", "summary.json", "lineage.json", "demo-study.yaml", "world/world.json")


def prepare_out_dir(out_dir: str | Path, overwrite: bool, resume: bool, keep: tuple = ()) -> Path:
    """Create out_dir, refusing one that holds another run unless told to overwrite or resume.

    overwrite=true replaces only a directory that pretune wrote (RUN_MARKERS), and never one that
    holds a path in `keep` (the parent model, the data): those would be lost with it."""
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
        inside = [str(k) for k in keep if k and _within(Path(k), out)]
        if inside:
            raise RunDirError(f"overwrite=true would delete {', '.join(inside)} with out_dir {out}; "
                              "choose another out_dir")
        if not any((out / m).exists() for m in RUN_MARKERS):
            raise RunDirError(f"out_dir {out} holds files that no pretune run wrote (none of "
                              f"{', '.join(RUN_MARKERS)}); overwrite=true replaces only runs. Choose another "
                              "out_dir, or empty it yourself")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _within(path: Path, directory: Path) -> bool:
    """Whether `path` (a file, a directory or a glob) is `directory` or lies inside it."""
    parts = path.expanduser().parts
    plain = Path(*parts[:next((i for i, x in enumerate(parts) if any(c in x for c in "*?[")), len(parts))] or ".")
    return plain.resolve().is_relative_to(directory.resolve())


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith(CKPT_PREFIX)
                  and (d / "state.json").is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


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


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, keep_last: int,
                    tokenizer=None, protect: set[int] | None = None, rank_rng: list[dict] | None = None) -> Path:
    """Everything needed to continue exactly: weights, optimiser, loop state, random state
    (`rank_rng`: every rank's random state, gathered, in a data-parallel run)."""
    from dataclasses import asdict

    final = run_dir / "checkpoints" / f"{CKPT_PREFIX}{step:06d}"
    with atomic_dir(final) as tmp:
        save_file(model_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(asdict(model.cfg), indent=2))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = rng_state()
        if rank_rng:
            rng["ranks"] = rank_rng
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(dict(state, step=step, saved_at=time.time()), indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
    protect = protect or set()
    old = [d for d in checkpoint_dirs(run_dir) if int(d.name[len(CKPT_PREFIX):]) not in protect]
    for d in old[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model, optimizer, device, rank: int = 0) -> dict:
    """Restore weights, optimiser and this rank's random state; return the loop state.

    Either format loads into a plain, DDP or FSDP model: a sharded (DCP) checkpoint reshards to
    any number of processes, and a safetensors one is spread over the shards of an FSDP model."""
    from pretune.train.dist import is_sharded

    if (ckpt / DCP_DIR).is_dir():
        _load_dcp(ckpt, model, optimizer)
        names = sorted(ckpt.glob("rng-*.pt"))
        mine = ckpt / f"rng-{rank:05d}.pt"
        set_rng_state(torch.load(mine if mine.is_file() else names[0], weights_only=False))
    else:
        if is_sharded(model):
            _load_full_into_sharded(ckpt, model, optimizer)
        else:
            load_model_state(model, load_file(str(ckpt / "model.safetensors"), device=str(device)))
            optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
        rng = torch.load(ckpt / "rng.pt", weights_only=False)
        ranks = rng.get("ranks") or [rng]
        set_rng_state(ranks[rank] if rank < len(ranks) else rng)
    return json.loads((ckpt / "state.json").read_text())


# ----------------------------------------------------------------------------- sharded (FSDP)

DCP_DIR = "dcp"


def save_checkpoint_sharded(run_dir: Path, step: int, model, optimizer, state: dict, keep_last: int,
                            rt, tokenizer=None, protect: set[int] | None = None) -> Path:
    """A checkpoint of an FSDP run, written by every rank together (a collective).

    dcp/ holds the model and optimiser state through torch.distributed.checkpoint (each rank writes
    its shards; loading reshards them to any number of processes), rng-RRRRR.pt each rank's random
    state; state.json, config.json and the tokenizer as in save_checkpoint. Rank 0 renames the
    finished directory into place, so a crash leaves the whole checkpoint or none of it. With
    several nodes, run_dir must be on a file system that every node sees."""
    import contextlib
    from dataclasses import asdict

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from pretune.train.dist import barrier, broadcast_object

    final = run_dir / "checkpoints" / f"{CKPT_PREFIX}{step:06d}"
    msd, osd = get_state_dict(model, optimizer)
    with (atomic_dir(final) if rt.is_main else contextlib.nullcontext()) as tmp:
        tmp = Path(broadcast_object(str(tmp) if rt.is_main else None, rt))
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / DCP_DIR), no_dist=not rt.distributed)
        torch.save(rng_state(), tmp / f"rng-{rt.rank:05d}.pt")
        barrier(rt)
        if rt.is_main:
            cfg = getattr(model, "cfg", None) or getattr(getattr(model, "lm", None), "cfg", None)
            if cfg is not None:
                (tmp / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
            (tmp / "state.json").write_text(json.dumps(dict(state, step=step, saved_at=time.time()), indent=2))
            if tokenizer is not None:
                tokenizer.save(tmp)
    barrier(rt)
    if rt.is_main:
        protect = protect or set()
        old = [d for d in checkpoint_dirs(run_dir) if int(d.name[len(CKPT_PREFIX):]) not in protect]
        for d in old[:-keep_last]:
            shutil.rmtree(d, ignore_errors=True)
    return final


def _load_dcp(ckpt: Path, model, optimizer) -> None:
    """Load a DCP checkpoint into a sharded or plain model and its optimiser (any process count)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": msd, "optim": osd}
    import torch.distributed as dist

    dcp.load(sd, checkpoint_id=str(ckpt / DCP_DIR), no_dist=not (dist.is_available() and dist.is_initialized()))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def _load_full_into_sharded(ckpt: Path, model, optimizer) -> None:
    """A safetensors checkpoint (DDP or one process) into an FSDP model: every rank reads the full
    tensors and keeps its shards; the optimiser's positional state is keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    sd = load_file(str(ckpt / "model.safetensors"))
    saved = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    names = {id(p): n for n, p in model.named_parameters()}
    by_index: dict[int, str] = {}
    for live, old in zip(optimizer.param_groups, saved["param_groups"]):
        for p, i in zip(live["params"], old["params"]):
            by_index[i] = names[id(p)]
    osd = {"state": {by_index[i]: s for i, s in saved["state"].items()},
           "param_groups": [dict(g, params=[by_index[i] for i in g["params"]]) for g in saved["param_groups"]]}
    set_state_dict(model, optimizer, model_state_dict=sd, optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True, strict=False))


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
