"""Task metrics on generated answers: exact match, keyword accuracy, accuracy/macro-F1, BLEU, ROUGE-L."""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation.replace("$", ""))


def normalize(text: str) -> str:
    """SQuAD-style: lowercase, drop punctuation (keep $), articles and extra spaces."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(pred: str, ref: str) -> float:
    return float(normalize(pred) == normalize(ref))


def keyword_match(pred: str, ref: str) -> float:
    """The normalised reference appears in the prediction as whole words ("$18" does not match "$180")."""
    ref_n, pred_n = normalize(ref), normalize(pred)
    if not ref_n:
        return 0.0
    return float(re.search(r"(?<![\w$])" + re.escape(ref_n) + r"(?![\w])", pred_n) is not None)


def to_label(pred: str, labels: list[str]) -> str | None:
    """Map a generated answer to a label: exact (normalised) match first, then the first label mentioned."""
    p = normalize(pred)
    by_norm = {normalize(lab): lab for lab in labels}
    if p in by_norm:
        return by_norm[p]
    hits = [(p.find(n), lab) for n, lab in by_norm.items() if n and re.search(r"\b" + re.escape(n) + r"\b", p)]
    return min(hits)[1] if hits else None


def classification_scores(preds: list[str], refs: list[str], labels: list[str]) -> dict[str, float]:
    mapped = [to_label(p, labels) for p in preds]
    acc = sum(m == r for m, r in zip(mapped, refs)) / max(1, len(refs))
    f1s = []
    for lab in labels:
        tp = sum(m == lab and r == lab for m, r in zip(mapped, refs))
        fp = sum(m == lab and r != lab for m, r in zip(mapped, refs))
        fn = sum(m != lab and r == lab for m, r in zip(mapped, refs))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "macro_f1": sum(f1s) / max(1, len(f1s)),
            "unparseable": sum(m is None for m in mapped) / max(1, len(refs))}


def generation_scores(preds: list[str], refs: list[str]) -> dict[str, float]:
    import sacrebleu
    from rouge_score import rouge_scorer

    n = max(1, len(refs))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / n
    bleu = sacrebleu.corpus_bleu(preds, [refs]).score if refs else 0.0
    return {
        "exact_match": sum(exact_match(p, r) for p, r in zip(preds, refs)) / n,
        "keyword_accuracy": sum(keyword_match(p, r) for p, r in zip(preds, refs)) / n,
        "bleu": bleu,
        "rouge_l": rouge,
    }
