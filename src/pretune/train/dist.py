"""Process-group set-up for torchrun, device and precision choice, and the data-parallel strategies.

One process is plain training. Under `torchrun` every process joins the group (gloo on CPU, NCCL on
CUDA) and the model is wrapped from outside, so the model code knows nothing of it:

- `dist.strategy=ddp`: DistributedDataParallel replicates the model; gradients are all-reduced on
  the last micro-batch of a step only (`no_sync` on the others).
- `dist.strategy=fsdp`: FSDP2 (`fully_shard`) per transformer block, then the root, so parameters,
  gradients and optimiser state are divided among the processes; a MixedPrecisionPolicy (bf16
  compute, fp32 gradient reduction) when the run is in bf16; gradient reduction on the last
  micro-batch only (`set_requires_gradient_sync`). The optimiser must be built after wrapping.
  Only rank 0 builds or loads the whole model; the other ranks build it on the meta device
  (`init_device`) and their shards are filled from rank 0 once sharded (`shard_model`).
- `dist.activation_checkpointing=true` recomputes each block's activations in the backward pass
  (non-reentrant `torch.utils.checkpoint`; parameter names stay unchanged).

Only rank 0 prints (the others' stdout goes to /dev/null unless PRETUNE_LOG_ALL_RANKS=1; errors
still reach stderr). Every rank sees a disjoint slice of the same global batch (the samplers' contract), so 1 and N
processes compute the same losses.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import weakref
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
    """'auto' is this process's GPU when there is one, else the CPU."""
    if requested == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={requested} but CUDA is not available; use train.device=cpu")
    if requested == "cuda":
        return torch.device(f"cuda:{local_rank}")
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


def keep_freed_memory() -> bool:
    """Let glibc keep freed blocks for reuse instead of returning them to the OS at once.

    CPU training allocates and frees the same activation sizes every step; with glibc's default
    thresholds many of them are fresh mmap()s, each page faulted in and zeroed again (about a
    thousand page faults per step of the shakespeare-char model, 5-10% of its step time). The
    process keeps its peak footprint instead. False where this is not glibc."""
    if sys.platform != "linux":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def setup(device: str = "auto", precision: str = "auto", threads: int | None = None) -> Runtime:
    """Join the torchrun process group when launched by torchrun; otherwise a single process."""
    if threads:
        torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dev = pick_device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rank > 0 and os.environ.get("PRETUNE_LOG_ALL_RANKS", "0") != "1":
        sys.stdout = open(os.devnull, "w")  # rank 0 reports; errors still reach stderr
    dev = pick_device(device, local_rank)
    if dev.type == "cpu":
        keep_freed_memory()
    return Runtime(rank, world, local_rank, dev, pick_autocast(precision, dev))


# ----------------------------------------------------------------------------- wrapping


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks, wherever they sit (a classifier keeps its decoder in .lm)."""
    from pretune.model.gpt import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute every block's activations during backward (when gradients are on), in place.

    The block's forward is replaced on the instance, so parameter names and the state dict stay
    as they are (a checkpoint wrapper module would insert a level into every name)."""
    from torch.utils.checkpoint import checkpoint

    for block in _blocks(model):
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a model wrapped by FSDP2 (its parameters are DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


_SKELETONS: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def _skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the model's structure with parameters on the meta device (no memory), ties kept;
    buffers are copied. It becomes the plain final model once the gathered weights are loaded."""
    memo: dict = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def shard_model(model: torch.nn.Module, rt: Runtime, compile_blocks: bool = False) -> None:
    """FSDP2 in place: fully_shard each block, then the root (embedding, final norm, output head).

    Rank 0 holds the whole model, the other ranks its structure on the meta device (builds_on_meta);
    once sharded, every rank's shards are filled from rank 0's weights (_fill_from_rank0)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _check_structure(model, rt)
    # rank 0's whole weights, held here while fully_shard replaces the parameters by shards
    full = model.state_dict() if rt.is_main else {}
    mesh = init_device_mesh(rt.device.type, (rt.world,))
    kw: dict = {"mesh": mesh}
    if rt.autocast_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=rt.autocast_dtype, reduce_dtype=torch.float32)
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        if compile_blocks:
            block.compile()
        # the last block's parameters are needed again at once by backward: keep them gathered
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kw)
    fully_shard(model, **kw)
    _fill_from_rank0(model, rt, full)


# ----------------------------------------------------------------------------- deferred initialisation


def builds_on_meta(cfg) -> bool:
    """Whether this process builds its model on the meta device (no memory): every rank but 0 of an
    FSDP run. Rank 0 builds or loads the whole model exactly as one process would; the others' shards
    are allocated and filled from it after fully_shard, so one process, not all, holds the whole
    model in host memory."""
    return (getattr(getattr(cfg, "dist", None), "strategy", "ddp") == "fsdp" and dist.is_initialized()
            and dist.get_world_size() > 1 and dist.get_rank() > 0)


def init_device(cfg):
    """The context to build the model in: the meta device where builds_on_meta, else nothing."""
    return torch.device("meta") if builds_on_meta(cfg) else contextlib.nullcontext()


def _tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter (each tied one once) and buffer, persistent or not."""
    return [*module.named_parameters(), *module.named_buffers()]


def _check_structure(model: torch.nn.Module, rt: Runtime) -> None:
    """Stop when this rank's model does not have rank 0's parameters and shapes (a collective): the
    weights that rank 0 sends would otherwise land in the wrong places."""
    mine = {n: tuple(p.shape) for n, p in model.named_parameters()}
    want = broadcast_object(mine if rt.is_main else None, rt)
    if mine != want:
        diff = sorted(set(mine.items()) ^ set(want.items()))[:4]
        raise RuntimeError(f"rank {rt.rank} built a model unlike rank 0's (first differences: {diff}); "
                           "every rank must build the same structure")


def _rope_tables_again(model: torch.nn.Module, device: torch.device) -> None:
    """The decoder's RoPE tables (non-persistent buffers: no state dict carries them), computed as
    its constructor computes them (on the CPU) and moved to `device`."""
    from pretune.model.gpt import GPT, rope_tables

    for m in model.modules():
        if isinstance(m, GPT):
            cos, sin = rope_tables(m.cfg)
            m.rope_cos, m.rope_sin = cos.to(device), sin.to(device)


def _fill_from_rank0(model: torch.nn.Module, rt: Runtime, full: dict[str, torch.Tensor]) -> None:
    """After fully_shard: a rank whose model is on the meta device allocates its shards (to_empty),
    then every rank's shards get rank 0's weights, broadcast one tensor at a time
    (set_model_state_dict with broadcast_from_rank0), and the RoPE tables are computed again."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    meta = any(t.is_meta for _, t in _tensors(model))
    if meta:
        model.to_empty(device=rt.device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    if meta:
        _rope_tables_again(model, rt.device)
        n = sum(p.numel() for p in model.parameters())
        # seen with PRETUNE_LOG_ALL_RANKS=1 (tests/test_dist.py checks it)
        print(f"rank {rt.rank}: parameters on meta before sharding; its shards of the {n:,} parameters "
              f"were filled from rank 0", flush=True)
    left = [n for n, t in _tensors(model) if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"rank {rt.rank}: {', '.join(left[:4])} still on the meta device after sharding")


def replicate_from_rank0(module: torch.nn.Module, rt: Runtime) -> None:
    """Give every rank rank 0's parameters and buffers of a whole, unsharded `module` (a collective):
    a copy that ranks > 0 built on the meta device (DPO's frozen reference under FSDP) is allocated on
    the CPU, ties kept, and filled one tensor at a time."""
    if not rt.distributed:
        return
    if any(t.is_meta for _, t in _tensors(module)):
        _materialize(module, torch.device("cpu"))
    with torch.no_grad():
        for _, t in _tensors(module):
            buf = t.detach().to(rt.device)  # NCCL sends from the GPU
            dist.broadcast(buf, src=0)
            if buf.device != t.device:
                t.copy_(buf)


def compiles(cfg, device: torch.device) -> bool:
    """Whether the run compiles its model: train.compile=true, or auto on CUDA."""
    return cfg.train.compile == "true" or (cfg.train.compile == "auto" and device.type == "cuda")


def wrap_model(model: torch.nn.Module, cfg, rt: Runtime) -> torch.nn.Module:
    """What the loop calls forward/backward on.

    Single process: the model (compiled when train.compile says so). DDP: a DDP wrapper around it,
    the model itself stays unwrapped for saving. FSDP: the model, sharded in place (its parameters
    become DTensors: build the optimiser after this call). Activation checkpointing is applied to
    the blocks first when dist.activation_checkpointing is set."""
    dcfg = getattr(cfg, "dist", None)
    strategy = getattr(dcfg, "strategy", "ddp")
    compile_on = compiles(cfg, rt.device)
    sharded = rt.distributed and strategy == "fsdp"
    if compile_on:
        # a fresh start for dynamo: in a long-lived process (a study worker, a benchmark) every model
        # shares GPT.forward's code, and past the recompile limit dynamo silently falls back to eager
        torch._dynamo.reset()
    if sharded and rt.is_main:  # only rank 0 builds the plain final model
        _SKELETONS[model] = _skeleton(model)
    if getattr(dcfg, "activation_checkpointing", False):
        apply_activation_checkpointing(model)
    if sharded:
        shard_model(model, rt, compile_blocks=compile_on)
        return model
    fwd = model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from pretune.model.heads import ClassifierModel

        # A classifier leaves parameters out of some forwards: its head in replay micro-batches, an
        # untied lm_head in task ones. DDP must then look for them, or it waits for their gradients
        # (and fails on the next step); otherwise looking costs a warning on every rank. The RoPE
        # tables are the same on every rank: no broadcasts before each forward (torch 2.13 names
        # that forward_sync_buffers=False and deprecates broadcast_buffers; it still broadcasts
        # them once, at the start, which changes nothing).
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _ddp_arguments()
                          else {"broadcast_buffers": False})
        fwd = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                  gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no second copy
                  find_unused_parameters=isinstance(model, ClassifierModel) and (
                      bool(getattr(getattr(cfg, "finetune", None), "replay", None)) or not model.cfg.tie_embeddings),
                  **no_buffer_sync)
    if compile_on:
        fwd = torch.compile(fwd)
    return fwd


def _ddp_arguments() -> set[str]:
    """The keyword arguments DistributedDataParallel takes in this torch."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    return set(inspect.signature(DDP.__init__).parameters)


def grad_sync(fwd: torch.nn.Module, rt: Runtime, last_micro_batch: bool):
    """Context for one micro-batch's backward: reduce gradients on the last micro-batch only."""
    if not rt.distributed:
        return contextlib.nullcontext()
    inner = getattr(fwd, "_orig_mod", fwd)  # under torch.compile
    if is_sharded(inner):
        inner.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last_micro_batch else inner.no_sync()


# ----------------------------------------------------------------------------- full weights


def full_state_dict(model: torch.nn.Module, rt: Runtime) -> dict[str, torch.Tensor]:
    """The whole model's weights as contiguous CPU tensors, each tied tensor once (io.model_state).

    Under FSDP this is a collective (every rank must call it); rank 0 gets the dict, the others
    an empty one."""
    from pretune.model.io import model_state

    if not is_sharded(model):
        return model_state(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not rt.is_main:
        return {}
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    return {k: v.detach().contiguous() for k, v in sd.items() if k not in aliases}


def unsharded(model: torch.nn.Module, rt: Runtime) -> torch.nn.Module | None:
    """The model as plain PyTorch with its current weights: the model itself unless it is sharded.

    Under FSDP (a collective): rank 0 gets a plain copy with the gathered weights on the CPU (train()
    moves it to the device once its optimiser is freed), the other ranks None. `final_model(model)` returns that copy afterwards."""
    if not is_sharded(model):
        return model
    from pretune.model.io import load_model_state

    sd = full_state_dict(model, rt)
    if not rt.is_main:
        return None
    # on the CPU: a second whole model beside the shards and the optimiser state could overflow the GPU
    plain = _materialize(_SKELETONS[model], torch.device("cpu"))
    load_model_state(plain, sd)
    plain.train(model.training)
    _FINAL[model] = plain
    return plain


_FINAL: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def final_model(model: torch.nn.Module) -> torch.nn.Module:
    """After train(): the plain model rank 0 saved (FSDP), else the model itself."""
    return _FINAL.get(model, model)


def _materialize(skeleton: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Give a meta-device skeleton real (uninitialised) parameters and meta buffers on `device`,
    keeping ties."""
    made: dict[int, torch.nn.Parameter] = {}
    for module in skeleton.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                made[id(p)] = torch.nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
            module._parameters[name] = made[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:  # (a copy built on the meta device: replicate_from_rank0 fills it)
                module._buffers[name] = torch.empty_like(b, device=device)
    return skeleton.to(device)


# ----------------------------------------------------------------------------- collectives


def all_reduce_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Sum over ranks in place (a no-op in one process)."""
    if rt.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Maximum over ranks in place (a no-op in one process)."""
    if rt.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_objects(obj, rt: Runtime) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not rt.distributed:
        return [obj]
    out: list = [None] * rt.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, rt: Runtime):
    """Rank 0's `obj` on every rank."""
    if not rt.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_share(n_chunks: int, rt: Runtime | None) -> list[int | None]:
    """The chunks of an evaluation that this rank runs: chunk i goes to rank i % world.

    Every rank gets the same number of entries, the short ones padded with None (run a stand-in
    chunk and drop its result): under FSDP each forward gathers weights, a collective that every
    rank must join."""
    if rt is None or not rt.distributed:
        return list(range(n_chunks))
    mine: list[int | None] = list(range(rt.rank, n_chunks, rt.world))
    return mine + [None] * (-(-n_chunks // rt.world) - len(mine))


def gather_chunks(part: dict, rt: Runtime | None) -> list:
    """Per-chunk results ({chunk: result}) from every rank, as one list in chunk order."""
    if rt is not None and rt.distributed:
        part = {c: r for one in all_gather_objects(part, rt) for c, r in one.items()}
    return [part[c] for c in sorted(part)]


@contextlib.contextmanager
def quiet_single_process_dcp(single: bool):
    """torch.distributed.checkpoint used by one process (an FSDP checkpoint resumed, or written, without
    torchrun) warns on every call that torch.distributed is off; here that is meant, so the warning
    is not shown. Every other warning still is."""
    import warnings

    with warnings.catch_warnings():
        if single:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                                    category=UserWarning)
        yield


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
