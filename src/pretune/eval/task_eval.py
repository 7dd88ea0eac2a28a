"""`pretune evaluate MODEL task=... data.val=FILE`: a task's figures for any model and dataset.

The model is a run or model directory (pretune's, or a Hugging Face one). A model fine-tuned by
pretune carries its task in model/task.json: the task, the label names in the order its head was
trained on, and whether it classifies with a head or by scoring label words (verbalizer); with no
`task=` given, that task is evaluated. Records are read with the same field names and template as
`pretune finetune` reads them (data.text_field, data.label_field, ...), and scored by the same code
as the evaluations during fine-tuning (eval.scoring.evaluate_task), so the figures agree.

Preference data is scored by the model's own margin, log p(chosen) - log p(rejected): the share of
pairs it prefers the chosen response (pref_accuracy) and the mean margin; with `reference=MODEL`
also DPO's implicit reward margin and loss against that reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pretune.config import TASKS, Config, FinetuneConfig, TrainConfig
from pretune.data import tasks as T
from pretune.data.labels import duplicate_labels, ids_to_names
from pretune.data.sources import DataError
from pretune.errors import ConfigError
from pretune.model.heads import ClassifierModel
from pretune.model.io import (
    checkpoint_head,
    find_model_dir,
    load_model,
    read_run_config,
    run_of_checkpoint,
    unfinished,
)
from pretune.train.objectives import pair_log_ratios


def read_task_info(model_path: str | Path) -> dict:
    """model/task.json of a fine-tuned model ({} for a plain language model); for the checkpoint of
    a fine-tuning run that has not finished, what its task.json will say (`checkpoint_task_info`)."""
    model_dir = find_model_dir(model_path)
    f = model_dir / "task.json"
    if f.is_file():
        return json.loads(f.read_text())
    return checkpoint_task_info(model_dir) if run_of_checkpoint(model_dir) is not None else {}


def checkpoint_task_info(ckpt: Path) -> dict:
    """The task.json that a fine-tuning run writes with model/ (finetune.save_final_factory), from the
    run's config.yaml, for one of its checkpoints ({} for a pre-training run). A classification
    head's label order comes from data.labels or the run's lineage.json; a run that kept it in
    neither (made before lineage.json held it) is refused."""
    raw = read_run_config(run_of_checkpoint(ckpt))
    if raw.get("task") not in TASKS:
        return {}
    from pretune.config_io import from_dict

    cfg = from_dict(Config, raw)  # the config the run saved: its finetune settings, as task.json takes them
    labels = [str(x) for x in cfg.data.labels] if cfg.task == "classification" and cfg.data.labels else None
    lineage = run_of_checkpoint(ckpt) / "lineage.json"
    if cfg.task == "classification" and not labels and lineage.is_file():  # the order the run gave them
        labels = json.loads(lineage.read_text()).get("labels")
    if cfg.task == "classification" and cfg.finetune.classifier == "head" and not labels:
        raise unfinished(ckpt, "the order of its classification head's labels is in neither data.labels nor "
                               "its lineage.json", " (or give task=lm to evaluate its language model alone)")
    return T.task_info(cfg, labels)


def load_task_model(model_path: str | Path, info: dict, device) -> tuple[torch.nn.Module, object]:
    """The language model, wrapped with its classification head when it was trained with one."""
    lm, tok = load_model(model_path, device=device)
    if tok is None:
        raise ConfigError(f"{model_path} has no tokenizer files; evaluation needs the model's tokenizer")
    model: torch.nn.Module = lm
    if info.get("classifier") == "head":
        model_dir = find_model_dir(model_path)
        head_file = model_dir / "head.safetensors"
        if head_file.is_file():
            head = load_file(str(head_file), device=str(device))
        elif run_of_checkpoint(model_dir) is not None and not (model_dir / "task.json").is_file():
            head = checkpoint_head(model_dir)  # a run that has not finished: the head in its training state
            if not head:
                raise unfinished(model_dir, "its config.yaml names a classification head, which the checkpoint lacks")
            if head["weight"].shape[0] != len(info["labels"]):
                raise unfinished(model_dir, f"its head has {head['weight'].shape[0]} outputs, but data.labels in "
                                            f"config.yaml names {len(info['labels'])} labels")
        else:
            raise ConfigError(f"{model_path}: task.json names a classification head but {head_file.name} is missing")
        model = ClassifierModel(lm, len(info["labels"])).to(device)
        model.head.load_state_dict(head)
    return model.eval().requires_grad_(False), tok


class _PolicyMargins:
    """evaluate_task's preference scorer: margins against `reference`, or the policy's own (zero
    reference) when there is none."""

    def __init__(self, reference: torch.nn.Module | None):
        self.reference = reference

    def margins(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        pol = pair_log_ratios(model, batch)
        return (pol if self.reference is None else pol - pair_log_ratios(self.reference, batch)), pol


def evaluate_on_task(model_path: str, e, device, info: dict | None = None) -> dict:
    """Task figures of the model at `model_path` on e.data.val (an EvaluateConfig `e`); `info` is
    its task.json when the caller has read it already."""
    from pretune.eval.scoring import evaluate_task, write_predictions

    info = read_task_info(model_path) if info is None else info
    task = e.task or info.get("task")
    if task not in TASKS:
        raise ConfigError(f"task={task!r} is not one of {', '.join(TASKS)}")
    model, tok = load_task_model(model_path, info if info.get("task") == task else {}, device)
    classifier = "head" if isinstance(model, ClassifierModel) else "verbalizer"
    own = info if info.get("task") == task else {}  # the model's own task: its settings are the defaults
    beta = e.dpo_beta or own.get("dpo_beta") or FinetuneConfig.dpo_beta
    tuned = own.get("format", {})

    def setting(name: str):
        given = getattr(e, name)
        return given if given is not None else tuned.get(name, getattr(FinetuneConfig, name))

    stats = T.TaskStats()
    records = T.read_records(e.data.val, task, e.data, stats, "data.val")
    if not records:
        raise DataError(f"data.val={e.data.val} holds no {task} records")
    # as the run scored itself: examples cut to the model's context, its max_new_tokens, and every
    # example generated for
    generated = own.get("max_new_tokens") or FinetuneConfig.max_new_tokens
    finetune = FinetuneConfig(classifier=classifier, max_len=min(setting("max_len"), model.cfg.max_seq_len),
                              truncation=setting("truncation"), prompt_loss=setting("prompt_loss"),
                              turns=setting("turns"), max_new_tokens=e.max_new_tokens or generated,
                              eval_examples=e.eval_examples or len(records), dpo_beta=beta)
    cfg = Config(task=task, data=e.data, finetune=finetune, train=TrainConfig(eval_batch_size=4 * e.batch_size))
    labels = None
    if task == "classification":
        trained = info.get("labels") if info.get("task") == task else None
        if classifier == "head":
            if e.data.labels and list(e.data.labels) != trained:
                raise ConfigError(f"data.labels={e.data.labels}: this model's head was trained on the labels "
                                  f"{trained}, in that order; leave data.labels unset")
            labels = trained
        else:  # the label words to score: given, else those the model was tuned on, else the data's
            twice = duplicate_labels(e.data.labels or [])
            if twice:
                raise ConfigError(f"data.labels={e.data.labels} lists {', '.join(map(repr, twice))} more than once; "
                                  "name each label once")
            labels = list(e.data.labels or trained or sorted({r["label"] for r in records}))
        if labels:  # records that give label ids get the names, as fine-tuning maps them (finetune._records)
            ids_to_names(records, labels, e.data.on_error)
    examples = T.encode(records, cfg, tok, labels, stats)
    objective = None
    if task == "preference":
        reference = load_model(e.reference, device=device)[0].eval() if e.reference else None
        objective = _PolicyMargins(reference)
    per_example: dict = {}
    figures = evaluate_task(model, examples, cfg, tok, labels, device, generation=True, objective=objective,
                            per_example=per_example)
    if task == "preference" and not e.reference:  # no reference: the policy's own margins only
        figures = {"pref_accuracy": figures["pref_accuracy"], "policy_margin": figures["reward_margin"] / finetune.dpo_beta}
        per_example.pop("reward_margin", None)
    if e.predictions:
        write_predictions(Path(e.predictions), per_example)
    figures.update(task=task, examples=len(examples), truncated_examples=stats.truncated,
                   skipped_records=stats.skipped)
    return figures
