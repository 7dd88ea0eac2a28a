"""A LoRA run's adapter as a PEFT adapter directory.

A LoRA fine-tuning run keeps its adapter apart from the merged model:

    RUN/adapter/adapter.safetensors   blocks.{i}.attn.q_proj.lora_a (r, in), ....lora_b (out, r)
    RUN/adapter/lora.json             {"rank", "alpha", "dropout", "targets", "base"}

PEFT stores the same matrices under `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
(and lora_B), with scale lora_alpha / r exactly as pretune's alpha / rank, so the export is a rename
plus adapter_config.json. The base model it applies to is the run's parent, exported on its own with
`pretune export BASE OUT`; `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT),
ADAPTER)` then equals the pretune LoRA model.

adapter_config.json's base_model_name_or_path (what AutoPeftModelForCausalLM loads) is the most
loadable name of that base (`loadable_base`): `base=` when given (such as the base's own export);
the base itself when it is a Hugging Face directory; the hub id or directory a `pretune import`ed base
came from (its config.json's hf_source); otherwise the base's pretune path, which transformers cannot
load (the export says so, and how to load the pair).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from safetensors.torch import load_file, save_file

from pretune.files import atomic_dir
from pretune.interop.export_policy import check_no_classifier_head
from pretune.interop.hf import InteropError, check_out, dtype_name, parse_dtype

_LORA = re.compile(r"^blocks\.(\d+)\.(attn|mlp)\.(\w+)\.lora_(a|b)$")
_GROUP = {"attn": "self_attn", "mlp": "mlp"}


def peft_name(name: str) -> tuple[str, str]:
    """'blocks.0.attn.q_proj.lora_a' -> (PEFT tensor name, HF module name)."""
    m = _LORA.match(name)
    if not m:
        raise InteropError(f"adapter tensor {name} is not a pretune LoRA tensor "
                           "(blocks.N.attn|mlp.LAYER.lora_a|lora_b)")
    layer, group, leaf, ab = m.groups()
    module = f"model.layers.{layer}.{_GROUP[group]}.{leaf}"
    return f"base_model.model.{module}.lora_{ab.upper()}.weight", module


def read_adapter(run: str | Path) -> tuple[dict, dict]:
    """(lora.json, adapter tensors) of a LoRA run directory."""
    d = Path(run) / "adapter"
    if not (d / "adapter.safetensors").is_file() or not (d / "lora.json").is_file():
        raise InteropError(f"{run} has no adapter/adapter.safetensors and adapter/lora.json; is it a "
                           "LoRA fine-tuning run? (export its merged model without --adapter)")
    meta = json.loads((d / "lora.json").read_text(encoding="utf-8"))
    missing = [k for k in ("rank", "alpha") if k not in meta]
    if missing:
        raise InteropError(f"{d / 'lora.json'} lacks {', '.join(missing)}")
    return meta, load_file(str(d / "adapter.safetensors"))


def _n_layer(run: Path) -> int | None:
    """Number of blocks of the run's model (model/config.json, else the run's config.yaml)."""
    if (run / "model" / "config.json").is_file():
        value = json.loads((run / "model" / "config.json").read_text()).get("n_layer")
    elif (run / "config.yaml").is_file():
        import yaml

        value = ((yaml.safe_load((run / "config.yaml").read_text()) or {}).get("model") or {}).get("n_layer")
    else:
        value = None
    return int(value) if value else None


def loadable_base(base: str | None) -> tuple[str | None, str | None, bool]:
    """(name, revision, whether transformers loads it) of lora.json's base, for base_model_name_or_path."""
    from pretune.errors import UserError
    from pretune.interop.source import _HUB_ID, looks_like_path
    from pretune.model.io import find_model_dir, is_hf_model_dir

    if not base:
        return None, None, False
    try:
        model_dir = find_model_dir(base)
        if is_hf_model_dir(model_dir):
            return str(model_dir.resolve()), None, True
        cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (UserError, OSError, ValueError):
        return base, None, False
    src = cfg.get("hf_source")  # a `pretune import`ed model, unchanged since: where it came from
    if isinstance(src, str) and is_hf_model_dir(src):
        return str(Path(src).resolve()), None, True
    if isinstance(src, str) and _HUB_ID.match(src) and not looks_like_path(src) and not Path(src).exists():
        return src, cfg.get("hf_revision"), True
    return base, None, False


def export_peft_adapter(run: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False,
                        log: Callable[[str], None] = print, lm_only: bool = False,
                        base: str | None = None) -> Path:
    """Write RUN's LoRA adapter as adapter_config.json + adapter_model.safetensors (PEFT layout).

    The adapter of a classification run (LoRA plus a classification head) is refused unless
    lm_only=True, which writes the LoRA matrices alone (see interop.export_policy.check_no_classifier_head).
    `base` (a hub id or a transformers directory of the base model) is written as
    base_model_name_or_path; without it, loadable_base finds the best name there is."""
    out, run = Path(out), Path(run)
    check_out(out, overwrite)
    want = parse_dtype(dtype)
    meta, sd = read_adapter(run)
    check_no_classifier_head(run, lm_only, log)
    tensors, modules = {}, set()
    for name, tensor in sd.items():
        new, module = peft_name(name)
        rank_dim = 0 if name.endswith("lora_a") else 1
        if tensor.shape[rank_dim] != meta["rank"]:
            raise InteropError(f"{name} has shape {tuple(tensor.shape)} but lora.json says rank "
                               f"{meta['rank']}")
        tensors[new] = tensor.to(want).contiguous()
        modules.add(module)
    if not tensors:
        raise InteropError(f"{run}/adapter/adapter.safetensors holds no LoRA tensors")
    if base:
        name, revision, loadable = (str(Path(base).resolve()) if Path(base).exists() else base), None, True
    else:
        name, revision, loadable = loadable_base(meta.get("base"))
    leaves = sorted({m.rsplit(".", 1)[1] for m in modules})
    n_layer = _n_layer(run)
    layers = {int(m.split(".")[2]) for m in modules}
    # Leaf names when every block is adapted on the same layers; otherwise the exact module names.
    everywhere = (n_layer is not None and layers == set(range(n_layer))
                  and len(modules) == n_layer * len(leaves))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(meta["rank"]),
        "lora_alpha": float(meta["alpha"]), "lora_dropout": float(meta.get("dropout", 0.0)),
        "target_modules": leaves if everywhere else sorted(modules), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
        "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": name,
        "revision": revision,
    }
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    log(f"exported a rank-{meta['rank']} LoRA adapter on {len(modules)} layers ({dtype_name(want)}) "
        f"-> {out}; its base: {name if loadable else 'pretune export ' + (name or 'BASE') + ' BASE_OUT'}")
    if not loadable:
        log(f"note: base_model_name_or_path is {name or 'unknown'}, which transformers cannot load (so "
            "AutoPeftModelForCausalLM cannot either): export the base and load the pair with "
            "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_OUT), "
            f"{str(out)!r}), or export the adapter again with base=BASE_OUT (see docs/interop.md)")
    return out
