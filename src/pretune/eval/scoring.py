"""Scoring a model on task examples: the figures fine-tuning logs at each evaluation, reports for
its final model, and `pretune evaluate` and prompting compute, all through `evaluate_task`.

Classification: accuracy and macro-F1 (from a head's logits, or the label word the language model
finds likeliest); preference: DPO's reward accuracy and margin against a reference; instruction and
text2text: loss and perplexity on the responses, plus exact match, chrF (and ROUGE) of generated
answers. Chunks are sorted by length and shared among the ranks of a distributed run.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import torch

from pretune.config import Config
from pretune.data import tasks as T
from pretune.data.tokenizer import Tokenizer
from pretune.eval import metrics as M
from pretune.serve.engine import generate_all
from pretune.train import checkpoint as ck
from pretune.train import dist


def uses_head(cfg: Config) -> bool:
    """Whether classification runs through a head on the last hidden state (else the verbalizer)."""
    return cfg.task == "classification" and cfg.finetune.classifier == "head"


@torch.no_grad()
def evaluate_task(model, examples: list[dict], cfg: Config, tok: Tokenizer, labels, device,
                  generation: bool = False, objective=None, per_example: dict | None = None, rt=None) -> dict:
    """Task figures on examples: loss and the task's metrics (generation metrics when asked).

    `per_example`, when given, is filled with lists: pred and gold, and a score per example for each
    metric that is a mean over examples (accuracy, exact_match, chrf, rouge_l), so a study can pair
    runs example by example. With a distributed runtime `rt`, the ranks share the scoring chunks
    (generation stays on the calling rank) and the figures do not depend on the number of ranks."""
    if not examples:
        return {}
    training = model.training
    model.eval()
    out: dict = {}
    bs = max(1, cfg.train.eval_batch_size // 4)
    # length-sorted chunks waste little compute on padding; results go back in input order
    order = sorted(range(len(examples)), key=lambda j: T.length_of(examples[j]))
    # the precision of training (bf16 autocast on a GPU), so scoring runs at the same speed and rounding
    dtype = rt.autocast_dtype if rt is not None else dist.pick_autocast(cfg.train.precision, device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        scored = _score_chunks(model, [[examples[j] for j in order[i: i + bs]]
                                       for i in range(0, len(examples), bs)], cfg, tok, labels, device, objective, rt)
    if cfg.task == "classification":
        preds = [0] * len(examples)
        for j, p in zip(order, (p for ranked, _ in scored for p in ranked)):
            preds[j] = p
        gold = [e["label"] for e in examples]
        out = {"accuracy": M.accuracy(preds, gold), "macro_f1": M.macro_f1(preds, gold, len(labels))}
        if per_example is not None:
            per_example.update(pred=[labels[p] for p in preds], gold=[labels[g] for g in gold],
                               accuracy=[float(p == g) for p, g in zip(preds, gold)])
        if uses_head(cfg):
            out["loss"] = sum(loss for _, loss in scored) / len(examples)
    elif cfg.task == "preference":
        # per pair, back in input order: the margin against the reference, and the policy's own
        deltas, pol = [0.0] * len(examples), [0.0] * len(examples)
        for j, d, p in zip(order, (d for ds, _ in scored for d in ds), (p for _, ps in scored for p in ps)):
            deltas[j], pol[j] = d, p
        beta = cfg.finetune.dpo_beta
        out = {"loss": sum(-torch.nn.functional.logsigmoid(torch.tensor(beta * d)).item() for d in deltas) / len(deltas),
               "pref_accuracy": sum(p > 0 for p in pol) / len(pol),  # the model itself prefers chosen
               "reward_accuracy": sum(d > 0 for d in deltas) / len(deltas),  # DPO's implicit reward does
               "reward_margin": beta * statistics.fmean(deltas)}
        if per_example is not None:
            per_example.update(policy_margin=pol, pref_accuracy=[float(p > 0) for p in pol],
                               reward_margin=[beta * d for d in deltas])
    else:
        nll, n = sum(x for x, _ in scored), sum(k for _, k in scored)
        out = {"loss": nll / max(n, 1), "ppl": math.exp(min(nll / max(n, 1), 50))}
        subset = examples[: cfg.finetune.eval_examples] if generation else []
        if subset:  # finetune.eval_examples=0: loss and perplexity alone
            outs = generate_all(model, tok, [e["gen_prompt"] for e in subset], cfg.finetune.max_new_tokens,
                                max_batch=min(32, cfg.train.eval_batch_size))
            preds = [tok.decode(ids).strip() for ids in outs]
            gold = [e["reference"].strip() if isinstance(e["reference"], str) else [r.strip() for r in e["reference"]]
                    for e in subset]  # several references per example, or one
            out.update(exact_match=M.exact_match(preds, gold), chrf=M.chrf(preds, gold))
            if cfg.task == "text2text":
                out.update(M.rouge(preds, gold))
            if per_example is not None:
                per_example.update(pred=preds, gold=gold, exact_match=[M.exact_match([p], [g]) for p, g in zip(preds, gold)],
                                   chrf=[M.chrf([p], [g]) for p, g in zip(preds, gold)])
                if cfg.task == "text2text":
                    per_example["rouge_l"] = [M.rouge([p], [g])["rouge_l"] for p, g in zip(preds, gold)]
    model.train(training)  # as the caller had it
    return out


def write_predictions(path: Path, per_example: dict) -> None:
    """predictions.jsonl: one line per evaluated example (pred, gold and its per-example scores)."""
    if not per_example:
        return
    keys = list(per_example)
    rows = [json.dumps({k: per_example[k][i] for k in keys}) for i in range(len(per_example[keys[0]]))]
    ck.atomic_write_bytes(path, ("\n".join(rows) + "\n").encode())


def _score_chunks(model, chunks: list[list[dict]], cfg: Config, tok: Tokenizer, labels, device, objective,
                  rt=None) -> list[tuple]:
    """One result per chunk, in chunk order, the chunks shared among the ranks of `rt`:
    classification (predictions, summed loss), preference (margins, policy margins), otherwise
    (summed NLL, target tokens)."""
    from pretune.train.objectives import lm_loss_sum

    def score(chunk: list[dict]) -> tuple:
        if cfg.task == "classification":
            if not uses_head(cfg):
                return verbalizer_predict(model, chunk, labels, tok, device), 0.0
            b = T.collate(chunk, cfg.task, "head", tok.pad_id)
            logits = model(b["input_ids"].to(device), b["last"].to(device)).float()
            loss = torch.nn.functional.cross_entropy(logits, b["labels"].to(device), reduction="sum")
            return logits.argmax(-1).tolist(), float(loss)
        b = T.collate(chunk, cfg.task, "", tok.pad_id)
        if cfg.task == "preference":
            d, p = objective.margins(model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()})
            return d.tolist(), p.tolist()
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
        return float(lm_loss_sum(model, b)), len(b["select"])

    part = {}
    for c in dist.rank_share(len(chunks), rt):
        result = score(chunks[c if c is not None else 0])
        if c is not None:  # None: a stand-in so every rank joins FSDP's gathers
            part[c] = result
    return dist.gather_chunks(part, rt)


def verbalizer_predict(model, examples: list[dict], labels: list[str], tok: Tokenizer, device) -> list[int]:
    """Pick the label whose words (plus EOS) the language model finds most likely after the prompt.
    Every label fits after it: `T.encode` cuts a prompt to the room the longest label leaves.

    The score is the summed log-probability, not a per-token mean: closed by EOS, each answer is a
    whole continuation, so the sum is the model's probability of that label (lm-eval-harness's `acc`);
    a mean would reward a long label for its easy later tokens."""
    answers = T.label_answers(labels, tok)
    seqs = [e["prompt"] + a for e in examples for a in answers]
    masks = [[0] * len(e["prompt"]) + [1] * len(a) for e in examples for a in answers]
    from pretune.train.objectives import sequence_logprobs
    b = T.lm_batch(seqs, masks, tok.pad_id)
    scores = sequence_logprobs(model, {k: v.to(device) for k, v in b.items() if torch.is_tensor(v)})
    return scores.view(len(examples), len(labels)).argmax(-1).tolist()
