"""The run directory: refusing to clobber, atomic writes, checkpoints, the final model, lineage.

A checkpoint is a directory written under a temporary name, every file fsynced, then renamed into
place: a crash leaves either the whole checkpoint or none of it, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None

import torch
from safetensors.torch import load_file, save_file

from pretune.errors import UserError
from pretune.files import (TEMP_RANDOM, atomic_dir, atomic_write_bytes, atomic_write_json,  # noqa: F401 (re-exported)
                           set_aside)
from pretune.model.io import checkpoint_step, load_model_state, model_state
from pretune.train.rng import rng_state, seed_missing_rank, set_rng_state  # rng_state: train.loop uses it here

CKPT_PREFIX = "step-"


class RunDirError(UserError, RuntimeError):
    """The run directory cannot be used as asked; the message says what to do."""


# Files by which overwrite=true knows a directory as pretune's (a run, a cross-validation root, the
# demo's): names no other program writes together. It never deletes a directory that holds none of
# them (config.yaml alone is a name many projects use).
RUN_MARKERS = ("lineage.json", "metrics.jsonl", "checkpoints/step-*/state.json", "demo-study.yaml",
               "world/world.json")
# ...or that holds config.yaml and tokenizer.json alone (a run stopped before it wrote lineage.json)
RUN_FIRST_FILES = ("config.yaml", "tokenizer.json")

# Every name a run, a cross-validation root or the demo writes at the top of its directory. A
# directory that holds anything else is not replaced: that entry would be lost with it.
RUN_ENTRIES = frozenset({
    "config.yaml", "lineage.json", "metrics.jsonl", "summary.json", "predictions.jsonl",  # every run
    "tokenizer.json", "tokenizer_config.json",  # Tokenizer.save
    "model", "adapter", "best", "checkpoints",  # the final model, a LoRA adapter, early stopping's best
    "tensorboard", "mlflow_run_id",  # train/tracking.py
    ".lock",  # lock_run_dir
    "demo-study.yaml", "world", "study",  # pretune demo
})
_FOLD = re.compile(r"fold-\d+")  # finetune.cv's folds, each a run
# files and directories on their way in or out, exactly as pretune names them: .NAME.tmp-XXXXXXXX
# (files.atomic_write_bytes, files.atomic_dir: tempfile's 8 random characters), .NAME.old-PID (the copy
# atomic_dir replaces) and .NAME.trash-PID (rotation). A user's .config.yaml.original is none of them.
_TEMP = re.compile(rf"\.(?P<name>.+?)\.(?P<kind>tmp-{TEMP_RANDOM}|old-\d+|trash-\d+)")
_CKPT = re.compile(rf"{CKPT_PREFIX}\d+")
LOCK_FILE = ".lock"


def prepare_out_dir(out_dir: str | Path, overwrite: bool, resume: bool, keep: tuple = (),
                    until_started: bool = False) -> Path:
    """Create out_dir, refusing one that holds another run unless told to overwrite or resume.

    overwrite=true replaces only a directory that pretune wrote (RUN_MARKERS) and that holds nothing
    else (RUN_ENTRIES), and never one that holds a path in `keep` (the parent model, the data): those
    would be lost with it. Resuming takes the run's lock (lock_run_dir), then clears the debris a
    killed run left (sweep_debris). With `until_started` the replaced run is set aside rather than
    deleted (files.set_aside), until the new run starts training or fails before that
    (files.settle_aside). Call it on one process (rank 0)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{'resume' if resume else 'out_dir'}={out} is a file, not a directory; "
                          f"{'give the run directory' if resume else 'choose another out_dir'}")
    if resume:
        if not (out / "config.yaml").is_file():
            raise RunDirError(f"resume={out}: no run there (no config.yaml); check the path")
        lock_run_dir(out)  # before sweeping: a live run's temporary checkpoint is not debris
        sweep_debris(out)
        return out
    if out.exists() and not any(e.name != LOCK_FILE for e in out.iterdir()):
        refuse_if_locked(out)  # a lone lock: a run starting now, or one that stopped before it wrote anything
    elif out.exists():
        if not overwrite:
            raise RunDirError(
                f"out_dir {out} already holds files (a previous run?). Choose another out_dir, "
                f"set overwrite=true to replace it, or resume={out} to continue that run.")
        inside = [str(k) for k in keep if k and _within(Path(k), out)]
        if inside:
            raise RunDirError(f"overwrite=true would delete {', '.join(inside)} with out_dir {out}; "
                              "choose another out_dir")
        foreign = foreign_entries(out)
        if not written_by_pretune(out):
            raise RunDirError(f"out_dir {out} holds files that no pretune run wrote ("
                              f"{_names(foreign or sorted(e.name for e in out.iterdir()))}; none of "
                              f"{', '.join(RUN_MARKERS)} is there): overwrite=true replaces only runs. Choose "
                              "another out_dir, or empty it yourself")
        if foreign:
            raise RunDirError(f"out_dir {out} holds a run but also {_names(foreign)}, which no pretune run "
                              "writes: overwrite=true would delete them with it. Remove or move them, or "
                              "choose another out_dir")
        refuse_if_locked(out)
        if until_started:
            set_aside(out)
        else:
            shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"out_dir {out} cannot be created ({e.strerror or e}); choose another out_dir") from None
    return out


def _names(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def written_by_pretune(directory: Path) -> bool:
    """Whether `directory` holds a file by which pretune knows its own runs (RUN_MARKERS)."""
    if any(next(directory.glob(m), None) is not None for m in RUN_MARKERS):
        return True
    return all((directory / f).is_file() for f in RUN_FIRST_FILES)


def foreign_entries(directory: Path) -> list[str]:
    """The names at the top of `directory` that no pretune run writes (sorted)."""
    def ours(name: str) -> bool:
        if name in RUN_ENTRIES or _FOLD.fullmatch(name):
            return True
        temp = _TEMP.fullmatch(name)
        return bool(temp) and (temp["name"] in RUN_ENTRIES or bool(_FOLD.fullmatch(temp["name"])))

    return sorted(e.name for e in directory.iterdir() if not ours(e.name))


def _within(path: Path, directory: Path) -> bool:
    """Whether `path` (a file, a directory or a glob) is `directory` or lies inside it."""
    parts = path.expanduser().parts
    plain = Path(*parts[:next((i for i, x in enumerate(parts) if any(c in x for c in "*?[")), len(parts))] or ".")
    return plain.resolve().is_relative_to(directory.resolve())


def sweep_debris(run_dir: str | Path) -> list[Path]:
    """Remove what a killed run leaves behind and nothing reads: checkpoints being written
    (checkpoints/.step-N.tmp-*), replaced or rotated out (.old-*, .trash-*), an old checkpoint that
    rotation was deleting (no state.json), and the run's own temporary files and directories
    (.model.tmp-*, .summary.json.tmp-*, best/.model.safetensors.tmp-*). A copy that atomic_dir was
    replacing (.model.old-PID) whose new copy never took its name is the only one left: it is renamed
    back (restore_replaced), not removed. Hold the run's lock first (lock_run_dir): a live run's
    temporary files look the same. Returns what was removed."""
    run_dir = Path(run_dir)
    gone = []
    root = run_dir / "checkpoints"
    restore_replaced(root, lambda name: bool(_CKPT.fullmatch(name)))
    restore_replaced(run_dir, lambda name: name in RUN_ENTRIES)
    if root.is_dir():
        for d in root.iterdir():
            torn = d.is_dir() and checkpoint_step(d) is not None and not (d / "state.json").is_file()
            temp = _TEMP.fullmatch(d.name)
            if (temp and _CKPT.fullmatch(temp["name"]) and _debris(d, temp)) or torn:
                gone.append(d)
    for e in run_dir.iterdir() if run_dir.is_dir() else ():
        temp = _TEMP.fullmatch(e.name)
        if temp and temp["name"] in RUN_ENTRIES and _debris(e, temp):
            gone.append(e)
    best = run_dir / "best"  # early stopping's model.safetensors, written in place
    for f in best.iterdir() if best.is_dir() else ():
        temp = _TEMP.fullmatch(f.name)
        if temp and temp["name"] == "model.safetensors" and temp["kind"].startswith("tmp-"):
            gone.append(f)
    for p in gone:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return gone


def restore_replaced(directory: Path, ours) -> list[Path]:
    """Rename each `.NAME.old-PID` in `directory` (NAME accepted by `ours`) back to NAME when NAME is
    missing: atomic_dir was killed between moving the old copy aside and moving the new one in, and the
    old copy is the only one. The newest wins when there are several. Returns what was restored."""
    if not directory.is_dir():
        return []
    found = [(e, m["name"]) for e in directory.iterdir()
             if (m := _TEMP.fullmatch(e.name)) and m["kind"].startswith("old-") and ours(m["name"])]
    restored = []
    for e, name in sorted(found, key=lambda x: x[0].lstat().st_mtime, reverse=True):
        target = directory / name
        if target.exists() or target.is_symlink():
            continue  # the new copy is in place (or an older copy was just restored): debris
        try:
            e.rename(target)
        except OSError:
            continue  # left where it is: sweep_debris does not remove it while NAME is missing
        restored.append(target)
    return restored


def _debris(path: Path, temp: re.Match) -> bool:
    """Whether a temporary name matched by _TEMP may go: all but an old copy whose NAME is missing."""
    if not temp["kind"].startswith("old-"):
        return True
    final = path.with_name(temp["name"])
    return final.exists() or final.is_symlink()


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints (step-N with state.json), oldest first by step."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and checkpoint_step(d) is not None
             and (d / "state.json").is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def rotate_checkpoints(run_dir: Path, keep_last: int, protect: set[int] | None = None) -> None:
    """Delete all but the newest `keep_last` checkpoints (and those in `protect`). Each is renamed to
    a hidden name first, so a kill part-way leaves debris that sweep_debris clears, never a
    checkpoint with files missing."""
    protect = protect or set()
    old = [d for d in checkpoint_dirs(run_dir) if checkpoint_step(d) not in protect]
    for d in old[:-keep_last] if keep_last > 0 else []:
        trash = d.with_name(f".{d.name}.trash-{os.getpid()}")
        if trash.exists():
            shutil.rmtree(trash, ignore_errors=True)
        try:
            d.rename(trash)
        except OSError:
            continue  # left for the next rotation
        shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------- the run's lock

_LOCKS: dict[str, object] = {}  # resolved run directory -> its open lock file (kept open: closing unlocks)


def lock_run_dir(run_dir: str | Path) -> Path:
    """Take run_dir/.lock (flock, exclusive) for the rest of the process, or until unlock_run_dir, so
    that a second pretune process resuming or replacing the run is refused instead of writing into it.
    The file holds the holder's pid. Taking it again in the same process does nothing; where there is
    no fcntl (Windows) or the file system has no locks, nothing is locked. Call it on rank 0 alone."""
    run_dir = Path(run_dir)
    path, key = run_dir / LOCK_FILE, str(run_dir.resolve())
    if fcntl is None or (key in _LOCKS and _same_file(_LOCKS[key], path)):
        return path
    unlock_run_dir(run_dir)  # a lock on a file since deleted (the directory was removed and made again)
    try:
        fh = open(os.open(path, os.O_RDWR | os.O_CREAT, 0o666), "r+", encoding="ascii")  # noqa: SIM115 (stays open)
    except OSError as e:
        raise RunDirError(f"cannot write {path} ({e.strerror or e}); check that {run_dir} is a directory "
                          "you can write to") from None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _pid_in(fh)
        fh.close()
        raise RunDirError(_busy(run_dir, holder)) from None
    except OSError:  # no locks on this file system (some network mounts): go on unlocked
        fh.close()
        return path
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    _LOCKS[key] = fh
    return path


def _same_file(fh, path: Path) -> bool:
    """Whether the open file `fh` is still the file at `path`."""
    try:
        return os.path.samestat(os.fstat(fh.fileno()), os.stat(path))
    except (OSError, ValueError):
        return False


def unlock_run_dir(run_dir: str | Path) -> None:
    """Let go of the lock lock_run_dir took (at the end of a run, in a process that runs several)."""
    fh = _LOCKS.pop(str(Path(run_dir).resolve()), None)
    if fh is not None:
        fh.close()


def refuse_if_locked(run_dir: Path) -> None:
    """Raise RunDirError when another process holds run_dir's lock (a live run); let go of ours."""
    unlock_run_dir(run_dir)
    if fcntl is None or not (run_dir / LOCK_FILE).is_file():
        return
    with open(run_dir / LOCK_FILE, "r", encoding="ascii") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(_busy(run_dir, _pid_in(fh))) from None
        except OSError:
            return


def _pid_in(fh) -> str:
    try:
        fh.seek(0)
        return fh.read().strip() or "unknown"
    except (OSError, ValueError):
        return "unknown"


def _busy(run_dir: Path, pid: str) -> str:
    return (f"another pretune process is using {run_dir} (pid {pid}); wait for it or choose another "
            "out_dir")


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
    rotate_checkpoints(run_dir, keep_last, protect)
    return final


def load_checkpoint(ckpt: Path, model, optimizer, device, rank: int = 0, seed: int = 0) -> dict:
    """Restore weights, optimiser and this rank's random state; return the loop state.

    Either format loads into a plain, DDP or FSDP model: a sharded (DCP) checkpoint reshards to
    any number of processes, and a safetensors one is spread over the shards of an FSDP model. A
    rank beyond those that wrote the checkpoint gets a random stream of its own (rng.seed_missing_rank,
    from `seed`, the step and the rank), not another rank's. A checkpoint whose files cannot be read
    raises RunDirError naming it (see _read)."""
    from pretune.train.dist import is_sharded

    ckpt = Path(ckpt)
    state = _read(ckpt, lambda: json.loads((ckpt / "state.json").read_text()))
    if (ckpt / DCP_DIR).is_dir():
        _load_dcp(ckpt, model, optimizer)
        saved, mine = len(list(ckpt.glob("rng-*.pt"))), ckpt / f"rng-{rank:05d}.pt"
        if rank >= saved > 0:
            seed_missing_rank(seed, state.get("step", 0), rank)
        else:
            set_rng_state(_read(ckpt, lambda: torch.load(mine, weights_only=False)))
    else:
        if is_sharded(model):
            _load_full_into_sharded(ckpt, model, optimizer)
        else:
            weights = _read(ckpt, lambda: load_file(str(ckpt / "model.safetensors"), device=str(device)))
            saved = _read(ckpt, lambda: torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
            load_model_state(model, weights)
            optimizer.load_state_dict(saved)
        rng = _read(ckpt, lambda: torch.load(ckpt / "rng.pt", weights_only=False))
        ranks = rng.get("ranks") or [rng]
        if rank < len(ranks):
            set_rng_state(ranks[rank])
        else:
            seed_missing_rank(seed, state.get("step", 0), rank)
    return state


def _read(ckpt: Path, read):
    """read(), with a checkpoint file that is missing, cut short or damaged (a full disk, a copy
    interrupted) turned into a RunDirError that names the checkpoint and the one before it. It does not
    fall back by itself: the user decides to lose the steps since the previous checkpoint."""
    import pickle

    from safetensors import SafetensorError

    try:
        return read()
    except (UserError, torch.OutOfMemoryError):
        raise
    except (SafetensorError, OSError, EOFError, pickle.UnpicklingError, ValueError, RuntimeError, IndexError,
            KeyError) as e:
        step = checkpoint_step(ckpt) or 0
        earlier = [d for d in checkpoint_dirs(ckpt.parent.parent) if checkpoint_step(d) < step]
        then = (f"remove it (rm -r {ckpt}) to resume from the previous checkpoint, {earlier[-1]}" if earlier else
                "it is the run's only checkpoint: start the run again with overwrite=true")
        raise RunDirError(f"checkpoint {ckpt} cannot be read ({type(e).__name__}: {e}); it is damaged or "
                          f"incomplete. To go on, {then}") from None


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

    from pretune.train.dist import barrier, broadcast_object, quiet_single_process_dcp

    final = run_dir / "checkpoints" / f"{CKPT_PREFIX}{step:06d}"
    msd, osd = get_state_dict(model, optimizer)
    with (atomic_dir(final) if rt.is_main else contextlib.nullcontext()) as tmp:
        tmp = Path(broadcast_object(str(tmp) if rt.is_main else None, rt))
        with quiet_single_process_dcp(not rt.distributed):
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
        rotate_checkpoints(run_dir, keep_last, protect)
    return final


def _load_dcp(ckpt: Path, model, optimizer) -> None:
    """Load a DCP checkpoint into a sharded or plain model and its optimiser (any process count)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": msd, "optim": osd}
    import torch.distributed as dist

    from pretune.train.dist import quiet_single_process_dcp
    single = not (dist.is_available() and dist.is_initialized())
    with quiet_single_process_dcp(single):
        dcp.load(sd, checkpoint_id=str(ckpt / DCP_DIR), no_dist=single)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def _load_full_into_sharded(ckpt: Path, model, optimizer) -> None:
    """A safetensors checkpoint (DDP or one process) into an FSDP model: every rank reads the full
    tensors and keeps its shards; the optimiser's positional state is keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    sd = _read(ckpt, lambda: load_file(str(ckpt / "model.safetensors")))
    saved = _read(ckpt, lambda: torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
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
    pl = next((f for f in (Path(str(parent)) / "lineage.json", Path(str(parent)).parent / "lineage.json")
               if parent and f.is_file()), None)
    if isinstance(data := extra.get("data"), dict):  # corpus.describe(): sources by absolute path, as in config.yaml
        extra["data"] = {k: {str(Path(n).absolute()): v for n, v in s.items()} if k in ("train", "val")
                         and isinstance(s, dict) else s for k, s in data.items()}
    atomic_write_json(run_dir / "lineage.json", {
        "stage": stage, "parent": str(Path(parent).resolve()) if parent else None,
        "parent_lineage": json.loads(pl.read_text()) if pl else None, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "id": uuid.uuid4().hex,  # which run this is: a run made again in the same second has another
        **extra})
