"""Score predicted triples against gold ones, by an exact spec that can be reproduced by hand.

Parse: split the answer into lines; strip whitespace and a leading bullet or number (``- ``, ``* ``, ``• ``,
``1. ``, ``2) ``); skip empty lines. A line is a triple when it splits on ``|`` into exactly 3 parts that are
non-empty after stripping; any other non-empty line is malformed.

Normalise each part. exact: NFKC, casefold, collapse whitespace, then strip surrounding quotes and trailing
``. , ; : ! ?`` (repeatedly, with whitespace, until nothing changes). lenient: exact, then every non-word character
becomes a space, the tokens ``a``, ``an``, ``the`` are dropped, whitespace collapsed.

Per sentence the gold and predicted triples are sets of normalised triples: TP = |P & G|; FP = |P - G| + the number
of malformed predicted lines; FN = |G - P|. Malformed gold lines are ignored. Precision, recall and F1 are micro
averages over all sentences.
"""

import re
import unicodedata
from dataclasses import dataclass

from redistill.sentences import collapse_whitespace
from redistill.triples import Triple, parse_answer

QUOTES = "\"'\u201c\u201d\u2018\u2019\u00ab\u00bb`"
TRAILING_PUNCTUATION = ".,;:!?"
ARTICLES = frozenset({"a", "an", "the"})
MODES = ("exact", "lenient")


def normalize_exact(part: str) -> str:
    text = collapse_whitespace(unicodedata.normalize("NFKC", part).casefold())
    previous = None
    while text != previous:
        previous = text
        text = text.strip().strip(QUOTES).rstrip(TRAILING_PUNCTUATION)
    return text


def normalize_lenient(part: str) -> str:
    words = re.sub(r"\W", " ", normalize_exact(part)).split()
    return " ".join(word for word in words if word not in ARTICLES)


NORMALIZERS = {"exact": normalize_exact, "lenient": normalize_lenient}


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, other: "Counts") -> None:
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn

    def as_dict(self) -> dict:
        precision = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        recall = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"precision": precision, "recall": recall, "f1": f1, "tp": self.tp, "fp": self.fp, "fn": self.fn}


def triple_key(triple: Triple, mode: str = "exact") -> Triple:
    """A triple as ``mode`` scoring compares it: each part normalised."""
    normalize = NORMALIZERS[mode]
    return tuple(normalize(part) for part in triple)


def triple_set(triples: list[Triple], mode: str) -> set[Triple]:
    return {triple_key(triple, mode) for triple in triples}


def distinct(triples: list[Triple]) -> list[Triple]:
    """Each triple once, as exact scoring counts it: the first spelling of each normal form, in order."""
    kept: dict[Triple, Triple] = {}
    for triple in triples:
        kept.setdefault(triple_key(triple), triple)
    return list(kept.values())


def score_pair(gold: str, pred: str, mode: str) -> Counts:
    """TP, FP and FN of one sentence's predicted answer against its gold answer."""
    gold_parsed, pred_parsed = parse_answer(gold), parse_answer(pred)
    gold_set, pred_set = triple_set(gold_parsed.triples, mode), triple_set(pred_parsed.triples, mode)
    malformed = len(pred_parsed.malformed) + len(pred_parsed.prose)
    return Counts(tp=len(pred_set & gold_set), fp=len(pred_set - gold_set) + malformed, fn=len(gold_set - pred_set))


def score(pairs: list[tuple[str, str]]) -> dict:
    """Micro precision, recall, F1 (and TP/FP/FN) of (gold, predicted) answer pairs, exact and lenient."""
    result = {}
    for mode in MODES:
        total = Counts()
        for gold, pred in pairs:
            total.add(score_pair(gold, pred, mode))
        result[mode] = total.as_dict()
    return result
