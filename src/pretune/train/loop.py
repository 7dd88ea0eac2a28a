"""The one training loop. Pre-training, continued pre-training and every fine-tuning method run
through `train()`; they differ only in the model's initial weights and trainable parameters, the
data, and the objective.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from pretune.config import Config
from pretune.errors import UserError
from pretune.files import settle_aside
from pretune.train import best as bm
from pretune.train import checkpoint as ck
from pretune.train.dist import (Runtime, all_gather_objects, all_reduce_max, all_reduce_sum, full_state_dict,
                                compiles, grad_sync, replicate_from_rank0, unsharded, wrap_model)
from pretune.train.frozen import FrozenInComputeDtype
from pretune.model.io import save_model_dir
from pretune.train.meter import (EnergyCounter, batch_flops, flops_per_token, peak_flops, peak_memory_bytes,
                                 reset_peak_memory)
from pretune.train.optim import build_optimizer, lr_at
from pretune.train.prefetch import Prefetcher


class StepData(Protocol):
    seq_len: int

    def micro_batches(self, step: int, rank: int, world: int) -> list[dict[str, torch.Tensor]]:
        """The micro-batches this rank processes at optimiser step `step` (deterministic)."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss or a gradient became NaN or infinite; nothing after the last good checkpoint was saved."""


def count_targets(micro: list[dict], objective, kinds: tuple[str, ...], rt: Runtime,
                  fpt: dict) -> tuple[dict, object, object]:
    """Targets per kind of micro-batch (task, replay) in this optimiser step, the tokens the step
    reads and its FLOPs (meter.batch_flops), all summed over ranks (ranks may hold different numbers:
    fine-tuning batches differ).

    Floats in one process. With several, 0-d device tensors: the all-reduce is queued on the device
    and the step goes on without waiting for it (no host synchronisation in the step)."""
    counts = dict.fromkeys(kinds, 0.0)
    tokens, flops = 0, 0.0
    for mb in micro:  # counted on the host, before the batch moves to the device
        counts[mb.get("kind", "task")] += objective.count(mb)
        tokens += int(mb.get("n_tokens", mb["input_ids"].numel()))
        flops += batch_flops(fpt, mb, reference="pairs" in mb)  # DPO pairs: the reference's forward too
    if not rt.distributed:
        return counts, tokens, flops
    total = torch.tensor([counts[k] for k in kinds] + [tokens, flops], dtype=torch.float64)
    if rt.device.type == "cuda":
        total = total.pin_memory()
    total = all_reduce_sum(total.to(rt.device, non_blocking=True), rt).unbind()
    return dict(zip(kinds, total[:-2])), total[-2], total[-1]


def _per_target(weight: float, count) -> float | torch.Tensor:
    """weight / count, for a count that is a float or a device tensor (at least 1 either way)."""
    return weight / (count.clamp(min=1.0) if torch.is_tensor(count) else max(count, 1.0))


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed; with `cfg`, every record also
    goes to the trackers that cfg.track enables (TensorBoard, MLflow), which `close` ends. A tracker
    that fails is dropped with a warning (its run ended as failed where it can be): training goes
    on, and metrics.jsonl stays the record."""

    def __init__(self, path: Path, enabled: bool, cfg: Config | None = None):
        from pretune.train.tracking import open_trackers

        self.path, self.enabled = path, enabled
        self.trackers = open_trackers(cfg, path.parent, enabled) if cfg is not None else []

    def truncate_after(self, step: int) -> int:
        """Drop lines logged after `step` (a resumed run logs those steps again), an interim line at
        `step` itself (its interval goes on in the resumed run), and lines that do not parse (a write
        cut short by a full disk or a kill). The trackers hide (or do not log again) their points after
        `step` too. Returns how many unreadable lines were dropped."""
        for tracker in list(self.trackers):
            self._call(tracker, "resume_after", step)
        if not (self.enabled and self.path.is_file()):
            return 0
        keep, torn = [], 0
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                torn += bool(line.strip())
                continue
            if isinstance(record, dict) and (record.get("step", 0) < step or (
                    record.get("step", 0) == step and not record.get("interim"))):
                keep.append(line)
        ck.atomic_write_bytes(self.path, ("\n".join(keep) + "\n" if keep else "").encode())
        return torn

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        for tracker in list(self.trackers):
            self._call(tracker, "log", record)

    def close(self, summary: dict | None) -> None:
        """End the trackers' runs with the final summary (None: the run failed)."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            self._call(tracker, "close", summary)

    def _call(self, tracker, method: str, arg) -> None:
        """tracker.method(arg); a tracker that raises is warned about and dropped, not the run."""
        try:
            getattr(tracker, method)(arg)
        except Exception as e:  # noqa: BLE001 (whatever the tracker's package raises)
            if tracker in self.trackers:
                self.trackers.remove(tracker)
            name = type(tracker).__name__.removesuffix("Tracker")
            first = (str(e).splitlines() or [""])[0][:300]
            print(f"warning: {name} tracking failed and is off for the rest of the run ({type(e).__name__}: "
                  f"{first}); {self.path} still records every figure", file=sys.stderr)
            if method != "close":
                with contextlib.suppress(Exception):  # its run ends as failed where the tracker still can
                    tracker.close(None)


def _round(x):
    """Floats to 6 places, or to 6 significant digits below 0.001 (a learning rate early in its warmup
    is not 0); NaN and infinities as null, so the files stay strict JSON. Inside dicts too (a
    cross-validation summary's mean and std): every summary.json is rounded by this."""
    if isinstance(x, float):
        if not math.isfinite(x):
            return None
        return round(x, 6) if abs(x) >= 1e-3 else float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    return x


def train(model: torch.nn.Module, cfg: Config, rt: Runtime, run_dir: Path, data: StepData, objective,
          evaluate: Callable[[torch.nn.Module], dict] | None = None, tokenizer=None,
          log: Callable[[str], None] = print, summary_extra: dict | None = None,
          save_final: Callable[[torch.nn.Module, Path], None] | None = None, scored_after: bool = False,
          metrics: MetricsLog | None = None) -> dict:
    """Run (or resume) the optimisation; write metrics.jsonl, checkpoints, model/ and summary.json.

    With train.early_stop_metric the best weights by that figure are kept in best/ and become the
    final model; train.patience stops the run after that many evaluations without improvement.
    With `scored_after` the caller scores the final model and writes the finished summary itself:
    until then summary.json says "scoring", so a run killed in between is not taken for finished.
    A `metrics` log given by the caller is closed here only on an error: the caller closes it (its
    trackers) once the summary is final.
    """
    t_cfg = cfg.train
    device = rt.device
    sharded_ckpt = getattr(getattr(cfg, "dist", None), "strategy", "ddp") == "fsdp"  # DCP checkpoints
    fsdp = sharded_ckpt and rt.distributed
    frozen = None
    if fsdp and getattr(objective, "reference", None) is not None:  # ranks > 0 built it on the meta device
        replicate_from_rank0(objective.reference, rt)  # DPO's whole frozen copy, rank 0's weights everywhere
    if rt.autocast_dtype is not None:
        # frozen linear weights in bf16 for the run: the same products, half their memory, no copy
        # per forward (FSDP's own mixed-precision policy casts its shards as it gathers them)
        if not fsdp:
            frozen = FrozenInComputeDtype(model, rt.autocast_dtype, device)
        if getattr(objective, "reference", None) is not None:  # DPO's frozen copy of the starting model
            FrozenInComputeDtype(objective.reference, rt.autocast_dtype, device)
    if not fsdp:
        # under FSDP, fully_shard moves each block to the device as it shards it: the whole model is
        # never on one GPU at once
        model.to(device)
    # DDP across ranks, FSDP2 sharding in place, torch.compile on CUDA. The optimiser is built
    # after wrapping: FSDP replaces the parameters by DTensor shards.
    fwd = wrap_model(model, cfg, rt)
    compiled = compiles(cfg, device)  # as wrap_model decides
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg.optim, device)
    own_log = metrics is None
    if own_log:
        metrics = MetricsLog(run_dir / "metrics.jsonl", rt.is_main, cfg)
    # untimed_*: the tokens and FLOPs of the steps that compiled the model (compile_s), left out of throughput
    state = {"tokens": 0, "target_tokens": 0, "wall_s": 0.0, "flops": 0.0, "train_loss": None,
             "eval": {}, "eval_step": None, "best": None, "bad_evals": 0,
             "compile_s": 0.0, "untimed_tokens": 0, "untimed_flops": 0.0}
    start = 0
    if cfg.resume:
        last = ck.latest_checkpoint(run_dir)
        if last is None:
            raise ck.RunDirError(f"resume={run_dir}: it has no checkpoint to resume from; start it again "
                                 f"with overwrite=true")
        state.update(ck.load_checkpoint(last, model, optimizer, device, rt.rank, cfg.seed))
        start = state["step"]
        torn = metrics.truncate_after(start)
        if rt.is_main:
            bm.restore_on_resume(run_dir, state)  # best/ as this checkpoint knew it, not as a killed session left it
            log(f"resumed from {last} at step {start}")
            if torn:
                log(f"warning: dropped {torn} unreadable line(s) of {metrics.path} (a write cut short)")
    else:
        torch.manual_seed(cfg.seed + 1 + rt.rank)  # dropout stream; the weights were seeded before

    fpt = flops_per_token(model, data.seq_len)
    peak = peak_flops(device)
    reset_peak_memory(device)  # this run's peak, not the process's (a study runs many in one process)
    energy = EnergyCounter(device, cfg.meter.device_power_w)
    energy_before = state.get("energy_j", 0.0)
    max_steps = t_cfg.max_steps
    stop = t_cfg.stop_after or max_steps

    def out_of_patience(s: int) -> bool:
        if not (t_cfg.patience and state["bad_evals"] >= t_cfg.patience):
            return False
        log(f"early stopping at step {s}: {t_cfg.early_stop_metric} has not improved for {t_cfg.patience} "
            f"evaluations (best {state['best']['value']:.4f} at step {state['best']['step']})")
        return True

    patience_out = out_of_patience(start)
    if patience_out:  # resumed at the step where patience ran out: the run ends there, as it did
        stop = start
    if rt.is_main and start == 0 and (cfg.optim.warmup_steps or 0) >= max_steps > 1:
        log(f"warning: optim.warmup_steps={cfg.optim.warmup_steps} is not shorter than the run's {max_steps} "
            f"steps, so the learning rate never decays from its warmup; leave optim.warmup_steps unset "
            f"for a tenth of the run")
    autocast = torch.autocast(device.type, dtype=rt.autocast_dtype or torch.float32,
                              enabled=rt.autocast_dtype is not None)
    bar = None
    if rt.is_main and t_cfg.progress and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=stop, initial=start, unit="step", dynamic_ncols=True)

    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    interval_loss = torch.zeros((), dtype=torch.float64, device=device)
    # the logging interval a checkpoint cut in two goes on: the resumed run logs the same losses
    carried = state.pop("interval", None) or {"loss": 0.0, "steps": 0}
    if rt.is_main:  # the saved loss is the sum over ranks already
        interval_loss += carried["loss"]
    interval_steps = carried["steps"]
    interval_tokens = 0
    # target tokens and tokens not yet added to state (device tensors when distributed)
    pending_targets, pending_tokens, pending_flops = 0.0, 0, 0.0
    kinds = tuple(getattr(data, "kinds", ("task",)))
    weights = dict(getattr(objective, "weights", {}))
    t_interval = time.perf_counter()  # the current logging interval's start, moved past evaluations and saves
    t_run = time.perf_counter()
    train_s = state.get("train_s", 0.0)  # training time of the intervals logged (and of earlier sessions)
    flops_logged = state["flops"]
    wall_before = state["wall_s"]
    status = "early_stopped" if patience_out else "completed"
    last_good_ckpt = ck.latest_checkpoint(run_dir)
    model.train()

    def check_finite(step_no: int) -> None:
        # Every rank checks at the same steps and learns of a non-finite loss on any rank, so all stop
        # together instead of one leaving the others waiting in a collective.
        bad = int(all_reduce_max(first_bad.clone(), rt))
        if bad >= 0:
            what = f"the loss or its gradient became NaN or infinite at step {bad}"
            if last_good_ckpt:
                raise TrainingDiverged(f"{what}; the last good checkpoint is {last_good_ckpt}. Lower optim.lr, "
                                       "check the data, or resume=RUN from that checkpoint with other settings.")
            raise TrainingDiverged(f"{what}; no checkpoint was written before it, so there is nothing to resume. "
                                   "Check the data, or start again with a lower optim.lr (overwrite=true).")

    def run_joules() -> float:
        """This session's energy over every rank (a collective): each GPU's own counter, but a CPU
        counter (RAPL, or the estimate) covers the whole machine, so one process per machine counts it."""
        own = energy.joules() if device.type == "cuda" or rt.local_rank == 0 else 0.0
        return float(all_reduce_sum(torch.tensor(own, dtype=torch.float64, device=device), rt))

    def flush_counts() -> int:
        """Add the pending counts to state (waiting for their all-reduce); returns the tokens added."""
        nonlocal pending_targets, pending_tokens, pending_flops
        tokens = int(round(float(pending_tokens)))
        state["target_tokens"] += int(round(float(pending_targets)))
        state["tokens"] += tokens
        state["flops"] += float(pending_flops)
        pending_targets, pending_tokens, pending_flops = 0.0, 0, 0.0
        return tokens

    if rt.is_main:  # set up: the run that overwrite=true replaces goes now (files.set_aside)
        settle_aside(run_dir, restore=False)
    batches = Prefetcher(data, rt.rank, rt.world, device)  # on CUDA the next step is built during this one
    try:
        step = start
        for step in range(start, stop):
            lr = lr_at(step, cfg.optim, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = batches.get(step, ahead=step + 1 < stop)
            counts, step_tokens, step_flops = count_targets(micro, objective, kinds, rt, fpt)
            step_loss = torch.zeros((), dtype=torch.float64, device=device)
            for i, mb in enumerate(micro):
                kind = mb.get("kind", "task")
                scale = _per_target(weights.get(kind, 1.0), counts[kind])  # token-weighted within each kind
                mb = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}
                with grad_sync(fwd, rt, i == len(micro) - 1):  # all-reduce on the last micro-batch only
                    with autocast:
                        loss_sum = objective(fwd, mb)
                    (loss_sum * (scale * rt.world)).backward()
                step_loss += loss_sum.detach().double() * scale
            penalty = objective.penalty(model)
            if penalty is not None:
                penalty.backward()
                # the loss is summed over ranks when logged: a replicated penalty counts once
                step_loss += penalty.detach().double() / (1 if getattr(objective, "sharded", False) else rt.world)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, t_cfg.grad_clip or float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # a finite loss with a non-finite gradient has already spoilt the weights: that step is bad too
            bad_now = ~(torch.isfinite(step_loss) & torch.isfinite(grad_norm))
            first_bad = torch.where((first_bad < 0) & bad_now, step + 1, first_bad)
            interval_loss += step_loss
            interval_steps += 1
            pending_targets = pending_targets + sum(counts.values())
            pending_tokens = pending_tokens + step_tokens
            pending_flops = pending_flops + step_flops
            s = step + 1
            if compiled and step == start:  # torch.compile compiled the model in this step: compile_s
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                tokens_before, flops_before = state["tokens"], state["flops"]
                flush_counts()
                state["untimed_tokens"] += state["tokens"] - tokens_before
                state["untimed_flops"] += state["flops"] - flops_before
                flops_logged = state["flops"]
                now = time.perf_counter()
                state["compile_s"] += now - t_interval
                t_interval = now  # the throughput clock starts after it
            if device.type == "cpu":
                check_finite(s)

            is_last = s == stop
            do_log = s % t_cfg.log_every == 0 or is_last
            do_eval = evaluate is not None and t_cfg.eval_every and (s % t_cfg.eval_every == 0 or s == max_steps)
            do_save = t_cfg.save_every and (s % t_cfg.save_every == 0 or is_last)
            if do_log or do_eval or do_save:
                check_finite(s)
                interval_tokens += flush_counts()
            if do_eval:
                t_eval = time.perf_counter()
                state["eval"], state["eval_step"] = evaluate(model), s
                t_interval += time.perf_counter() - t_eval  # evaluation time is not training throughput
                if t_cfg.early_stop_metric and bm.track_best(state, t_cfg.early_stop_metric, s):
                    best_sd = full_state_dict(model, rt)  # a collective under FSDP
                    if rt.is_main:
                        bm.save_best(run_dir, best_sd, s)
            # patience runs out: the run ends here, logged and saved as at its last step
            patience_out = out_of_patience(s)
            do_log, do_save = do_log or patience_out, do_save or (t_cfg.save_every and patience_out)
            # a stop part-way (train.stop_after) logs where it stands; the interval goes on on resume
            interim = is_last and not patience_out and s % t_cfg.log_every != 0 and s != max_steps
            if do_log:
                total_loss = float(all_reduce_sum(interval_loss.clone(), rt)) / max(interval_steps, 1)
                elapsed = time.perf_counter() - t_interval
                state["train_loss"] = total_loss
                tps = interval_tokens / max(elapsed, 1e-9)
                train_s += elapsed
                record = {"step": s, "tokens": state["tokens"], "target_tokens": state["target_tokens"],
                          "loss": total_loss, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tps,
                          "flops": state["flops"], "wall_s": wall_before + time.perf_counter() - t_run}
                if peak:
                    record["mfu"] = (state["flops"] - flops_logged) / max(elapsed, 1e-9) / (peak * rt.world)
                flops_logged = state["flops"]
                if interim:
                    record["interim"] = True
                else:
                    interval_loss.zero_()
                    interval_steps = 0
                interval_tokens = 0
            if do_eval:
                if do_log and not interim:
                    record.update(state["eval"])
                else:
                    metrics.write({"step": s, **{k: _round(v) for k, v in state["eval"].items()}})
            if do_log:
                metrics.write({k: _round(v) for k, v in record.items()})
                msg = f"step {s}/{max_steps} loss {total_loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s"
                if do_eval:
                    msg += "  " + " ".join(f"{k} {v:.4f}" for k, v in state["eval"].items() if isinstance(v, float))
                if bar is not None:
                    bar.set_postfix_str(msg.split(" ", 2)[2])
                elif rt.is_main:
                    log(msg)
                t_interval = time.perf_counter()
            if bar is not None:
                bar.update(1)
            if do_save:
                t_save = time.perf_counter()
                state["wall_s"] = wall_before + t_save - t_run
                state["train_s"] = train_s + t_save - t_interval
                state["energy_j"] = energy_before + run_joules()  # a collective
                state["interval"] = {"loss": float(all_reduce_sum(interval_loss.clone(), rt)),
                                     "steps": interval_steps}
                if rt.is_main:  # the best weights this checkpoint records stay on disk with it
                    bm.keep_for_checkpoint(run_dir, state)
                if sharded_ckpt:  # every rank writes its shards (DCP)
                    last_good_ckpt = ck.save_checkpoint_sharded(run_dir, s, model, optimizer, state,
                                                                t_cfg.keep_last, rt, tokenizer)
                else:
                    rank_rng = all_gather_objects(ck.rng_state(), rt) if rt.distributed else None
                    if rt.is_main:
                        last_good_ckpt = ck.save_checkpoint(run_dir, s, model, optimizer, state,
                                                            t_cfg.keep_last, tokenizer, rank_rng=rank_rng)
                if rt.is_main:
                    bm.prune(run_dir)  # best weights that no checkpoint refers to any longer
                t_interval += time.perf_counter() - t_save  # saving is not training throughput either
            if patience_out:
                status = "early_stopped"
                break
    except TrainingDiverged as e:
        if frozen is not None:
            frozen.restore()
        if rt.is_main:
            where = str(last_good_ckpt) if last_good_ckpt else None  # null, not "None", when there is none
            ck.atomic_write_json(run_dir / "summary.json", {"status": "diverged", "error": str(e),
                                                            "last_checkpoint": where})
        metrics.close(None)
        raise
    except BaseException:
        if frozen is not None:
            frozen.restore()
        metrics.close(None)  # an error or an interrupt: the trackers' runs end as failed, not left running
        raise
    finally:
        batches.close()
    train_s += time.perf_counter() - t_interval  # the steps since the last log (none when it was the last step)
    if bar is not None:
        bar.close()
    final_step = step + 1 if stop > start else start
    if final_step < max_steps and status != "early_stopped":
        status = "stopped"
    flush_counts()
    # the final model as plain PyTorch: the model itself, or under FSDP a copy with the gathered
    # weights on rank 0 (None on the others; dist.final_model(model) returns it afterwards)
    final = unsharded(model, rt) if status != "stopped" else model
    if state["best"] is not None and status != "stopped":  # the final model is the best one
        if final is not None and rt.is_main:  # rank 0 wrote best/ (on its machine) and goes on with the model
            bm.load_best(final, run_dir, state)
        # the figures of the model saved: the best evaluation's, not the last one's
        summary_extra = dict(summary_extra or {}, **bm.final_figures(state, t_cfg.early_stop_metric))
    wall = wall_before + time.perf_counter() - t_run
    summary = {
        "status": status, "steps": final_step, "tokens": state["tokens"],
        "target_tokens": state["target_tokens"], "train_loss": state["train_loss"],
        **{k: v for k, v in state["eval"].items()}, **({"eval_step": state["eval_step"]} if state["eval"] else {}),
        # throughput over the training time alone (wall_s also holds evaluations, checkpoints, set-up,
        # and the steps that compiled the model, compile_s, whose tokens and FLOPs are left out of it)
        "wall_s": wall, "train_s": train_s,
        **({"compile_s": state["compile_s"]} if compiled or state["compile_s"] else {}),
        "tokens_per_s": (state["tokens"] - state["untimed_tokens"]) / max(train_s, 1e-9),
        "flops": state["flops"], "flops_per_token": fpt,
        "mfu": ((state["flops"] - state["untimed_flops"]) / max(train_s, 1e-9) / (peak * rt.world)) if peak else None,
        "peak_mem_bytes": peak_memory_bytes(device),
        "energy_j": energy_before + run_joules(), "energy_source": energy.label,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in trainable),
        "device": str(device), "world_size": rt.world,
        "precision": str(rt.autocast_dtype or torch.float32).replace("torch.", ""),
    }
    summary["co2_g"] = summary["energy_j"] / 3.6e6 * cfg.meter.grid_gco2_per_kwh
    if frozen is not None:  # the fp32 weights back (after the peak was read), for merging and for use outside autocast
        frozen.restore()
    summary.update(summary_extra or {})
    if rt.is_main:
        if status != "stopped":
            (save_final or (lambda m, d: save_model_dir(m, d, tokenizer)))(final, run_dir / "model")
        on_disk = dict(summary, status="scoring") if scored_after and status != "stopped" else summary
        ck.atomic_write_json(run_dir / "summary.json", {k: _round(v) for k, v in on_disk.items()})
    if own_log:
        metrics.close(summary)
    if final is not None and final is not model:
        # FSDP: rank 0's gathered copy was built on the CPU, with the shards and the optimiser state
        # on the GPU; it moves there for what follows (the test set) once the optimiser is gone
        del optimizer
        final.to(device)
    return summary

