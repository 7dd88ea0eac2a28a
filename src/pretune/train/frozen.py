"""Frozen matrix weights kept in the compute dtype while a mixed-precision run trains.

Under bf16 autocast a linear layer casts its fp32 weight to bf16 on every forward, and when the
input needs a gradient autograd keeps that copy until the backward pass. A trainable weight needs
its fp32 master copy for the optimiser; a frozen one (LoRA's base, the lower blocks of `freeze`, a
DPO reference) does not. Stored in bf16 for the run, it is the very tensor autocast would have
made, so every product is the same bit for bit, while the weight takes half the memory and no copy
is made per forward: for LoRA, 2 bytes per base parameter instead of 4 plus a 2-byte copy per
forward kept for the backward.

Only the weights and biases of linear layers (nn.Linear, LoRALinear's base) are stored so: what
autocast leaves in fp32 (embeddings, norms) stays fp32, and so does a weight shared with such a
module (tied embeddings). Nothing saved changes: while the run lasts, `state_dict()` gives the fp32
originals (kept on the CPU, where the model was built), a loaded state dict updates them, and
`restore()` puts them back before the final model is saved, merged or used outside autocast.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pretune.model.lora import LoRALinear

_LINEAR = (nn.Linear, LoRALinear)


class FrozenInComputeDtype:
    """Store the frozen linear weights of `model` in `dtype` on `device` (see the module docstring)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device):
        shared = {id(p) for m in model.modules() if not isinstance(m, _LINEAR) for p in m.parameters(recurse=False)}
        self.originals: dict[nn.Module, dict[str, torch.Tensor]] = {}  # module -> {"weight": fp32 on the CPU}
        self._hooks = []
        for module in model.modules():
            if not isinstance(module, _LINEAR):
                continue
            kept = {}
            for name, p in module.named_parameters(recurse=False):
                if (name in ("weight", "bias") and not p.requires_grad and id(p) not in shared
                        and p.is_floating_point() and p.dtype != dtype):
                    kept[name] = p.data.detach().to("cpu")  # no copy when the model was built on the CPU
                    p.data = p.data.to(device=device, dtype=dtype)
            if kept:
                self.originals[module] = kept
                self._hooks += [module.register_state_dict_post_hook(_give(kept)),
                                module.register_load_state_dict_pre_hook(_take(kept))]

    def __len__(self) -> int:
        return sum(len(kept) for kept in self.originals.values())

    def restore(self) -> None:
        """Put the fp32 originals back (on the weights' device) and stop substituting them."""
        for module, kept in self.originals.items():
            for name, original in kept.items():
                p = getattr(module, name)
                p.data = original.to(p.device)
        for hook in self._hooks:
            hook.remove()
        self.originals, self._hooks = {}, []


def _give(kept: dict[str, torch.Tensor]):
    """state_dict() post-hook: the originals in place of the bf16 weights."""
    def hook(module, state_dict, prefix, local_metadata) -> None:
        for name, original in kept.items():
            if prefix + name in state_dict:
                state_dict[prefix + name] = original
    return hook


def _take(kept: dict[str, torch.Tensor]):
    """load_state_dict() pre-hook: loaded weights become the originals (then load into bf16 as usual)."""
    def hook(module, state_dict, prefix, *args) -> None:
        for name, original in kept.items():
            if prefix + name in state_dict:
                kept[name] = state_dict[prefix + name].detach().to("cpu", original.dtype, copy=True)
    return hook
