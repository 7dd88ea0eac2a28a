"""Task metrics: accuracy and macro-F1; ROUGE-1/2/L (rouge-score); exact match and chrF (sacrebleu)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from pretune.errors import UserError


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    return sum(p == g for p, g in zip(pred, gold)) / max(len(gold), 1)


def macro_f1(pred: Sequence[int], gold: Sequence[int], n_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in gold or predictions."""
    scores = []
    for c in range(n_classes):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / max(len(scores), 1)


def _refs(gold: str | Sequence[str]) -> list[str]:
    """An example's references: one string, or several (any of them counts as right)."""
    return [gold] if isinstance(gold, str) else list(gold)


def exact_match(pred: Sequence[str], gold: Sequence[str | Sequence[str]]) -> float:
    norm = lambda s: " ".join(s.strip().lower().split())  # noqa: E731
    return sum(any(norm(p) == norm(g) for g in _refs(gs)) for p, gs in zip(pred, gold)) / max(len(gold), 1)


def chrf(pred: Sequence[str], gold: Sequence[str | Sequence[str]]) -> float:
    """Corpus chrF (sacrebleu); with several references per example, sacrebleu scores each sentence
    against its best one (an example with fewer repeats its first)."""
    try:
        import sacrebleu
    except ImportError:
        raise UserError("chrF needs sacrebleu: pip install 'pretune[eval]'") from None
    refs = [_refs(g) for g in gold]
    n = max((len(r) for r in refs), default=1)
    streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(n)]
    return sacrebleu.corpus_chrf(list(pred), streams).score


class _Words:
    """rouge-score's tokenizer for text in any script: lowercased words of letters and digits (the
    default keeps a-z0-9 only, so Cyrillic or Greek text has no words and scores 0). ASCII words of
    more than 3 characters are Porter-stemmed, as the default does, so English scores as before."""

    def __init__(self):
        from nltk.stem import porter

        self.stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        words = re.findall(r"[^\W_]+", text.lower())
        return [self.stemmer.stem(w) if w.isascii() and len(w) > 3 else w for w in words]


def rouge(pred: Sequence[str], gold: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure over examples, on lowercased words of any script (see `_Words`)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise UserError("ROUGE needs rouge-score: pip install 'pretune[eval]'") from None
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_Words())
    totals = {"rouge_1": 0.0, "rouge_2": 0.0, "rouge_l": 0.0}
    for p, gs in zip(pred, gold):  # several references: the best score of each kind, as rouge-score's score_multi
        scores = [scorer.score(g, p) for g in _refs(gs)]
        totals["rouge_1"] += max(s["rouge1"].fmeasure for s in scores)
        totals["rouge_2"] += max(s["rouge2"].fmeasure for s in scores)
        totals["rouge_l"] += max(s["rougeL"].fmeasure for s in scores)
    return {k: v / max(len(gold), 1) for k, v in totals.items()}
