"""What every export (transformers, PEFT adapter, GGUF) carries, whatever its format: the chat
template the model is prompted with, and never a classification model without its head."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

from pretune.interop.hf import InteropError


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def exported_chat_template(tok) -> str:
    """The chat template an export carries: the tokenizer's own, else pretune's DEFAULT_CHAT_TEMPLATE.

    pretune renders every conversation with `data.templates.chat_template_of(tok)`: instruction and
    text2text fine-tuning train on it, and `pretune serve` and `pretune chat` prompt with it. A model
    fine-tuned on the default therefore needs the default in its export, or transformers'
    `apply_chat_template` and llama.cpp have no template (or guess another) and prompt it in a format
    it never saw. The default is written for a pre-trained-only model too, although no template was
    trained into it: it is the format pretune serves that model with, so an export behaves as
    `pretune serve` does, and fine-tuning the export elsewhere with its template matches what a
    pretune fine-tune of it would have trained on.
    """
    from pretune.data.templates import chat_template_of

    return chat_template_of(tok)


def tokenizer_for_export(tok):
    """A copy of `tok` whose chat template is the one the export writes (see exported_chat_template)."""
    out = copy.copy(tok)
    out.chat_template = exported_chat_template(tok)
    return out


def classifier_head_info(path: str | Path) -> dict | None:
    """task.json (plus "head_dir") of a run or model trained with a classification head, else None.

    The head (head.safetensors beside task.json) lives in model/ and, for a LoRA run, in adapter/."""
    from pretune.model.io import ModelDirError, find_model_dir

    candidates = [Path(path) / "adapter"]
    try:
        candidates.insert(0, find_model_dir(path))
    except ModelDirError:
        pass
    for d in candidates:
        info = _read_json(d / "task.json")
        if info.get("classifier") == "head" or (d / "head.safetensors").is_file():
            return {**info, "head_dir": str(d)}
    return None


def check_no_classifier_head(path: str | Path, lm_only: bool, log: Callable[[str], None]) -> None:
    """Refuse to export a classification model as if it were a language model, which would silently
    drop its head; with lm_only=True, export the language model alone and say so.

    (transformers' LlamaForSequenceClassification cannot hold pretune's head exactly: its `score`
    layer has no bias, and pretune's head has one.)"""
    info = classifier_head_info(path)
    if info is None:
        return
    head = Path(info["head_dir"]) / "head.safetensors"
    if lm_only:
        log(f"note: lm_only=true: exporting the language model of {path} without its classification "
            f"head ({head} stays with the run)")
        return
    labels = info.get("labels") or []
    shown = ", ".join(map(str, labels[:6])) + (" ..." if len(labels) > 6 else "")
    raise InteropError(
        f"{path} is a classification model: a language model plus a linear head on the last token "
        f"({len(labels)} labels: {shown}) in {head}. Export writes language models only, and the head "
        "has no exact transformers form (LlamaForSequenceClassification's score layer has no bias), "
        "so it would be lost. To export the language model alone, without the head, add lm_only=true "
        f"(or --lm-only); to classify with the head, use pretune itself (`pretune evaluate {path} "
        "data.val=FILE`). For a classifier that exports whole, fine-tune with "
        "finetune.classifier=verbalizer (it scores label words with the language model)."
    )


def lineage_model_dirs(path: str | Path) -> list[Path]:
    """The model directory of `path`, then those of the models it was trained from (each run's
    lineage.json names its parent), nearest first. An export of a trained model takes from the
    model it was imported as what training does not change: generation_config.json and the
    context the original was made for."""
    from pretune.model.io import find_model_dir

    dirs: list[Path] = []
    here: Path | None = Path(path)
    while here is not None and len(dirs) < 64:
        try:
            d = find_model_dir(here).resolve()
        except Exception:  # noqa: BLE001 (a parent moved or deleted since, or a hub id: the chain ends)
            break
        if d in dirs:
            break
        dirs.append(d)
        run = next((r for r in (here, d.parent) if (r / "lineage.json").is_file()), None)
        parent = _read_json(run / "lineage.json").get("parent") if run is not None else None
        here = Path(parent) if parent else None
    return dirs


def generation_config_dir(path: str | Path) -> Path | None:
    """The nearest model directory in `path`'s lineage that holds a generation_config.json."""
    return next((d for d in lineage_model_dirs(path) if (d / "generation_config.json").is_file()), None)


def exported_context(path: str | Path, max_seq_len: int) -> int:
    """The context length an export declares (max_position_embeddings, GGUF context_length): the
    imported original's (`hf_context`, recorded by `pretune import`) when it is longer than the
    max_seq_len the run chose for its RoPE tables, which is a memory choice, not the model's limit."""
    for d in lineage_model_dirs(path):
        context = _read_json(d / "config.json").get("hf_context")
        if context:
            return max(int(context), max_seq_len)
    return max_seq_len
