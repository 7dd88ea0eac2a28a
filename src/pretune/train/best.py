"""Early stopping's best model (train.early_stop_metric): the figure it is judged by, best/ on disk,
and what the end of a run takes from it.

best/model.safetensors holds the weights of the best evaluation so far (its step in the file's
metadata). It is written in place whenever the figure improves, so a run killed after its last
checkpoint can leave there the weights of a later step than the best one that checkpoint records.
Each checkpoint therefore keeps the best it knew: before a checkpoint is written, best/ gets
`step-NNNNNN.safetensors` for the best step (a hard link to model.safetensors, which later writes
replace by a new file, so the link keeps these weights; a copy where links are not supported). A
resumed run puts those weights back as model.safetensors, and files that no checkpoint refers to any
longer are removed. The final model is loaded only from weights whose step is the recorded best's.
"""

from __future__ import annotations

import math

import json
import os
import re
import secrets
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from pretune.errors import ConfigError
from pretune.files import atomic_write_bytes
from pretune.model.io import load_model_state
from pretune.train import checkpoint as ck

LOWER_IS_BETTER = ("loss", "ppl", "bpb", "perplexity")
BEST_DIR, BEST_FILE = "best", "model.safetensors"
_KEPT = re.compile(r"step-(\d+)\.safetensors")


class StaleBestModel(ck.RunDirError):
    """best/ does not hold the weights of the best step the run's state records."""


def track_best(state: dict, metric: str, step: int) -> bool:
    """Record an evaluation figure; True when it is the best so far. The best keeps its step, its
    value and every figure of its evaluation (the final model's figures when it becomes the final one)."""
    if metric not in state["eval"]:
        raise ConfigError(f"train.early_stop_metric={metric!r} is not among the evaluation figures "
                          f"({', '.join(sorted(state['eval'])) or 'none'})")
    value = float(state["eval"][metric])
    lower = metric.endswith(LOWER_IS_BETTER)
    best = state["best"]
    # a NaN figure is never better, and any number is better than a NaN best
    if best is None or (math.isnan(best["value"]) and not math.isnan(value)) or (
            value < best["value"] if lower else value > best["value"]):
        state["best"], state["bad_evals"] = {"step": step, "value": value, "eval": dict(state["eval"])}, 0
        return True
    state["bad_evals"] += 1
    return False


def save_best(run_dir: Path, weights: dict, step: int) -> None:
    """best/model.safetensors: the weights of the new best evaluation, at `step`."""
    atomic_write_bytes(run_dir / BEST_DIR / BEST_FILE, save(weights, metadata={"step": str(step)}))


def _step_of(path: Path) -> int | None:
    """The step a best/ weights file was written at (its metadata), None when it has none."""
    try:
        with safe_open(str(path), "pt") as fh:
            return int((fh.metadata() or {})["step"])
    except (OSError, SafetensorError, KeyError, ValueError):  # missing, unreadable or without a step: none
        return None


def _kept(run_dir: Path, step: int) -> Path:
    return run_dir / BEST_DIR / f"step-{step:06d}.safetensors"


def keep_for_checkpoint(run_dir: Path, state: dict) -> None:
    """Before a checkpoint is written: best/step-B.safetensors for its best step B (main rank)."""
    if state["best"] is None:
        return
    step = state["best"]["step"]
    kept, current = _kept(run_dir, step), run_dir / BEST_DIR / BEST_FILE
    if kept.is_file():  # made for an earlier checkpoint with the same best (a resume removed later ones)
        return
    if _step_of(current) != step:
        raise StaleBestModel(f"{current} does not hold the weights of step {step}, the best evaluation")
    try:
        os.link(current, kept)
    except OSError:  # no hard links on this file system: a copy
        atomic_write_bytes(kept, current.read_bytes())


def prune(run_dir: Path) -> None:
    """Remove best/step-*.safetensors that no checkpoint of the run refers to (main rank)."""
    directory = run_dir / BEST_DIR
    if not directory.is_dir():
        return
    wanted = set()
    for d in ck.checkpoint_dirs(run_dir):
        try:
            best = json.loads((d / "state.json").read_text()).get("best")
        except (OSError, ValueError):
            continue
        if best:
            wanted.add(int(best["step"]))
    for f in directory.iterdir():
        m = _KEPT.fullmatch(f.name)
        if (m and int(m[1]) not in wanted) or (f.name.startswith(".step-") and ".tmp-" in f.name):
            f.unlink(missing_ok=True)


def restore_on_resume(run_dir: Path, state: dict) -> None:
    """After a checkpoint is loaded (main rank): best/model.safetensors becomes the weights of the best
    step it records, whatever a killed session wrote there after it; unreferenced files go."""
    best = state.get("best")
    if best is not None:
        current = run_dir / BEST_DIR / BEST_FILE
        if _step_of(current) != best["step"]:
            kept = _kept(run_dir, best["step"])
            if not kept.is_file():
                raise StaleBestModel(
                    f"{current} does not hold the weights of step {best['step']}, the best evaluation the "
                    f"checkpoint records, and {kept} is missing; the best model cannot be restored; start the "
                    f"run again with overwrite=true")
            tmp = current.with_name(f".{BEST_FILE}.tmp-{secrets.token_hex(4)}")  # swept if a kill leaves it
            try:
                os.link(kept, tmp)
                os.replace(tmp, current)
            except OSError:
                tmp.unlink(missing_ok=True)
                atomic_write_bytes(current, kept.read_bytes())
    prune(run_dir)


def load_best(model, run_dir: Path, state: dict) -> None:
    """Load the best weights into the final model, refusing weights of another step."""
    path = run_dir / BEST_DIR / BEST_FILE
    found = _step_of(path)
    if found != state["best"]["step"]:
        raise StaleBestModel(f"{path} holds the weights of step {found}, not of step {state['best']['step']}, the "
                             f"best evaluation; resume the run to restore them")
    where = next(model.parameters()).device
    load_model_state(model, load_file(str(path), device=str(where)))


def final_figures(state: dict, metric: str) -> dict:
    """What the summary reports when the best model is the final one: its evaluation's figures, the
    step they come from, and the best figure itself."""
    best = state["best"]
    figures = best.get("eval") or {metric: best["value"]}  # a checkpoint of an older run kept the value alone
    return {**figures, "eval_step": best["step"], "best_step": best["step"], "best_metric": metric,
            "best_value": best["value"]}
