"""The cost meter: FLOPs (trainable and frozen counted apart), time, peak memory, energy, CO2.

FLOPs per token follow nanoGPT / PaLM: each matrix-multiply parameter costs 2 FLOPs forward, 2 for the
gradient with respect to its input and 2 for the gradient with respect to itself. A trainable
parameter therefore costs 6; a frozen one that gradients still flow through (below a LoRA adapter,
say) costs 4; a frozen one below every trainable parameter costs 2 (forward only). Attention adds
12·H·Q·T per layer and token when training through it, 4·H·Q·T forward only.
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import time
from pathlib import Path

import torch

# Dense bf16 peak FLOP/s per GPU model, for MFU (vendor datasheets, without sparsity). The longest
# name the device's name contains wins, so "H100 PCIe" is not read as an SXM H100, nor "L40" as "L4".
PEAK_FLOPS = {
    "H200": 989e12, "H200 NVL": 835e12, "H100": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12,
    "H800": 989e12, "GH200": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12,
    "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}
# Power draw assumed when no energy counter is readable (watts), labelled as an estimate: on a CPU,
# 10 W per core for the whole machine, of which a run is charged its share of the cores (cpu_share).
CPU_CORE_W = 10.0
DEFAULT_POWER_W = {"cpu": CPU_CORE_W * (os.cpu_count() or 1), "cuda": 700.0}
_SHARED_BY = 1  # runs sharing this machine's CPU packages at once (a study's `parallel`): shared_by()


def shared_by(runs: int) -> None:
    """Say that `runs` runs share this machine at once (the study's `parallel`, in each worker): the
    RAPL counters are package-wide and count them all, so each run is then charged its process's
    share of the machine's busy CPU time (CpuTimeShare), and its energy_source says so."""
    global _SHARED_BY
    _SHARED_BY = max(1, int(runs))


def cpu_share() -> tuple[int, int]:
    """(threads this process computes with, the machine's cores): the share of the machine's power
    that the CPU estimate charges a run."""
    cores = os.cpu_count() or 1
    return min(max(1, torch.get_num_threads()), cores), cores


def _layer_of(name: str) -> int:
    parts = name.split(".")
    if "blocks" in parts:
        return int(parts[parts.index("blocks") + 1])
    return -1 if ("tok_emb" in name or "embed" in name) else 10**9


_BLOCK_INPUT = ("q_proj", "k_proj", "v_proj")  # the products that read a block's input


def matmul_cost(name: str, trainable: bool, first: int | None) -> int:
    """FLOPs per token and parameter of the matrix `name` (module docstring): 6 trainable; 4 frozen
    with gradients flowing through it (at or above the first trainable layer `first`); 2 forward
    only: below it, with nothing trainable (`first` None), or reading the first trainable block's
    input, which needs no gradient when everything below is frozen. pretune plan counts the same."""
    if trainable:
        return 6
    layer = _layer_of(name)
    if first is None or layer < first or (layer == first >= 0 and name.split(".")[-2] in _BLOCK_INPUT):
        return 2
    return 4


def flops_per_token(model: torch.nn.Module, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token from the live model, split into trainable and frozen parts.

    With nothing trainable every product is forward only (2 per parameter). The output layers are
    also given apart, per position they run at: `lm_head` (the vocabulary projection, included in
    trainable/frozen/total as if it ran at every token, as it does in pre-training) and `cls_head` (a
    classifier's head, which runs once per example). Fine-tuning batches run the vocabulary
    projection at their target positions only, and a classifier's task batches not at all:
    `batch_flops` counts a batch that way, with attention at the batch's own width (the figures here
    are at `seq_len`). `forward` and `forward_attention` are the cost of one forward pass per token
    without the output layers (what a DPO reference adds), `lm_head_forward` that of the projection."""
    cfg = model.cfg
    params = [(n, p) for n, p in model.named_parameters(remove_duplicate=False)]
    trainable_layers = [_layer_of(n) for n, p in params if p.requires_grad]
    first = min(trainable_layers) if trainable_layers else 10**9
    trainable = frozen = forward = lm_head = cls_head = lm_head_forward = 0.0
    for name, p in params:  # a tied output projection appears here as lm_head.weight
        if p.dim() < 2 or "tok_emb" in name:  # norms, biases and the embedding lookup: no matmul
            continue
        cost = matmul_cost(name, p.requires_grad, first if trainable_layers else None)
        if p.requires_grad:
            trainable += cost * p.numel()
        else:
            frozen += cost * p.numel()
        if name.split(".")[-2] == "lm_head":
            lm_head, lm_head_forward = lm_head + cost * p.numel(), lm_head_forward + 2 * p.numel()
        elif name.startswith("head."):
            cls_head += cost * p.numel()
        else:
            forward += 2 * p.numel()
    attn_unit = cfg.n_head * cfg.head_dim * seq_len
    attn = sum((12 if i >= first else 4) * attn_unit for i in range(cfg.n_layer))
    return {"trainable": trainable, "frozen": frozen, "attention": float(attn),
            "total": trainable + frozen + attn - cls_head, "lm_head": lm_head, "cls_head": cls_head,
            "forward": forward, "forward_attention": float(4 * attn_unit * cfg.n_layer),
            "lm_head_forward": lm_head_forward, "seq_len": seq_len}


def batch_flops(fpt: dict[str, float], batch: dict, reference: bool = False) -> float:
    """The FLOPs of one training micro-batch: its real tokens through the body, attention at the
    batch's width (a fine-tuning batch is as wide as its longest example), the vocabulary projection
    at the positions it runs at (`select`, or none for a classifier's task batch, else every token),
    a classifier's head once per example; with `reference`, DPO's forward pass of the reference model
    over the same tokens and positions."""
    tokens = int(batch.get("n_tokens", batch["input_ids"].numel()))
    width = batch["input_ids"].shape[-1] / max(fpt["seq_len"], 1)  # attention scales with the length
    if "labels" in batch:  # a classifier's task batch: the head on each example's last token
        lm_positions, rows = 0, len(batch["labels"])
    else:
        lm_positions, rows = (len(batch["select"]) if "select" in batch else tokens), 0
    body = fpt["total"] - fpt["lm_head"] - fpt["attention"]
    flops = (body + fpt["attention"] * width) * tokens + fpt["lm_head"] * lm_positions + fpt["cls_head"] * rows
    if reference:
        flops += (fpt["forward"] + fpt["forward_attention"] * width) * tokens + fpt["lm_head_forward"] * lm_positions
    return float(flops)


def peak_flops(device: torch.device) -> float | None:
    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_flops_of(gpu_name: str) -> float | None:
    """The PEAK_FLOPS entry of the longest model name in `gpu_name` ("NVIDIA H100 PCIe"), else None."""
    found = [key for key in PEAK_FLOPS if key in gpu_name]
    return PEAK_FLOPS[max(found, key=len)] if found else None


class RaplPackages:
    """Energy of every CPU package (socket) from the powercap RAPL counters, in joules since the
    counter was made. Each package's counter wraps at its max_energy_range_uj; a read that finds it
    lower than the last one adds the range (the counter is read at every checkpoint and at the end,
    far more often than it wraps: every few minutes to hours, depending on the range and the power)."""

    def __init__(self, root: Path = Path("/sys/class/powercap")):
        # top-level zones only (intel-rapl:0, :1, ...): their sub-zones (intel-rapl:0:0, the cores) are
        # parts of them. AMD processors publish the same intel-rapl zones.
        zones = sorted(z for z in root.glob("intel-rapl:*") if z.name.count(":") == 1)
        self._zones = [(z / "energy_uj", self._range(z)) for z in zones]
        if not self._zones:
            raise OSError(f"no RAPL package zone under {root}")
        self._last = [int(f.read_text()) for f, _ in self._zones]  # OSError/ValueError: not readable
        self._total_uj = 0

    @staticmethod
    def _range(zone: Path) -> int | None:
        try:
            return int((zone / "max_energy_range_uj").read_text())
        except (OSError, ValueError):
            return None

    def joules(self) -> float | None:
        """Joules since creation; None when a counter went backwards and its range is unknown."""
        for i, (f, wrap) in enumerate(self._zones):
            now = int(f.read_text())
            delta = now - self._last[i]
            if delta < 0:
                if wrap is None:
                    return None
                delta += wrap
            self._total_uj += delta
            self._last[i] = now
        return self._total_uj / 1e6


class CpuTimeShare:
    """This process's share of the machine's busy CPU time since it was made: its own CPU time (every
    thread) over the busy time of all cores in /proc/stat (user, nice, system, irq, softirq, steal).
    What a package-wide energy counter is apportioned by when several runs share the machine, as
    process-level meters of RAPL do; None when /proc/stat is not readable or nothing was busy."""

    def __init__(self, stat: Path = Path("/proc/stat"), own=None):
        self._stat, self._own = stat, own or time.process_time
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start = (self._own(), self._busy())

    def _busy(self) -> float | None:
        try:
            fields = self._stat.read_text().splitlines()[0].split()
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
        except (OSError, ValueError, IndexError):
            return None
        return (user + nice + system + irq + softirq + steal) / self._hz

    def share(self) -> float | None:
        busy = self._busy()
        if busy is None or self._start[1] is None or busy - self._start[1] <= 0:
            return None
        return min(1.0, max(0.0, (self._own() - self._start[0]) / (busy - self._start[1])))


class EnergyCounter:
    """NVML on NVIDIA GPUs, RAPL (every CPU package) where readable, else power x time (labelled
    'estimate'). On a CPU the default estimate charges the run its share of the cores (threads x 10 W,
    said in the label); meter.device_power_w, when given, is the run's own draw and used as it is. RAPL counts whole packages: a run alone on the machine is charged all of it (idle
    cores and other processes included), and with runs at once (shared_by) its process's share of the
    busy CPU time, said in the label ("rapl, shared: ...")."""

    def __init__(self, device: torch.device, power_w: float | None = None,
                 rapl_root: Path = Path("/sys/class/powercap"), shared: int | None = None,
                 proc_stat: Path = Path("/proc/stat")):
        self.device, self.source = device, "estimate"
        self.shared = _SHARED_BY if shared is None else max(1, shared)
        self.power_w = power_w or DEFAULT_POWER_W.get(device.type, 10.0)
        self._cores = cpu_share() if device.type == "cpu" else None
        if self._cores and not power_w:  # the default guess: the run's share of the cores (a power given is the run's own)
            self.power_w = CPU_CORE_W * self._cores[0]
        self._guessed = not power_w
        self._read = None
        self._time_share, self._last_share, self._by = None, None, "this process's share of the busy CPU time"
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                # NVML counts every GPU; CUDA only the visible ones (CUDA_VISIBLE_DEVICES)
                handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda._get_nvml_device_index(device))
                pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                self._read = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0
                self.source = "nvml"
            except Exception:
                pass
        else:
            try:
                self._read = RaplPackages(rapl_root).joules
                self.source = "rapl"
                if self.shared > 1:
                    self._time_share = CpuTimeShare(proc_stat)
            except (OSError, ValueError):
                pass
        self._start = self._read() if self._read else None
        self._t0 = time.perf_counter()

    def joules(self) -> float:
        if self._read is not None:
            now = self._read()
            if now is not None and now >= self._start:  # else a counter wrapped unseen: the estimate
                if self._time_share is None:
                    return now - self._start
                share = self._time_share.share()
                # nothing measured busy (or no /proc/stat): the run's share of the cores
                self._by = "this process's share of the busy CPU time" if share is not None else \
                    f"its {self._cores[0]} of {self._cores[1]} cores"
                self._last_share = share if share is not None else self._cores[0] / self._cores[1]
                return (now - self._start) * self._last_share
        return self.power_w * (time.perf_counter() - self._t0)

    @property
    def label(self) -> str:
        if self.source == "rapl" and self._time_share is not None:
            share = "" if self._last_share is None else f"{100 * self._last_share:.0f}% of "
            return f"rapl, shared: {share}the package energy, {self._by} ({self.shared} runs at once)"
        if self.source != "estimate":
            return self.source
        cores = f": {self._cores[0]} of {self._cores[1]} cores" if self._cores and self._guessed else ""
        return f"estimate ({self.power_w:.0f} W assumed{cores})"


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or on Linux the process's resident high-water
    mark (VmHWM, reset through /proc/self/clear_refs), so runs in one process are measured apart."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # the high-water mark restarts from the resident set: hand back first what earlier runs freed
    # (glibc keeps up to its trim threshold, 1 GiB here: dist.keep_freed_memory), or a run measured
    # after a larger one reports that one's heap (350 MiB alone, 1076 MiB after a bigger run)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA peak allocated bytes, or the process's peak resident memory since the last reset."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
