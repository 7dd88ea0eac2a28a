"""Study engines: the same jobs in this process, in a spawned process pool and on a real local Ray
instance; a failing job never stops the others, Ctrl-C leaves no worker behind."""

import multiprocessing as mp
import os
import sys
import time

import pytest

from pretune.errors import ConfigError
from pretune.study import engines
from pretune.study.engines import Job, run_jobs


def _jobs(tmp_path) -> list[Job]:
    return [Job("a/square", "engine_jobs:square", {"x": 3}),
            Job("b/fails", "engine_jobs:fail", {"message": "boom"}),
            Job("c/writes", "engine_jobs:write_file", {"path": str(tmp_path / "out.txt"), "text": "hello"}),
            Job("d/square", "engine_jobs:square", {"x": 4})]


def _check(results: dict, lines: list[str], tmp_path) -> None:
    """What every engine must give for _jobs(): results in job order, the failure reported, the file."""
    assert list(results) == ["a/square", "b/fails", "c/writes", "d/square"]
    assert results["a/square"] == {"ok": True, "result": 9, "error": None, "wall_s": results["a/square"]["wall_s"]}
    assert results["d/square"]["result"] == 16
    failed = results["b/fails"]
    assert not failed["ok"] and failed["result"] is None
    assert failed["error"].endswith("RuntimeError: boom") and "engine_jobs.py" in failed["error"]
    assert results["c/writes"]["ok"] and (tmp_path / "out.txt").read_text() == "hello"
    assert results["c/writes"]["result"] == str(tmp_path / "out.txt")
    assert len(lines) == 4
    assert any(line.startswith("FAILED") and "b/fails" in line and "RuntimeError: boom" in line for line in lines)
    assert sum(line.startswith("done") for line in lines) == 3


def test_local_sequential_runs_in_this_process_in_order(tmp_path):
    lines = []
    jobs = [*_jobs(tmp_path), Job("e/info", "engine_jobs:worker_info", {}),
            Job("f/bad-spec", "engine_jobs", {}), Job("g/missing", "engine_jobs:nope", {})]
    results = run_jobs(jobs, log=lines.append)
    assert [line.split()[2] for line in lines] == [job.key for job in jobs]  # in order
    assert [line.split()[1] for line in lines] == [f"{i}/7" for i in range(1, 8)]
    _check({k: results[k] for k in list(results)[:4]}, lines[:4], tmp_path)
    assert results["e/info"]["result"]["pid"] == os.getpid()
    assert "ValueError: job function 'engine_jobs' is not of the form" in results["f/bad-spec"]["error"]
    assert "AttributeError" in results["g/missing"]["error"]


def test_local_pool_runs_jobs_in_spawned_workers_pinned_to_one_gpu_each(tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "_gpu_ids", lambda: ["5", "7"])  # as if two GPUs were visible
    lines = []
    info = [Job(f"info/{i}", "engine_jobs:worker_info", {}) for i in range(4)]
    results = run_jobs(_jobs(tmp_path) + info, parallel=2, log=lines.append)
    _check({k: results[k] for k in list(results)[:4]}, [l for l in lines if "info/" not in l], tmp_path)
    seen = {r["result"]["pid"]: r["result"] for k, r in results.items() if k.startswith("info/")}
    assert os.getpid() not in seen and 1 <= len(seen) <= 2
    assert all(r["threads"] == max(1, os.cpu_count() // 2) for r in seen.values())
    gpus = [r["cuda_visible"] for r in seen.values()]
    assert set(gpus) <= {"5", "7"} and len(set(gpus)) == len(gpus)  # one GPU per worker
    assert not mp.active_children()


def test_ctrl_c_cancels_pending_jobs_and_stops_the_workers(tmp_path):
    def interrupt(line):
        raise KeyboardInterrupt  # as if Ctrl-C came while the first result was reported

    jobs = [Job("quick", "engine_jobs:square", {"x": 2})] + [
        Job(f"slow/{i}", "engine_jobs:sleep_then_write", {"path": str(tmp_path / f"slow{i}"), "seconds": 1.5})
        for i in range(4)]
    with pytest.raises(KeyboardInterrupt):
        run_jobs(jobs, parallel=2, log=interrupt)
    t0 = time.monotonic()
    assert not mp.active_children()
    time.sleep(max(0.0, 2.0 - (time.monotonic() - t0)))
    assert not list(tmp_path.glob("slow*"))  # nothing ran on after the interrupt


def test_engine_errors_name_the_fix(monkeypatch):
    with pytest.raises(ConfigError, match="engine='dask' is not one of local, ray"):
        run_jobs([Job("a", "engine_jobs:square", {"x": 1})], engine="dask")
    with pytest.raises(ValueError, match="unique"):
        run_jobs([Job("a", "engine_jobs:square", {"x": 1})] * 2)
    monkeypatch.setitem(sys.modules, "ray", None)  # "import ray" now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'pretune\[ray\]'"):
        run_jobs([Job("a", "engine_jobs:square", {"x": 1})], engine="ray")
    assert run_jobs([], engine="ray") == {}


@pytest.fixture
def ray_module():
    ray = pytest.importorskip("ray")
    yield ray
    if ray.is_initialized():  # never leave a Ray instance running
        ray.shutdown()


def test_ray_engine_on_a_local_instance(tmp_path, ray_module):
    lines = []
    jobs = _jobs(tmp_path) + [Job("e/needs-gpu", "engine_jobs:square", {"x": 5}, gpus=1)]
    t0 = time.perf_counter()
    results = run_jobs(jobs, engine="ray", parallel=2, log=lines.append)
    wall = time.perf_counter() - t0
    assert not ray_module.is_initialized()  # it started the instance, so it shut it down
    if not results["e/needs-gpu"]["ok"]:  # a machine without GPUs: reported, not waited for forever
        assert "needs 1 GPU(s); the Ray cluster has 0" in results["e/needs-gpu"]["error"]
    results.pop("e/needs-gpu")
    _check(results, [l for l in lines if "e/needs-gpu" not in l], tmp_path)
    print(f"ray engine: {wall:.1f} s for {len(jobs)} jobs, start and shutdown included")
