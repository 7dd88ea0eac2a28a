"""Training objectives. Each returns a loss SUMMED over its targets and says how many targets a batch
has; the loop divides by the number of targets of each kind in the whole optimiser step, so every
target token (or example, or pair) weighs the same whatever the masking, padding or micro-batching.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from pretune.model.gpt import cross_entropy_sum
from pretune.model.lora import adapters_disabled, lora_layers


def lm_loss_sum(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Summed next-token cross-entropy of a batch; with `select` (task batches) the logits are
    computed at the target positions only."""
    if "select" not in batch:
        return cross_entropy_sum(model(batch["input_ids"]), batch["targets"])
    select = batch["select"]
    return cross_entropy_sum(model(batch["input_ids"], select=select),
                             batch["targets"].flatten().index_select(0, select))


class LMObjective:
    """Next-token prediction on `input_ids` -> `targets` (-100 marks tokens without loss)."""

    def count(self, batch: dict) -> int:
        return len(batch["select"]) if "select" in batch else int((batch["targets"] != -100).sum())

    def __call__(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return lm_loss_sum(model, batch)

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """A per-step regulariser added once per optimiser step (none for plain LM training)."""
        return None


class ClassifierObjective(LMObjective):
    """Cross-entropy of the classification head, one target per example; replay batches use the LM."""

    def count(self, batch: dict) -> int:
        return int((batch["labels"] != -100).sum()) if "labels" in batch else super().count(batch)

    def __call__(self, model, batch):
        if "labels" not in batch:
            return super().__call__(model, batch)
        return F.cross_entropy(model(batch["input_ids"], batch["last"]).float(), batch["labels"], reduction="sum")


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """Sum of log-probabilities of each row's target tokens, (B,)."""
    targets = batch["targets"]
    select = batch.get("select")  # lm_batch makes it; logits at the target positions only, summed into rows
    if select is None:
        select = (targets.flatten() != -100).nonzero().squeeze(1)
    logp = -F.cross_entropy(model(batch["input_ids"], select=select).float(),
                            targets.flatten().index_select(0, select), reduction="none")  # (N,)
    rows = torch.div(select, targets.shape[1], rounding_mode="floor")
    return torch.zeros(targets.shape[0], dtype=logp.dtype, device=logp.device).index_add_(0, rows, logp)


def pair_log_ratios(model, batch) -> torch.Tensor:
    """log p(chosen) - log p(rejected) per pair; the batch's rows alternate chosen, rejected."""
    logp = sequence_logprobs(model, batch)
    return logp[0::2] - logp[1::2]


class DPOObjective(LMObjective):
    """Direct Preference Optimisation against a frozen reference.

    Rows alternate chosen, rejected. With LoRA the reference is the same model with its adapters
    switched off (no second copy of the weights); otherwise a frozen copy of the initial model.
    """

    def __init__(self, model: torch.nn.Module, beta: float):
        self.beta = beta
        self.reference = None if lora_layers(model) else copy.deepcopy(model).eval().requires_grad_(False)

    def count(self, batch: dict) -> int:
        if "pair_weight" in batch:  # a filler pair (data.tasks.without_targets) counts for nothing
            return int(batch["pair_weight"].sum())
        return batch["pairs"] if "pairs" in batch else super().count(batch)

    def margins(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(policy log-ratio - reference log-ratio) per pair, and the policy log-ratio."""
        pol_ratio = pair_log_ratios(model, batch)
        with torch.no_grad():
            if self.reference is None:  # the base without its adapters, and without dropout like a copy
                inner = getattr(model, "module", model)
                inner = getattr(inner, "_orig_mod", inner)
                training = inner.training
                try:
                    with adapters_disabled(inner.eval()):
                        ref_ratio = pair_log_ratios(model, batch)
                finally:
                    inner.train(training)
            else:
                ref_ratio = pair_log_ratios(self.reference.to(pol_ratio.device), batch)
        return pol_ratio - ref_ratio, pol_ratio

    def __call__(self, model, batch):
        if "pairs" not in batch:
            return super().__call__(model, batch)
        delta, _ = self.margins(model, batch)
        loss = -F.logsigmoid(self.beta * delta)
        return (loss * batch["pair_weight"]).sum() if "pair_weight" in batch else loss.sum()


def _plain_name(name: str) -> str:
    """A parameter's name without the prefixes that DDP and torch.compile add."""
    for prefix in ("module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name


class L2SP:
    """Wrap an objective with lambda/2 * ||w - w0||^2 over the trainable weights (w0: the start).

    A classification head is new, with no pre-trained weights to stay near: it is left out, as in
    Li et al.'s L2-SP (weight decay regularises it); pulling it toward its random start would not.

    A LoRA adapter is a change to a pre-trained weight, (alpha/r) B A, so its term is that change's
    size, (alpha/r)^2 ||B A||^2, computed as the sum of (B^T B) * (A A^T) (two r x r products, no
    out x in matrix); pulling A back to its random start instead would say nothing about the weight.

    The anchors are taken by name when the objective is built, from the unwrapped model (so a resumed
    run still anchors to the starting weights, not to its checkpoint). Under FSDP the parameters are
    sharded DTensors (and ranks > 0 built the model, so their anchors, on the meta device): each rank
    then penalises its own shard against the same shard of rank 0's anchor (distribute_tensor),
    which gives each shard exactly its gradient, and `sharded` tells the loop that the penalty values
    of the ranks add up (under DDP each rank holds the whole, identical penalty). An adapter's term
    needs its whole A and B: each rank gathers them (small) and adds 1/world of the term, so that the
    values add up again, as do the gradients that the gathers' backward sums into each shard.
    """

    def __init__(self, base, model: torch.nn.Module, lam: float):
        self.base, self.lam = base, lam
        self.adapters = list(lora_layers(model).values())
        self.anchor = {_plain_name(n): p.detach().clone() for n, p in model.named_parameters()
                       if p.requires_grad and not _plain_name(n).startswith("head.")
                       and not _plain_name(n).endswith((".lora_a", ".lora_b"))}
        self.weights = getattr(base, "weights", {})
        self.sharded = False
        self._local: dict[str, torch.Tensor] = {}

    def count(self, batch):
        return self.base.count(batch)

    def __call__(self, model, batch):
        return self.base(model, batch)

    def __getattr__(self, name):
        # the rest of what the wrapped objective offers (DPO's margins and reference)
        if name.startswith("__") or name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def _anchor_like(self, name: str, p: torch.Tensor) -> torch.Tensor:
        if name not in self._local:
            from torch.distributed.tensor import DTensor, distribute_tensor

            full = self.anchor[name]
            # built on the meta device (FSDP, ranks > 0): any values, distribute_tensor sends rank 0's
            full = torch.empty_like(full, device=p.device) if full.is_meta else full.to(p.device)
            if isinstance(p, DTensor):  # this rank's shard of rank 0's anchor (once: a collective)
                self.sharded = True
                full = distribute_tensor(full, p.device_mesh, p.placements).to_local()
            self._local[name] = full
        return self._local[name]

    def penalty(self, model):
        terms = []
        for name, p in model.named_parameters():
            key = _plain_name(name)
            if key not in self.anchor or not p.requires_grad:
                continue
            local = p.to_local() if hasattr(p, "to_local") else p
            terms.append(((local - self._anchor_like(key, p)) ** 2).sum())
        for m in self.adapters:  # read from the module each time: FSDP replaces its parameters by shards
            a, b, world = m.lora_a, m.lora_b, 1
            if hasattr(a, "full_tensor"):
                from torch.distributed.tensor import Partial

                # each rank's 1/world adds up; the gradient is declared partial, so the gathers'
                # backward sums it over the ranks into each shard
                self.sharded, world = True, a.device_mesh.size()
                a, b = (t.full_tensor(grad_placements=[Partial()]) for t in (a, b))
            terms.append(m.scale ** 2 * ((b.t() @ b) * (a @ a.t())).sum() / world)
        return 0.5 * self.lam * torch.stack(terms).sum() if terms else None
