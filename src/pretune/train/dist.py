"""Process-group set-up for torchrun, device and precision choice."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    """Where this process runs: rank, world size, device, precision."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    autocast_dtype: torch.dtype | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    if requested == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={requested} but CUDA is not available; use train.device=cpu")
    return torch.device(requested)


def pick_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """None for fp32; bf16 on CUDA when supported (auto), or when asked for."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def setup(device: str = "auto", precision: str = "auto", threads: int | None = None) -> Runtime:
    """Join the torchrun process group when launched by torchrun; otherwise a single process."""
    if threads:
        torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = pick_device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    return Runtime(rank, world, local_rank, dev, pick_autocast(precision, dev))


def wrap_model(model: torch.nn.Module, cfg, rt: Runtime) -> torch.nn.Module:
    """What the loop calls forward/backward on: the model, wrapped for data parallelism across ranks,
    compiled when train.compile says so. The model itself (for saving) stays unwrapped."""
    fwd = model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    compile_on = cfg.train.compile == "true" or (cfg.train.compile == "auto" and rt.device.type == "cuda")
    if compile_on:
        fwd = torch.compile(fwd)
    return fwd


def grad_sync(fwd: torch.nn.Module, rt: Runtime, last_micro_batch: bool):
    """Context for one micro-batch's backward: skip the gradient all-reduce except on the last one."""
    if not rt.distributed or last_micro_batch:
        return contextlib.nullcontext()
    inner = getattr(fwd, "_orig_mod", fwd)  # under torch.compile
    return inner.no_sync()


def all_reduce_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
