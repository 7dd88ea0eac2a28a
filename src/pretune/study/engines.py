"""How a study's independent runs are executed: in this process, in a local process pool, or on Ray.

A job names a function ("module:function") and its keyword arguments (plain, picklable data); the
worker side of every engine is `execute(job)`, which imports the function, calls it and turns an
exception into a failed result, so that one job's failure never stops the others.

    results = run_jobs([Job("facts_qa/full/n16/s0", "my_pkg.arms:run", {"seed": 0})], parallel=4)
    results["facts_qa/full/n16/s0"]  # {"ok": True, "result": ..., "error": None, "wall_s": 4.1}

Engines:
  local, parallel=1   in order, in this process (no start-up cost).
  local, parallel=N   N spawned worker processes; each sets torch threads to cpu_count // N and, on a
                      machine with GPUs, sees one GPU (worker i gets GPU i % n_gpus).
  ray                 one Ray task per job (num_cpus=1, num_gpus=job.gpus) on a local Ray instance
                      (started here and shut down afterwards) or on the cluster at `ray_address`.

A worker process that dies (killed for memory, a crash in native code) fails the job it was running,
named in the error; the pool is then started again for the jobs that had not finished (those it
was running are stopped with the broken pool and resume from their checkpoints).

Ctrl-C cancels the jobs that have not finished; the runs that finished are complete on disk and the
runner skips them on its next start. Nothing here imports torch or ray at module level.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from pretune.errors import ConfigError

ENGINES = ("local", "ray")
TRACEBACK_LINES = 12  # lines of a failed job's traceback kept in its error


@dataclass
class Job:
    """One independent run."""

    key: str
    """Unique, e.g. "facts_qa/full/n16/s0" (the run dir relative to the study dir)."""
    fn: str
    """"module:function", imported and called in the worker as fn(**kwargs)."""
    kwargs: dict = field(default_factory=dict)
    """Picklable arguments (plain data)."""
    gpus: int = 0
    """GPUs the job needs (0 or 1)."""


# ----------------------------------------------------------------------------- worker side


def resolve(spec: str) -> Callable:
    """"package.module:function" -> the function."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"job function {spec!r} is not of the form 'module:function'")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def format_error(exc: BaseException, lines: int = TRACEBACK_LINES) -> str:
    """The last `lines` lines of the traceback, ending with "ExceptionType: message"."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
    return "\n".join(text.splitlines()[-lines:])


def failure(error: str, wall_s: float = 0.0) -> dict:
    return {"ok": False, "result": None, "error": error, "wall_s": wall_s}


def execute(job: Job) -> dict:
    """Run one job here: {"ok", "result", "error", "wall_s"}; an exception (or SystemExit) in the job
    becomes ok=False with its traceback's last lines. KeyboardInterrupt is not caught."""
    t0 = time.perf_counter()
    try:
        result = resolve(job.fn)(**job.kwargs)
    except (Exception, SystemExit) as e:
        return failure(format_error(e), time.perf_counter() - t0)
    return {"ok": True, "result": result, "error": None, "wall_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- reporting


class Progress:
    """Collects results and logs one line per finished job."""

    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.log, self.results = total, log, {}

    def finished(self, key: str, res: dict) -> None:
        self.results[key] = res
        n, wall = len(self.results), res.get("wall_s", 0.0)
        if res["ok"]:
            self.log(f"done {n}/{self.total} {key} in {wall:.1f} s")
        else:
            detail = "\n".join("    " + line for line in str(res["error"]).splitlines())
            self.log(f"FAILED {n}/{self.total} {key} after {wall:.1f} s:\n{detail}")


# ----------------------------------------------------------------------------- local engine


def _run_sequential(jobs: list[Job], progress: Progress) -> None:
    for job in jobs:
        progress.finished(job.key, execute(job))


def _gpu_ids() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (without initialising CUDA)."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        return ids[:n] if n else []
    return [str(i) for i in range(n)]


_SLOTS = None  # in a pool worker: the shared array of (pid, running job number + 1) per worker
_INDEX = 0


def _init_worker(counter, threads: int, gpu_ids: list[str], slots=None) -> None:
    """Pool initializer: claim a worker index, pin one GPU and set the thread count, all before torch
    starts (torch takes its thread count from OMP_NUM_THREADS when it is imported, and CUDA reads
    CUDA_VISIBLE_DEVICES when it is initialised). Ctrl-C is handled by the parent alone."""
    global _SLOTS, _INDEX
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    if slots is not None:
        _SLOTS, _INDEX = slots, index
        slots[2 * index] = os.getpid()
    if gpu_ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_ids[index % len(gpu_ids)]
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:  # not in a fresh spawned worker, unless a module imported it
        sys.modules["torch"].set_num_threads(threads)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel the pending jobs and end the running ones (their runs are left unfinished)."""
    if hasattr(pool, "terminate_workers"):  # Python 3.14+
        pool.terminate_workers()
    else:  # shutdown() forgets the processes: take them first
        procs = list((getattr(pool, "_processes", None) or {}).values())
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(timeout=10)
    pool.shutdown(wait=True, cancel_futures=True)


def _execute_tracked(job: Job, number: int) -> dict:
    """A pool worker's side: note which job this worker runs (so the parent can tell whose worker
    died), then execute it."""
    _SLOTS[2 * _INDEX + 1] = number + 1
    try:
        return execute(job)
    finally:
        _SLOTS[2 * _INDEX + 1] = 0


def _run_pool(jobs: list[Job], parallel: int, progress: Progress) -> None:
    """Run the jobs in a pool; when a worker dies, fail its job and start a fresh pool for the rest."""
    todo = list(jobs)
    while todo:
        left = _pool_round(todo, parallel, progress)
        if len(left) == len(todo):  # the pool broke before anything ran: give up rather than loop
            for job in left:
                progress.finished(job.key, failure(f"not run: the worker pool broke before {job.key} ran "
                                                   "(a worker process died at start?); run again to continue it"))
            return
        if left:
            progress.log(f"restarting the worker pool for the {len(left)} job(s) not finished")
        todo = left


def _pool_round(jobs: list[Job], parallel: int, progress: Progress) -> list[Job]:
    """One pool over `jobs`; returns the jobs to run again because the pool broke (a worker died)."""
    ctx = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // parallel)
    workers = min(parallel, len(jobs))
    slots = ctx.Array("q", 2 * workers, lock=False)  # per worker: pid, running job number + 1
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(ctx.Value("i", 0), threads, _gpu_ids(), slots))
    pending: dict[Future, int] = {}
    ended: set[int] = set()  # job numbers with a result (or failed because their worker died)
    broken = False
    try:
        for i, job in enumerate(jobs):
            try:
                pending[pool.submit(_execute_tracked, job, i)] = i
            except BrokenProcessPool:
                broken = True
                break
        procs = getattr(pool, "_processes", None)  # pid -> Process (private), for the exit codes
        procs = dict(procs) if isinstance(procs, dict) else None
        while pending and not broken:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                if isinstance(fut.exception(), BrokenProcessPool):
                    broken = True
                    continue
                i = pending.pop(fut)
                try:
                    res = fut.result()
                except Exception as e:  # the result could not be pickled
                    res = failure(format_error(e))
                progress.finished(jobs[i].key, res)
                ended.add(i)
    except BaseException:  # KeyboardInterrupt above all
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)
    if not broken:
        return []
    for fut, i in pending.items():  # ended just before the pool broke
        exc = fut.exception()
        if not isinstance(exc, BrokenProcessPool):
            progress.finished(jobs[i].key, failure(format_error(exc)) if exc else fut.result())
            ended.add(i)
    for i, code in _crashed(slots, procs):
        if i not in ended:
            progress.finished(jobs[i].key, failure(
                f"the worker process running {jobs[i].key} died (exit code {code}): killed for memory, or a "
                "crash outside Python; the jobs not finished went on in a fresh pool"))
            ended.add(i)
    return [job for i, job in enumerate(jobs) if i not in ended]


def _crashed(slots, procs: dict | None) -> list[tuple[int, object]]:
    """(job number, exit code) of the jobs whose worker died by itself; when the pool breaks it ends
    the other workers with SIGTERM. Exit codes unknown (procs None): every job that was running."""
    running = [(slots[2 * w], slots[2 * w + 1] - 1) for w in range(len(slots) // 2) if slots[2 * w + 1]]
    if procs is None:
        return [(i, "unknown") for _, i in running]
    codes = {pid: p.exitcode for pid, p in procs.items()}
    return [(i, codes[pid]) for pid, i in running if codes.get(pid, -signal.SIGTERM) != -signal.SIGTERM]


# ----------------------------------------------------------------------------- ray engine


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise ConfigError(f"engine='ray' needs the package 'ray', which cannot be imported ({e}); install "
                          f"it with pip install 'pretune[ray]', or use engine='local'") from None
    return ray


def _execute_with_path(job: Job, paths: list[str]) -> dict:
    """Ray's worker side: make the driver's import paths importable here too (as the local pool's
    spawned workers inherit them), then execute the job."""
    sys.path.extend(p for p in paths if p not in sys.path)
    return execute(job)


def _ray_init(ray, parallel: int, address: str | None) -> bool:
    """Connect to `address` or start a local instance, unless Ray is up already; True if we did."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=parallel or os.cpu_count(), include_dashboard=False)
    return True


def _submit_ray(ray, jobs: list[Job], progress: Progress) -> dict:
    """One task per job: {object ref: job}. A job needing more GPUs than the cluster has fails at once
    (Ray would keep it waiting forever)."""
    gpus = ray.cluster_resources().get("GPU", 0)
    task = ray.remote(_execute_with_path)
    paths = [p for p in sys.path if p]
    pending = {}
    for job in jobs:
        if job.gpus > gpus:
            progress.finished(job.key, failure(f"the job needs {job.gpus} GPU(s); the Ray cluster has {gpus:g}"))
            continue
        pending[task.options(num_cpus=1, num_gpus=job.gpus, name=job.key).remote(job, paths)] = job
    return pending


def _gather_ray(ray, pending: dict, progress: Progress) -> None:
    """Report the tasks as they finish; on Ctrl-C (or any error here) cancel the others."""
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                job = pending.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as e:  # the worker died (ray.exceptions.WorkerCrashedError, ...)
                    res = failure(format_error(e))
                progress.finished(job.key, res)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def _run_ray(jobs: list[Job], parallel: int, progress: Progress, address: str | None) -> None:
    ray = _import_ray()
    started = _ray_init(ray, parallel, address)
    try:
        _gather_ray(ray, _submit_ray(ray, jobs, progress), progress)
    finally:
        if started:  # a local instance stops; a cluster is only disconnected from
            ray.shutdown()


# ----------------------------------------------------------------------------- entry point


def run_jobs(jobs: list[Job], engine: str = "local", parallel: int = 1, log=print,
             ray_address: str | None = None) -> dict[str, dict]:
    """Run independent jobs; returns key -> {"ok": bool, "result": <fn's return value> or None,
    "error": str or None, "wall_s": float}, in the order of `jobs`.

    One job's failure does not stop the others: it is logged with its key and the last lines of its
    traceback. `parallel` is the number of worker processes (local) or the CPUs of a local Ray
    instance (ray); `ray_address` connects to an existing Ray cluster instead."""
    if engine not in ENGINES:
        raise ConfigError(f"engine={engine!r} is not one of {', '.join(ENGINES)}")
    if parallel < 1:
        raise ConfigError(f"parallel={parallel} must be at least 1")
    keys = [job.key for job in jobs]
    repeated = sorted(k for k, n in Counter(keys).items() if n > 1)
    if repeated:
        raise ValueError(f"job keys must be unique; repeated: {', '.join(repeated)}")
    progress = Progress(len(jobs), log)
    if not jobs:
        return {}
    if engine == "ray":
        _run_ray(jobs, parallel, progress, ray_address)
    elif parallel == 1:
        _run_sequential(jobs, progress)
    else:
        _run_pool(jobs, parallel, progress)
    return {key: progress.results[key] for key in keys}
