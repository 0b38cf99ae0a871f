"""ScanQA / SQA3D answer scoring as LLaVA-3D reports it.

LLaVA-3D (``llava/eval/scanqa_evaluator.py``, after LEO) normalises answers
(lower case, spaces, punctuation, a few typos, numbers 0-20 and 23 as words,
articles dropped) and counts EM@1 (the normalised prediction equals one of
the normalised references) and a refined EM (one contains the other, spaces
ignored). Caption metrics (CIDEr, BLEU-4, METEOR, ROUGE-L) come from
``pycocoevalcap`` when it is installed; METEOR also needs Java. Upstream
tokenises with PTBTokenizer (Java); here the normalised strings are split on
spaces, which gives the same tokens for normalised answers (no punctuation
but ``,'-:`` is left). An empty prediction is scored as the word "empty" (an
empty line can stall METEOR's Java process).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

__all__ = ["clean_answer", "exact_match", "score_answers"]

logger = logging.getLogger(__name__)

_NUMBERS = {
    "0": "zero",
    "none": "zero",
    "1": "one",
    "2": "two",
    "3": "three",
    "4": "four",
    "5": "five",
    "6": "six",
    "7": "seven",
    "8": "eight",
    "9": "nine",
    "10": "ten",
    "11": "eleven",
    "12": "twelve",
    "13": "thirteen",
    "14": "fourteen",
    "15": "fifteen",
    "16": "sixteen",
    "17": "seventeen",
    "18": "eighteen",
    "19": "nineteen",
    "20": "twenty",
    "23": "twenty-three",
}
_TYPOS = {
    "letf": "left",
    "let": "left",
    "tehre": "there",
    "rigth": "right",
    "rght": "right",
    "behine": "behind",
    "tv": "TV",
    "chai": "chair",
    "wasing": "washing",
    "waslked": "walked",
    "oclock": "o'clock",
}


def clean_answer(text: str) -> str:
    """Normalise an answer the way LLaVA-3D's ScanQA evaluator does."""
    s = text.lower().strip(" ")
    s = re.sub(r" {2,}", " ", s)
    s = re.sub(r"\.[ ]{2,}", ". ", s)
    s = re.sub(r"[^a-zA-Z0-9,'\s\-:]+", "", s)
    for wrong, right in _TYPOS.items():
        s = re.sub(rf"\b{wrong}\b", right, s)
    s = re.sub(r"\bo'[ ]+clock\b", "o'clock", s)
    for num, word in _NUMBERS.items():
        s = re.sub(rf"\b{num}\b", word, s)
    s = re.sub(r"\b([a-zA-Z]+)([0-9])\b", r"\g<1>", s)  # "mat2" -> "mat"
    for article in ("a", "an", "the"):
        s = re.sub(rf"\b{article}\b ([a-zA-Z]+)", r"\g<1>", s)
    return re.sub(r"\bbackwards\b", "backward", s)


def exact_match(prediction: str, references: Sequence[str]) -> tuple[int, int]:
    """``(EM, refined EM)`` of one cleaned prediction against cleaned references."""
    if prediction in references:
        return 1, 1
    p = "".join(prediction.split())
    for ref in references:
        r = "".join(ref.split())
        if p in r or r in p:
            return 0, 1
    return 0, 0


def score_answers(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """EM@1, refined EM@1 and (with ``pycocoevalcap``) CIDEr / BLEU-4 / METEOR / ROUGE-L.

    Returns fractions in [0, 1] (caption metrics as pycocoevalcap gives them);
    a metric that cannot be computed here is ``None``.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    out: dict[str, float | None] = {
        "em1": None,
        "em1_refined": None,
        "cider": None,
        "bleu4": None,
        "meteor": None,
        "rouge_l": None,
    }
    if not predictions:
        return out
    preds = [clean_answer(p) for p in predictions]
    refs = [[clean_answer(r) for r in rs] for rs in references]
    scored = [exact_match(p, r) for p, r in zip(preds, refs) if r]
    if scored:
        out["em1"] = sum(s[0] for s in scored) / len(scored)
        out["em1_refined"] = sum(s[1] for s in scored) / len(scored)
    out.update(_caption_metrics(preds, refs))
    return out


def _caption_metrics(preds: list[str], refs: list[list[str]]) -> dict:
    try:  # optional dependency
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        return {}
    res = {i: [p if p else "empty"] for i, (p, r) in enumerate(zip(preds, refs)) if r}
    gts = {i: [x.replace("\n", " ").strip() for x in refs[i]] for i in res}
    if not res:
        return {}
    out: dict[str, float | None] = {}
    for key, make, pick in (
        ("bleu4", lambda: Bleu(4), lambda s: s[3]),
        ("cider", Cider, lambda s: s),
        ("rouge_l", Rouge, lambda s: s),
        ("meteor", Meteor, lambda s: s),  # needs Java
    ):
        try:
            score, _ = make().compute_score(gts, res)
            out[key] = float(pick(score))
        except Exception as e:  # noqa: BLE001 - a missing Java runtime and the like
            logger.warning("%s not computed: %s", key, e)
    return out
