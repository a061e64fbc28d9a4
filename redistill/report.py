"""The error report, data/errors.md: the test sentences where a student and the teacher disagree most.

Each sentence is scored as the scorer does (`scoring.score_pair`); the report lists the ``LIMIT`` sentences with the
lowest exact F1 (ties: most missed + spurious triples first), each with the gold and predicted triples side by side.
A row pairs a gold triple with the predicted one that matches it exactly (✓) or only leniently (≈, which exact
scoring counts as one missed and one spurious triple); gold triples no prediction matches are missing (✗), predicted
ones no gold triple matches are spurious (+), and predicted lines that are not triples are malformed (!, spurious
too). Triples are listed once per exact normal form, as the scorer's sets count them.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from redistill.io import atomic_path
from redistill.scoring import distinct, score, score_pair, triple_key
from redistill.triples import Triple, parse_answer

LIMIT = 20  # sentences listed; the header counts all of them
EXACT, LENIENT, MISSING, SPURIOUS, MALFORMED = "✓ exact", "≈ lenient", "✗ missing", "+ spurious", "! malformed"
_MARKDOWN = "\\`*_[]<>|"  # backslash-escaped wherever model or teacher text lands in the page
_LIST_NUMBER = re.compile(r"^(\d+)([.)])")  # "1. " would open a list at the start of a line


@dataclass
class SentenceErrors:
    id: str
    text: str
    f1: float  # exact; 1.0 for a sentence with neither gold nor predicted triples
    tp: int
    fp: int
    fn: int
    rows: list[tuple[str, str, str]]  # (mark, gold cell, predicted cell), unescaped
    gold_count: int


def escape(text: str) -> str:
    """``text`` as literal Markdown inline text, safe in a table cell: one line, special characters escaped."""
    flat = " ".join(text.split())
    return "".join(f"\\{char}" if char in _MARKDOWN else char for char in flat)


def quoted(text: str) -> str:
    """``text`` escaped, and escaped too where its start would open a heading, a list or a quote."""
    line = _LIST_NUMBER.sub(r"\1\\\2", escape(text))
    return f"\\{line}" if line.startswith(("#", "-", "+", "=")) else line


def _shown(triple: Triple) -> str:
    return " | ".join(triple)


def sentence_errors(row: dict, model: str) -> SentenceErrors:
    """One prediction row's gold and predicted triples, paired and marked, with its exact counts."""
    gold_answer, predicted_answer = row["gold"], row[model]
    counts = score_pair(gold_answer, predicted_answer, "exact")
    predicted = parse_answer(predicted_answer)
    golds, preds = distinct(parse_answer(gold_answer).triples), distinct(predicted.triples)
    rows, unmatched = [], list(preds)
    for gold in golds:
        match = next((p for p in unmatched if triple_key(p) == triple_key(gold)), None)
        mark = EXACT
        if match is None:
            match = next((p for p in unmatched if triple_key(p, "lenient") == triple_key(gold, "lenient")), None)
            mark = LENIENT
        if match is None:
            rows.append((MISSING, _shown(gold), ""))
        else:
            unmatched.remove(match)
            rows.append((mark, _shown(gold), _shown(match)))
    rows += [(SPURIOUS, "", _shown(p)) for p in unmatched]
    rows += [(MALFORMED, "", line) for line in predicted.malformed + predicted.prose]
    errors = counts.fp + counts.fn
    f1 = counts.as_dict()["f1"] if counts.tp or errors else 1.0
    return SentenceErrors(row["id"], row["text"], f1, counts.tp, counts.fp, counts.fn, rows, len(golds))


def worst(rows: list[dict], model: str, limit: int | None = LIMIT) -> list[SentenceErrors]:
    """The sentences where ``model`` disagrees with the gold answer, lowest exact F1 first (ties: most errors)."""
    disagreeing = [s for s in (sentence_errors(row, model) for row in rows) if s.fp or s.fn]
    disagreeing.sort(key=lambda s: (s.f1, -(s.fp + s.fn), s.id))
    return disagreeing[:limit]


def error_report(rows: list[dict], model: str, limit: int | None = LIMIT) -> str:
    """data/errors.md: a header with ``model``'s scores, then its worst sentences, gold and predicted side by side."""
    scores = score([(row["gold"], row[model]) for row in rows])
    every = [sentence_errors(row, model) for row in rows]
    listed = worst(rows, model, limit)
    disagreeing = sum(1 for s in every if s.fp or s.fn)
    lines = [
        f"# Where {escape(model)} and the teacher disagree",
        "",
        f"**{escape(model)}** on the test split ({len(rows)} sentences): exact F1 {scores['exact']['f1']:.3f}, "
        f"lenient F1 {scores['lenient']['f1']:.3f}. {sum(1 for s in every if s.f1 == 0)} sentences score exact "
        f"F1 0; {disagreeing} differ from the teacher's answer at all.",
        "",
        f"Below: the {len(listed)} with the lowest exact F1 (ties: most missed + spurious triples first). "
        f"{EXACT}: the same triple after exact normalisation; {LENIENT}: the same only after lenient normalisation "
        f"(exact scoring counts a miss and a spurious triple); {MISSING}: a gold triple the model did not give; "
        f"{SPURIOUS}: a predicted triple not in gold; {MALFORMED}: a predicted line that is not a triple (spurious "
        "too). The scorer's rules: docs/pipeline.md, Scoring.",
    ]
    for rank, sentence in enumerate(listed, 1):
        lines += [
            "",
            f"## {rank}. {escape(sentence.id)}: exact F1 {sentence.f1:.2f} "
            f"(TP {sentence.tp}, FP {sentence.fp}, FN {sentence.fn})",
            "",
            f"> {quoted(sentence.text)}",
            "",
        ]
        if not sentence.gold_count:
            lines += ["The teacher's answer holds no triple.", ""]
        lines += [f"| | gold (teacher) | predicted ({escape(model)}) |", "|---|---|---|"]
        lines += [f"| {mark} | {escape(gold)} | {escape(pred)} |" for mark, gold, pred in sentence.rows]
    return "\n".join(lines) + "\n"


def write_error_report(path: str | Path, rows: list[dict], model: str) -> None:
    with atomic_path(path) as temp:
        temp.write_text(error_report(rows, model), encoding="utf-8")
