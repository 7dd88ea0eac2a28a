"""LoRA: low-rank adapters on chosen linear layers, from outside the model.

A LoRALinear keeps the base layer's `weight` and `bias` under their own names, so a base checkpoint
loads into an adapted model unchanged, and adds `lora_a` (r x in) and `lora_b` (out x r):

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T,   with B = 0 at start,

so the adapted model equals the base model at step 0. `merge_lora` folds B A into W and puts plain
nn.Linear layers back.
"""

from __future__ import annotations

import fnmatch
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretune.errors import ConfigError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _LoRAProductCPU(torch.autograd.Function):
    """x W^T + b + scale (x' A^T) B^T on the CPU, forward and backward, with the rank r on the rows
    of every small product: MKL runs a product with r output columns 2-4x slower than the
    transposed one with r output rows (measured for 768 x 128 inputs and r = 8: x A^T 126 vs
    56 us; B^T grad^T 185 vs 53 us; the gradient of B 215 vs 47 us). x: (N, in); x': the
    adapter's input, x after dropout (None: x itself); the frozen W and b get gradients only if
    they require them."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, x_drop):
        x_in = x if x_drop is None else x_drop  # the adapter's input
        xa_t = torch.mm(lora_a, x_in.t())  # (r, N)
        y = F.linear(x, weight, bias).addmm_(xa_t.t(), lora_b.t(), alpha=scale)  # (N, out)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, x_in, weight, lora_a, lora_b, xa_t)
        ctx.scale, ctx.dropped = scale, x_drop is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, x_in, weight, lora_a, lora_b, xa_t = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, _, need_drop = ctx.needs_input_grad
        gxa_t = torch.mm(lora_b.t(), grad.t()).mul_(ctx.scale)  # (r, N): the gradient of x' A^T, transposed
        dx = torch.mm(grad, weight) if need_x else None  # (N, in)
        ddrop = torch.mm(gxa_t.t(), lora_a) if need_drop else None  # through dropout: autograd adds it to dx
        if dx is not None and not ctx.dropped:
            dx.addmm_(gxa_t.t(), lora_a)
        dw = torch.mm(grad.t(), x) if need_w else None
        dbias = grad.sum(0) if need_bias else None
        da = torch.mm(gxa_t, x_in) if need_a else None  # (r, in)
        db = torch.mm(xa_t, grad).mul_(ctx.scale).t() if need_b else None  # (out, r)
        return dx, dw, dbias, da, db, None, ddrop


class LoRALinear(nn.Module):
    """y = x W^T + b + (alpha/r) B A x, with B = 0 at start so the model is unchanged at step 0.

    The base weight and bias are frozen: no .grad buffers, only the input's gradient flows through
    them. On the CPU in full precision, base and adapter (its dropout included) run as one
    autograd function (_LoRAProductCPU); elsewhere (GPU, autocast) as x A^T on the flattened
    input, (N, r), and one addmm that adds (alpha/r) (x A^T) B^T to the base output, the scale
    riding on the product."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device,
                                               dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device,
                                               dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.enabled = True

    def _one_product(self, x: torch.Tensor) -> bool:
        """Whether base and adapter run as one _LoRAProductCPU: enabled, CPU, fp32."""
        return (self.enabled and x.device.type == "cpu" and x.dtype == self.lora_a.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu"))

    def _dropping(self) -> bool:
        return self.dropout is not None and self.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (N, in), N = all leading dims
        if not self.enabled:
            y = F.linear(x2, self.weight, self.bias)
        elif self._one_product(x):
            y = _LoRAProductCPU.apply(x2, self.weight, self.bias, self.lora_a, self.lora_b, self.scale,
                                      self.dropout(x2) if self._dropping() else None)
        else:
            xa = F.linear(x2 if self.dropout is None else self.dropout(x2), self.lora_a)  # (N, r)
            y = torch.addmm(F.linear(x2, self.weight, self.bias), xa, self.lora_b.t(), alpha=self.scale)
        return y.view(*x.shape[:-1], self.out_features)  # (..., out)

    # Adapted layers that share their input (q/k/v, gate/up) as one product on the CPU, the
    # protocol of gpt.fused_linear, which hands over the concatenated base weights: the adapters
    # are stacked as one of rank sum(r) whose B is block-diagonal, so each output block sees only
    # its own adapter. Whole LoRA steps of the shakespeare-char shape (q/k/v/o adapted, 2 threads,
    # alternated in one process): 59.4 -> 49.6 ms; the `small` shape, whose time is in the
    # products, 556 -> 540 ms.
    @staticmethod
    def can_fuse(x: torch.Tensor, layers) -> bool:
        # each adapter drops its input out on its own, so dropout in training keeps them apart
        return all(m._one_product(x) and not m._dropping() for m in layers) and len({m.scale for m in layers}) == 1

    @staticmethod
    def fused_linear(x: torch.Tensor, layers, weight: torch.Tensor, bias: torch.Tensor | None,
                     rows: torch.Tensor | None) -> torch.Tensor:
        lora_a = torch.cat([m.lora_a for m in layers])  # (sum r, in)
        lora_b = torch.block_diag(*[m.lora_b for m in layers])  # (sum out, sum r)
        if rows is not None:
            lora_b = lora_b.index_select(0, rows)  # in the order of the weight's rows
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        y = _LoRAProductCPU.apply(x2, weight, bias, lora_a, lora_b, layers[0].scale, None)
        return y.view(*x.shape[:-1], weight.shape[0])  # (..., sum out)

    def merged_weight(self) -> torch.Tensor:
        return self.weight + (self.lora_b @ self.lora_a) * self.scale

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _matches(name: str, targets: tuple[str, ...] | list[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(leaf == t or fnmatch.fnmatch(name, t) for t in targets)


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS) -> list[str]:
    """Freeze every parameter, then wrap matching nn.Linear layers in the blocks with adapters.

    `targets` are leaf names (q_proj, ...) or glob patterns on the full name (blocks.1*.mlp.*).
    Returns the names of the wrapped layers.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.startswith("blocks.") and _matches(name, targets):
            parent_name, leaf = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), leaf, LoRALinear(module, rank, alpha, dropout))
            wrapped.append(name)
    if not wrapped:
        raise ConfigError(f"lora.targets={list(targets)} matched no linear layer; known layers: "
                         + ", ".join(sorted(DEFAULT_TARGETS)))
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters alone: {'blocks.0.attn.q_proj.lora_a': (r, in), '...lora_b': (out, r)}."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if k.endswith((".lora_a", ".lora_b"))}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and restore plain nn.Linear layers (in place)."""
    for name, module in lora_layers(model).items():
        base = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                         device=module.weight.device, dtype=module.weight.dtype)
        base.weight.copy_(module.merged_weight())
        if module.bias is not None:
            base.bias.copy_(module.bias)
        parent_name, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), leaf, base)
    return model


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict `merge_lora` would give, without changing the model: every adapted weight
    with its adapter folded in, no adapter tensors. The model keeps training or evaluating as it
    was (a DPO run's reference is still the base with its adapters switched off)."""
    from pretune.model.io import model_state

    state = model_state(model)
    for name, module in lora_layers(model).items():
        state[f"{name}.weight"] = module.merged_weight().detach().to("cpu").contiguous()
        del state[f"{name}.lora_a"], state[f"{name}.lora_b"]
    return state


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model (the DPO reference) without a second copy of its weights."""
    layers = list(lora_layers(model).values())
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True
