"""Task records -> tokenised examples -> length-grouped batches.

Tasks: classification (text -> label), instruction (prompt/response or a list of messages),
text2text (source -> target; summarisation and the like) and preference (prompt, chosen, rejected).
Instruction and text2text examples are rendered with the chat template (the tokenizer's own, else
pretune's default) and carry loss on the response only. Batches are a pure function of (seed, step):
each epoch is a seeded shuffle, grouped by length so little compute goes to padding.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pretune.config import Config, DataConfig
from pretune.data.labels import label_name, out_of_range
from pretune.data.sources import DataError, ReadStats, expand_source, iter_records
from pretune.data.templates import (ChatMessageError, ChatTemplateError, check_template, render_prompt_response,
                                    render_turns, validate_messages)
from pretune.data.tokenizer import Tokenizer

IGNORE = -100


@dataclass
class TaskStats:
    """What reading and encoding records found: records skipped (data.on_error=skip) with their
    errors, examples truncated, and bytes that were not UTF-8, replaced by U+FFFD."""

    skipped: int = 0
    truncated: int = 0
    errors: list[str] = field(default_factory=list)
    replaced: int = 0


def _is_texts(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _messages(msgs: list, name: str, path: Path, line: int) -> list[dict]:
    """A record's message list, checked: DataError names file, line, field and the message index."""
    try:
        msgs = validate_messages(msgs)
    except ChatMessageError as e:
        raise DataError(f"{path}:{line}: field {name!r}: {e}") from None
    last = len(msgs) - 1
    if msgs[last]["role"] != "assistant":
        raise DataError(f"{path}:{line}: field {name!r} must end with an assistant message "
                        f"(messages[{last}].role is {msgs[last]['role']!r})")
    if not msgs[last]["content"].strip():
        raise DataError(f"{path}:{line}: field {name!r}: the last assistant message "
                        f"(messages[{last}].content) is empty; there is no response to train on")
    return msgs


class Record(dict):
    """A normalised record: the task's fields, and `where` ("FILE:LINE") for the errors found later
    (an unknown label, a template that refuses the messages). `where` is not a field, so records with
    the same fields are equal wherever they were read."""

    where = ""


def normalise(record: dict, task: str, d: DataConfig, path: Path, line: int) -> Record:
    """One raw record -> the task's canonical fields; DataError names file, line and field. Labels
    are canonical class names (see `label_name`)."""
    out = Record(_normalise(record, task, d, path, line))
    out.where = f"{path}:{line}"
    return out


def _normalise(record: dict, task: str, d: DataConfig, path: Path, line: int) -> dict:
    """`normalise`'s fields."""

    def get(key: str, kind: type = str, text=str):
        name = getattr(d, key)
        value = record.get(name)
        if kind is str and _is_texts(value):
            value = " ".join(v.strip() for v in value)  # a list of sentences is one text
        if value is None or (kind is str and isinstance(value, (str, int, float)) and str(value).strip() == ""):
            fields = ", ".join(k for k in record if k != "__line__")
            raise DataError(f"{path}:{line}: field {name!r} is missing or empty (fields: {fields}); "
                            f"set data.{key} to the right name")
        if (kind is list) != isinstance(value, list) or (kind is str and not isinstance(value, (str, int, float))):
            want = "a list" if kind is list else "text (or a list of texts)"
            raise DataError(f"{path}:{line}: field {name!r} holds {type(value).__name__} {str(value)[:60]!r}, "
                            f"expected {want}")
        return value if kind is list else text(value)

    if task == "classification":
        return {"text": get("text_field"), "label": get("label_field", text=label_name)}
    if task == "instruction":
        if d.messages_field in record:
            return {"messages": _messages(get("messages_field", list), d.messages_field, path, line)}
        return {"messages": [{"role": "user", "content": get("prompt_field")},
                             {"role": "assistant", "content": get("response_field")}]}
    if task == "text2text":
        target = record.get(d.target_field)
        if _is_texts(target):  # several reference targets: train on the first, score against all
            refs = [t for t in target if t.strip()]
            if refs:
                return {"messages": [{"role": "user", "content": get("source_field")},
                                     {"role": "assistant", "content": refs[0]}], "references": refs}
        return {"messages": [{"role": "user", "content": get("source_field")},
                             {"role": "assistant", "content": get("target_field")}]}
    return {"prompt": get("prompt_field"), "chosen": get("chosen_field"), "rejected": get("rejected_field")}


def read_records(specs: list[str], task: str, d: DataConfig, stats: TaskStats, key: str, log=print) -> list[dict]:
    """Every record of `specs`, normalised. A malformed one (unreadable line or bad fields) stops the
    run with its file and line (data.on_error=fail) or is counted in `stats` and left out (skip).
    A directory gives its record files only (its README.md is passed over). Bytes that are not UTF-8
    (data.encoding_errors=replace) are counted in `stats` and a warning names each file and its count."""

    def bad(e: DataError) -> None:
        if d.on_error == "fail":
            raise e
        stats.skipped += 1
        stats.errors.append(str(e))

    out = []
    for spec in specs:
        for path in expand_source(spec, key, records=True):
            read = ReadStats()
            for line, record in iter_records(path, d.encoding_errors, read, on_error=bad):
                try:
                    out.append(normalise(record, task, d, path, line))
                except DataError as e:
                    bad(e)
            if read.replaced:
                stats.replaced += read.replaced
                log(f"warning: {path}: {read.replaced} invalid UTF-8 byte sequence(s) replaced by U+FFFD")
    return out


def verbalizer_prompt(text: str) -> str:
    return f"{text}\nLabel:"


def _cut(prompt: list, room: int, side: str) -> list:
    """The prompt cut to `room` tokens from `side` ("left" keeps its end)."""
    if len(prompt) <= room:
        return prompt
    if room <= 0:
        return []
    return prompt[-room:] if side == "left" else prompt[:room]


def _fit(prompt: list[int], response: list[int], max_len: int, side: str, stats: TaskStats):
    """Truncate to max_len tokens: the prompt first (from `side`), then the response's end."""
    return _fit_alike([(prompt, response)], max_len, side, stats)[0]


def _fit_alike(pieces: list[tuple[list, list[int]]], max_len: int, side: str, stats: TaskStats) -> list[tuple]:
    """(prompt, answer) pieces of one example truncated alike (counted once): an answer too long by
    itself loses its end (to max_len // 2), then every prompt is cut to the room the longest answer
    leaves, so where a prompt is cut depends on no answer in particular (a preference pair's two
    answers follow the same prompt; a verbalizer prompt does not give its gold label away)."""
    answers = [a[: max(1, max_len // 2)] if len(a) >= max_len and len(p) + len(a) > max_len else a
               for p, a in pieces]
    room = max_len - max(len(a) for a in answers)
    if any(len(p) > room or len(a) < len(b) for (p, b), a in zip(pieces, answers)):
        stats.truncated += 1
    return [(_cut(p, room, side), a) for (p, _), a in zip(pieces, answers)]


def task_info(cfg, labels: list[str] | None) -> dict:
    """What a fine-tuned model's task.json says: the task, the label names in the order of the head's
    outputs, the classifier, and how examples were formatted, so `pretune evaluate` formats them the
    same way (the finished run writes it; a stopped run's checkpoint is read as if it had)."""
    f = cfg.finetune
    info = {"task": cfg.task, "labels": labels,
            "classifier": f.classifier if cfg.task == "classification" else None,
            "format": {"max_len": f.max_len, "truncation": f.truncation, "prompt_loss": f.prompt_loss,
                       "turns": f.turns}}
    if cfg.task in ("instruction", "text2text"):
        info["max_new_tokens"] = f.max_new_tokens  # what its generation figures were scored with
    if cfg.task == "preference":
        info["dpo_beta"] = f.dpo_beta
    return info


def label_answers(labels: list[str], tok: Tokenizer) -> list[list[int]]:
    """Each label's words after a verbalizer prompt (" LABEL" + EOS): what training learns and
    scoring compares."""
    return [tok.encode(" " + lab) + [tok.eos_id] for lab in labels]


def _verbalizer_answers(labels: list[str], tok: Tokenizer, max_len: int) -> list[list[int]]:
    """`label_answers`; DataError when the longest leaves no room for the text in max_len tokens."""
    answers = label_answers(labels, tok)
    longest = max(range(len(labels)), key=lambda i: len(answers[i]))
    if len(answers[longest]) >= max_len:
        raise DataError(f"label {labels[longest]!r} takes {len(answers[longest])} tokens with its EOS, leaving no "
                        f"room for the text in max_len={max_len} tokens; raise finetune.max_len or shorten the label")
    return answers


def _where(r: dict) -> str:
    """"FILE:LINE: " of a Record, for an error message ("" for a record made in code)."""
    where = getattr(r, "where", "")
    return f"{where}: " if where else ""


def _cut_after_eos(ids: list[int], eos: int) -> tuple[list[int], list[int]]:
    """(the turn up to and including its last EOS, the layout after it); (ids, []) without an EOS."""
    if eos not in ids:
        return ids, []
    cut = len(ids) - ids[::-1].index(eos)
    return ids[:cut], ids[cut:]


def _chat_error(where: str, render, *args):
    try:
        return render(*args)
    except (ChatMessageError, ChatTemplateError) as e:
        raise type(e)(f"{where}{e}") from None


def prompt_response_ids(messages: list[dict], tok: Tokenizer, where: str = "") -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a conversation through the chat template: the response is the
    last assistant turn with the template's end-of-turn text, cut after its end-of-turn EOS (what
    follows is layout), or with an EOS added when the template writes none."""
    prompt, response = _chat_error(where, render_prompt_response, messages, tok)
    return tok.encode(prompt), _last_turn(response, tok)


def _last_turn(response: str, tok: Tokenizer) -> list[int]:
    ids = _cut_after_eos(tok.encode(response), tok.eos_id)[0]
    return ids if tok.eos_id in ids else ids + [tok.eos_id]


def all_turns_ids(messages: list[dict], tok: Tokenizer,
                  where: str = "") -> tuple[list[tuple], list[int], list[int]]:
    """For the loss on every assistant turn: the history before the last response as (id, mask)
    pairs, earlier assistant turns masked in up to their EOS; the last response's ids; and the prompt
    ids, both as `prompt_response_ids` gives them. Each history piece is tokenised on its own, as
    torchtune tokenises each message, so its ids can differ from the prompt's at the seams."""
    pieces = _chat_error(where, render_turns, messages, tok)
    history = []
    for text, trained in pieces[:-1]:
        turn, layout = _cut_after_eos(tok.encode(text), tok.eos_id) if trained else ([], tok.encode(text))
        history += [(t, 1) for t in turn] + [(t, 0) for t in layout]
    prompt = tok.encode("".join(text for text, _ in pieces[:-1]))  # the pieces join to the prompt
    return history, _last_turn(pieces[-1][0], tok), prompt


def _answer_ids(r: dict, key: str, tok: Tokenizer) -> tuple[list[int], list[int]]:
    """A preference record's prompt and its `key` answer ("chosen" or "rejected") as a chat turn."""
    messages = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[key]}]
    return prompt_response_ids(messages, tok, _where(r))


def encode(records: list[dict], cfg: Config, tok: Tokenizer, labels: list[str] | None,
           stats: TaskStats) -> list[dict]:
    """Records -> examples with token ids and a loss mask (or a label id, or a preference pair).
    Instruction and text2text responses and both answers of a preference pair go through the same
    chat-template path (`prompt_response_ids`), so they end with the same end-of-turn text.

    A record that cannot be encoded (a label not among `labels`, messages the chat template refuses)
    stops the run naming its file and line, or with data.on_error=skip is counted in `stats` and left
    out. What is wrong with every record alike (a template that does not compile, label words too long
    for finetune.max_len) stops the run either way, before any record is encoded."""
    if not records:
        return []
    ft = cfg.finetune
    answers = None
    if cfg.task == "classification" and ft.classifier != "head":
        answers = _verbalizer_answers(labels, tok, ft.max_len - len(tok.prompt_prefix))
    elif cfg.task != "classification":
        check_template(tok)
    examples = []
    for r in records:
        try:
            examples.append(_encode_one(r, cfg, tok, labels, answers, stats))
        except (DataError, ChatTemplateError, ChatMessageError) as e:
            if cfg.data.on_error != "skip":
                raise
            stats.skipped += 1
            stats.errors.append(str(e))
    return examples


def _encode_one(r: dict, cfg: Config, tok: Tokenizer, labels: list[str] | None, answers: list[list[int]] | None,
                stats: TaskStats) -> dict:
    """One record's example (see `encode`); `answers` are the verbalizer's label answers."""
    ft, task, eos = cfg.finetune, cfg.task, [tok.eos_id]
    if task == "classification":
        if r["label"] not in labels:
            problem = out_of_range(r["label"], labels) or (
                f"label {r['label']!r} is not among the training labels {labels}; list every label in data.labels")
            raise DataError(f"{_where(r)}{problem}")
        y = labels.index(r["label"])
        # the BOS a tokenizer's post-processor adds (Llama, Mistral; none for pretune's own), kept
        # whatever the truncation, as transformers' tokenizer(text) gives it
        bos = tok.prompt_prefix
        if ft.classifier == "head":
            ids, _ = _fit(tok.encode(r["text"]), [], ft.max_len - len(bos), ft.truncation, stats)
            return {"ids": (bos + ids) or eos, "label": y}
        # cut to the room the longest label leaves, so scoring fits every label after the prompt
        prompt = tok.encode(verbalizer_prompt(r["text"]))
        p, a = _fit_alike([(prompt, ans) for ans in answers], ft.max_len - len(bos), ft.truncation, stats)[y]
        p = bos + p
        return {"ids": p + a, "mask": [0] * len(p) + [1] * len(a), "label": y, "prompt": p}
    if task in ("instruction", "text2text"):
        # the history with its mask: earlier assistant turns carry loss with finetune.turns=all
        if ft.turns == "all":
            history, a_ids, prompt = all_turns_ids(r["messages"], tok, _where(r))
        else:
            prompt, a_ids = prompt_response_ids(r["messages"], tok, _where(r))
            history = [(t, 0) for t in prompt]
        history, a_ids = _fit(history, a_ids, ft.max_len, ft.truncation, stats)
        p_ids = [t for t, _ in history]
        mask = [int(ft.prompt_loss) or m for _, m in history] + [1] * len(a_ids)
        # generation starts from the whole prompt, cut only to the model's context when it is
        # generated (serve.engine.generate_all): never by the length of the reference answer
        return {"ids": p_ids + a_ids, "mask": mask, "prompt": p_ids, "gen_prompt": prompt,
                "reference": r.get("references") or r["messages"][-1]["content"]}
    pieces = _fit_alike([_answer_ids(r, k, tok) for k in ("chosen", "rejected")], ft.max_len, ft.truncation, stats)
    return dict(zip(("chosen", "rejected"), pieces))


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def lm_batch(seqs: list[list[int]], masks: list[list[int]], pad_id: int) -> dict:
    """Right-padded next-token batch; targets are -100 where the mask is 0 and on padding. `select`
    lists the flattened positions that have a target (made here, on the host, so the step need not
    ask the device which they are): the model computes logits there only."""
    x = _pad([s[:-1] for s in seqs], pad_id)
    y = _pad([[t if m else IGNORE for t, m in zip(s[1:], mk[1:])] for s, mk in zip(seqs, masks)], IGNORE)
    select = (y.flatten() != IGNORE).nonzero().squeeze(1)
    return {"input_ids": x, "targets": y, "select": select, "n_tokens": sum(len(s) - 1 for s in seqs)}


def collate(examples: list[dict], task: str, classifier: str, pad_id: int) -> dict:
    if task == "classification" and classifier == "head":
        return {"input_ids": _pad([e["ids"] for e in examples], pad_id),
                "last": torch.tensor([len(e["ids"]) - 1 for e in examples]),
                "labels": torch.tensor([e["label"] for e in examples]),
                "n_tokens": sum(len(e["ids"]) for e in examples)}
    if task == "preference":
        seqs = [p + a for e in examples for p, a in (e["chosen"], e["rejected"])]  # chosen, rejected, ...
        masks = [[0] * len(p) + [1] * len(a) for e in examples for p, a in (e["chosen"], e["rejected"])]
        return {**lm_batch(seqs, masks, pad_id), "pairs": len(examples)}
    return lm_batch([e["ids"] for e in examples], [e["mask"] for e in examples], pad_id)


def without_targets(batch: dict, drop: list[bool]) -> dict:
    """`batch` with no targets in the rows (examples, pairs) that `drop` marks: they are still
    computed, but add nothing to the loss, its gradient or the count of targets."""
    drop_t = torch.tensor(drop)
    if "labels" in batch:  # a classifier head's batch
        batch["labels"] = batch["labels"].masked_fill(drop_t, IGNORE)
    elif "pairs" in batch:  # a preference batch: a weight per pair
        batch["pair_weight"] = (~drop_t).float()
    else:
        y = batch["targets"].masked_fill(drop_t[:, None], IGNORE)
        batch["targets"], batch["select"] = y, (y.flatten() != IGNORE).nonzero().squeeze(1)
    return batch


def length_of(e: dict) -> int:
    """An example's longest sequence: what must fit the context, and what pads a batch (a preference
    pair's two sequences are rows of their own)."""
    return len(e["ids"]) if "ids" in e else max(len(p) + len(a) for p, a in (e["chosen"], e["rejected"]))


class TaskBatches:
    """StepData over task examples (plus optional replay text): a pure function of (seed, step)."""

    def __init__(self, examples: list[dict], cfg: Config, pad_id: int, replay=None):
        if not examples:
            raise DataError("no training examples: data.train is empty after reading")
        self.examples, self.cfg, self.pad_id = examples, cfg, pad_id
        t = cfg.train
        n_replay = int(round(t.batch_size * cfg.finetune.replay_ratio)) if replay is not None else 0
        self.task_rows = t.batch_size - n_replay
        self.replay, self.n_replay = replay, n_replay
        self.kinds = ("task", "replay") if n_replay else ("task",)
        self.steps_per_epoch = max(1, math.ceil(len(examples) / self.task_rows))
        self.seq_len = max(length_of(e) for e in examples)
        self._epoch: tuple[int, list[list[int]]] | None = None

    def _plan(self, epoch: int) -> list[list[int]]:
        """Batches of example indices for one epoch: shuffled, then grouped by length in windows."""
        if self._epoch is None or self._epoch[0] != epoch:
            rng = random.Random(self.cfg.seed * 1_000_003 + epoch)
            order = list(range(len(self.examples)))
            rng.shuffle(order)
            window = self.task_rows * 32
            order = [i for w in range(0, len(order), window)
                     for i in sorted(order[w: w + window], key=lambda j: length_of(self.examples[j]))]
            batches = [order[i: i + self.task_rows] for i in range(0, len(order), self.task_rows)]
            rng.shuffle(batches)
            self._epoch = (epoch, batches)
        return self._epoch[1]

    def micro_batches(self, step: int, rank: int, world: int) -> list[dict]:
        batches = self._plan(step // self.steps_per_epoch)
        rows = batches[step % self.steps_per_epoch]
        n_fill = -len(rows) % world
        if n_fill:
            # every rank gets as many rows, so as many micro-batches (and collectives), as the others:
            # a short batch (an epoch's last) is filled up from the epoch's start, as accelerate's
            # even_batches does, but the filler rows carry no targets, so the step is one process's
            order = [i for b in batches for i in b]
            rows = rows + [order[j % len(order)] for j in range(n_fill)]
        filler = ([False] * (len(rows) - n_fill) + [True] * n_fill)[rank::world]
        rows = rows[rank::world]
        micro = self.cfg.train.micro_batch_size or len(rows)
        out = []
        for i in range(0, len(rows), micro):
            chunk = [self.examples[j] for j in rows[i: i + micro]]
            batch = collate(chunk, self.cfg.task, self.cfg.finetune.classifier, self.pad_id)
            out.append(without_targets(batch, filler[i: i + micro]) if any(filler[i: i + micro]) else batch)
        if self.n_replay:
            windows = torch.from_numpy(self.replay.batch(step, self.n_replay, rank, world))
            out.append({"input_ids": windows[:, :-1], "targets": windows[:, 1:], "kind": "replay"})
        return out


def split_folds(n: int, k: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """k (train, validation) index lists with disjoint validation sets covering every record."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    folds = [order[i::k] for i in range(k)]
    return [([j for f in folds[:i] + folds[i + 1:] for j in f], sorted(folds[i])) for i in range(k)]


def subsample(records: list[dict], n: int | None, seed: int) -> list[dict]:
    """The first n records after a seeded shuffle (nested: a smaller n is a prefix of a larger)."""
    if n is None or n >= len(records):
        return records
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in sorted(order[:n])]

