"""Model directories: model.safetensors + config.json (+ tokenizer files), and loading them.

A path given to any verb may be a run directory (its model/, else its last checkpoint) or a model
directory. A checkpoint of a fine-tuning run that has not finished loads as its model/ would: a
classifier's language model without its `lm.` prefix (the head apart, `checkpoint_head`), LoRA adapters
folded into their weights with the lora.alpha of the run's config.yaml.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pretune.errors import UserError
from pretune.files import atomic_dir
from pretune.model.config import ModelConfig


class ModelDirError(UserError, RuntimeError):
    """A path that holds no usable model; the message says what was expected."""


def _aliases(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are a second name for an earlier one (a tied output projection)."""
    unique = {n for n, _ in model.named_parameters()}
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} - unique


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict for saving: contiguous CPU tensors, each tied tensor stored once."""
    aliases = _aliases(model)
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k not in aliases}


def load_model_state(model: torch.nn.Module, sd: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load weights; a tied alias may be absent (it is filled through the tensor it shares). Weights of
    another shape (a run resumed with other model.* settings) raise ModelDirError naming the first."""
    own = model.state_dict()
    for name, tensor in sd.items():
        if name in own and tuple(own[name].shape) != tuple(tensor.shape):
            raise ModelDirError(
                f"weights do not fit the model: {name} has shape {tuple(tensor.shape)} in the saved weights "
                f"but {tuple(own[name].shape)} in the model; a run's architecture cannot change (when "
                "resuming, leave model.* as the run's config.yaml has them, or start a new run)")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if m not in _aliases(model)]
    if strict and (missing or unexpected):
        raise ModelDirError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def save_model_dir(model: torch.nn.Module, directory: str | Path, tokenizer=None,
                   extra_config: dict | None = None, state: dict[str, torch.Tensor] | None = None,
                   extra_files: Callable[[Path], None] | None = None) -> Path:
    """model.safetensors (the model's weights, or `state`) + config.json (+ tokenizer files, + what
    `extra_files` writes into the directory it is given), written atomically: all of it or none."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        if extra_files is not None:
            extra_files(tmp)
        save_file(model_state(model) if state is None else state, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        cfg = asdict(model.cfg) if hasattr(model, "cfg") else {}
        cfg.update(extra_config or {})
        cfg["pretune_format"] = 1
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return directory


def is_hf_model_dir(path: str | Path) -> bool:
    """A Hugging Face model directory: config.json with model_type/architectures, not pretune's."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return False
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(raw, dict) and "pretune_format" not in raw and bool(
        raw.get("model_type") or raw.get("architectures"))


def find_model_dir(path: str | Path) -> Path:
    """Accept a run directory (its model/ or last checkpoint), a model directory, or a Hugging Face
    model directory (converted when loaded)."""
    p = Path(path)
    for candidate in (p, p / "model"):
        if (candidate / "config.json").is_file() and (
                (candidate / "model.safetensors").is_file() or is_hf_model_dir(candidate)):
            return candidate
    if (p / "adapter" / "lora.json").is_file():  # a LoRA run that kept the adapter alone (lora.save=adapter)
        return p / "adapter"
    if (p / "lora.json").is_file() and (p / "adapter.safetensors").is_file():
        return p
    ckpts = sorted((d for d in (p / "checkpoints").glob("step-*")
                    if checkpoint_step(d) is not None and (d / "model.safetensors").is_file()), key=checkpoint_step)
    if ckpts:
        return ckpts[-1]
    if not p.exists():
        raise ModelDirError(f"{p} does not exist: give a run directory, a model directory or a Hugging Face "
                            "model directory")
    raise ModelDirError(f"{p} holds no model (expected model/config.json and model/model.safetensors, "
                      "or a checkpoint)")


_STEP = re.compile(r"step-(\d+)")


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a checkpoint directory named step-N (N of any width), else None. Checkpoints are
    ordered by it: their names sort as text only up to step 999999."""
    m = _STEP.fullmatch(Path(path).name)
    return int(m[1]) if m else None


def read_model_config(model_dir: Path) -> ModelConfig:
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    names = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in raw.items() if k in names})




def _base_with_adapter(adapter_dir: Path, overrides: dict):
    """The model of an adapter directory (adapter.safetensors + lora.json): its base model, which
    lora.json names, with the adapter folded into the weights."""
    from pretune.model.lora import apply_lora, merge_lora

    info = json.loads((adapter_dir / "lora.json").read_text())
    base = info.get("base")
    if not base or not Path(base).exists():
        raise ModelDirError(f"{adapter_dir} holds a LoRA adapter alone (lora.save=adapter), and its base model "
                            f"{base} is not there; put the base back, or export with `pretune export --adapter`")
    model, _ = load_model(base, **overrides)
    apply_lora(model, info["rank"], info["alpha"], 0.0, info["targets"])
    load_model_state(model, {**model.state_dict(), **load_file(str(adapter_dir / "adapter.safetensors"))})
    return merge_lora(model).requires_grad_(True)


def load_model(path: str | Path, device: str | torch.device = "cpu", **overrides):
    """(GPT, Tokenizer or None) from a run, model or Hugging Face directory; `overrides` change
    config fields that do not alter the weights' shapes (dropout, max_seq_len)."""
    from pretune.data.tokenizer import Tokenizer
    from pretune.model.gpt import GPT

    model_dir = find_model_dir(path)
    if is_hf_model_dir(model_dir):
        from pretune.interop.hf import load_hf_model

        return load_hf_model(model_dir, device, **overrides)
    if (model_dir / "lora.json").is_file():
        model = _base_with_adapter(model_dir, overrides)
    else:
        cfg = read_model_config(model_dir)
        for key, value in overrides.items():
            setattr(cfg, key, value)
        model = GPT(cfg)
        weights = load_file(str(model_dir / "model.safetensors"))
        if run_of_checkpoint(model_dir) is not None:
            weights = _as_final_weights(weights, model_dir)
        load_model_state(model, weights)
    model.to(device)
    tok = None
    for candidate in (model_dir, Path(path), model_dir.parent):
        if (candidate / "tokenizer.json").is_file():
            tok = Tokenizer.load(candidate)
            break
    return model, tok


# ----------------------------------------------------------------------------- checkpoints of a run


def run_of_checkpoint(model_dir: str | Path) -> Path | None:
    """The run directory of a checkpoint (RUN/checkpoints/step-N), else None."""
    p = Path(model_dir)
    return p.parent.parent if checkpoint_step(p) is not None and p.parent.name == "checkpoints" else None


def read_run_config(run_dir: str | Path) -> dict:
    """A run's config.yaml as plain data ({} when there is none): what a checkpoint's weights need."""
    import yaml

    f = Path(run_dir) / "config.yaml"
    try:
        raw = yaml.safe_load(f.read_text(encoding="utf-8")) if f.is_file() else {}
    except (OSError, yaml.YAMLError) as e:
        raise ModelDirError(f"{f} cannot be read ({e})") from None
    return raw if isinstance(raw, dict) else {}


def unfinished(ckpt: Path, why: str, instead: str = "") -> ModelDirError:
    """The error for a checkpoint that cannot load as the finished run's model: says where the run
    stopped and how to finish it (`instead`: what else may be done)."""
    run = run_of_checkpoint(ckpt)
    return ModelDirError(f"{run} stopped at step {checkpoint_step(ckpt)} before writing model/, and its checkpoint "
                         f"cannot be loaded as that model: {why}. Finish the run with `pretune finetune resume={run}` "
                         f"and use its model/{instead}")


def _as_final_weights(sd: dict[str, torch.Tensor], ckpt: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's training state as the language model's weights of the finished run's model/:
    a classifier's `lm.` prefix taken off and its head left out, each LoRA adapter folded into its
    weight as LoRALinear.merged_weight does, W + (B A) alpha / r."""
    if any(k.startswith("lm.") for k in sd):
        sd = {k[3:]: v for k, v in sd.items() if k.startswith("lm.")}
    adapted = sorted(k[: -len(".lora_a")] for k in sd if k.endswith(".lora_a"))
    if not adapted:
        return sd
    lora = read_run_config(run_of_checkpoint(ckpt)).get("lora")
    if not isinstance(lora, dict) or not isinstance(lora.get("alpha"), (int, float)):
        raise unfinished(ckpt, "it holds LoRA adapters, and the run's config.yaml, which gives their lora.alpha, "
                               "is missing or has no lora settings")
    sd = dict(sd)
    for name in adapted:
        a, b = sd.pop(f"{name}.lora_a"), sd.pop(f"{name}.lora_b")
        rank = a.shape[0]
        if lora.get("rank") != rank:
            raise unfinished(ckpt, f"its adapter {name} has rank {rank}, but the run's config.yaml says "
                                   f"lora.rank={lora.get('rank')}")
        sd[f"{name}.weight"] = sd[f"{name}.weight"] + (b @ a) * (lora["alpha"] / rank)
    return sd


def checkpoint_head(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The classification head's weights in a checkpoint of a classifier run (head.weight -> weight),
    as the finished run's head.safetensors holds them; {} when it has none."""
    from safetensors import safe_open

    with safe_open(str(Path(ckpt) / "model.safetensors"), "pt") as f:
        names = [k for k in f.keys() if k.startswith("head.")]  # noqa: SIM118 (a safetensors file, not a dict)
        return {k[len("head."):]: f.get_tensor(k) for k in names}
