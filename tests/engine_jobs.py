"""Small job functions for tests/test_engines.py.

Workers import them as "engine_jobs:NAME": pytest puts tests/ on sys.path, spawned pool workers
inherit the parent's sys.path, and the Ray engine hands it on to its tasks."""

import os
import time
from pathlib import Path


def square(x: int) -> int:
    return x * x


def fail(message: str) -> None:
    raise RuntimeError(message)


def write_file(path: str, text: str) -> str:
    Path(path).write_text(text)
    return os.path.abspath(path)


def sleep_then_write(path: str, seconds: float) -> None:
    time.sleep(seconds)
    Path(path).write_text("done")


def worker_info() -> dict:
    import torch

    return {"pid": os.getpid(), "threads": torch.get_num_threads(),
            "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES")}
