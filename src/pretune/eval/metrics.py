"""Task metrics: accuracy and macro-F1; ROUGE-1/2/L (rouge-score); exact match and chrF (sacrebleu)."""

from __future__ import annotations

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


def exact_match(pred: Sequence[str], gold: Sequence[str]) -> float:
    norm = lambda s: " ".join(s.strip().lower().split())  # noqa: E731
    return sum(norm(p) == norm(g) for p, g in zip(pred, gold)) / max(len(gold), 1)


def chrf(pred: Sequence[str], gold: Sequence[str]) -> float:
    try:
        import sacrebleu
    except ImportError:
        raise UserError("chrF needs sacrebleu: pip install 'pretune[eval]'") from None
    return sacrebleu.corpus_chrf(list(pred), [list(gold)]).score


def rouge(pred: Sequence[str], gold: Sequence[str]) -> dict[str, float]:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise UserError("ROUGE needs rouge-score: pip install 'pretune[eval]'") from None
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge_1": 0.0, "rouge_2": 0.0, "rouge_l": 0.0}
    for p, g in zip(pred, gold):
        s = scorer.score(g, p)
        totals["rouge_1"] += s["rouge1"].fmeasure
        totals["rouge_2"] += s["rouge2"].fmeasure
        totals["rouge_l"] += s["rougeL"].fmeasure
    return {k: v / max(len(gold), 1) for k, v in totals.items()}
