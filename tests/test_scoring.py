"""The scorer, rule by rule, on cases computed by hand."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from redistill.scoring import normalize_exact, normalize_lenient, score, score_pair

REDISTILL = Path(sys.executable).parent / "redistill"


def counts(gold, pred, mode="exact"):
    c = score_pair(gold, pred, mode)
    return c.tp, c.fp, c.fn


@pytest.mark.parametrize(
    ("part", "exact", "lenient"),
    [
        ("Alice", "alice", "alice"),
        ("  The   U.S.  Army. ", "the u.s. army", "u s army"),
        ('"The Mad".', "the mad", "mad"),
        ("\u201cQuoted\u201d!?", "quoted", "quoted"),
        ("\uff21\uff22\uff23", "abc", "abc"),  # NFKC: full-width letters
        ("STRASSE", "strasse", "strasse"),
        ("Straße", "strasse", "strasse"),  # casefold, not lower
        ("an apple, a pear; the end:", "an apple, a pear; the end", "apple pear end"),
        ("Hi-Fi", "hi-fi", "hi fi"),
        ("12 to 13 years.", "12 to 13 years", "12 to 13 years"),
        ("...", "", ""),
    ],
)
def test_normalisation(part, exact, lenient):
    assert normalize_exact(part) == exact
    assert normalize_lenient(part) == lenient


def test_identical_answers():
    assert counts("A|r|B\nC|s|D", "A|r|B\nC|s|D") == (2, 0, 0)


def test_bullets_numbers_and_blank_lines_are_ignored():
    assert counts("A|r|B\nC|s|D", "- A|r|B\n\n  2) C|s|D  \n") == (2, 0, 0)
    assert counts("A|r|B", "• A|r|B") == (1, 0, 0)
    assert counts("A|r|B", "* A|r|B") == (1, 0, 0)


def test_malformed_predicted_lines_are_false_positives():
    # "Here are:" and "A|r" and "A|r|B|C" and "A| |B" are malformed: 4 FP; "A|r|B" is a TP.
    assert counts("A|r|B", "Here are:\nA|r|B\nA|r\nA|r|B|C\nA| |B") == (1, 4, 0)


def test_malformed_gold_lines_are_ignored():
    assert counts("Here are the relations:\nA|r|B\nbroken|line", "A|r|B") == (1, 0, 0)


def test_sets_collapse_duplicates_after_normalisation():
    assert counts("A|r|B", 'A|r|B\na | R | b.\n"A"|r|B') == (1, 0, 0)


def test_missing_and_extra_triples():
    assert counts("A|r|B\nC|s|D\nE|t|F", "A|r|B\nX|y|Z") == (1, 1, 2)


def test_exact_vs_lenient():
    gold, pred = "The Beatles|formed in|Liverpool", "Beatles|formed in|the Liverpool."
    assert counts(gold, pred, "exact") == (0, 1, 1)
    assert counts(gold, pred, "lenient") == (1, 0, 0)


def test_empty_prediction_and_empty_gold():
    assert counts("A|r|B", "") == (0, 0, 1)
    assert counts("", "A|r|B") == (0, 1, 0)


def test_micro_average_over_sentences():
    pairs = [("A|r|B\nC|s|D", "A|r|B"), ("E|t|F", "E|t|F\nG|u|H\njunk")]
    # exact: TP 2, FP 0+1+1 = 2, FN 1+0 = 1 -> P 0.5, R 2/3, F1 4/7
    result = score(pairs)["exact"]
    assert (result["tp"], result["fp"], result["fn"]) == (2, 2, 1)
    assert result["precision"] == pytest.approx(0.5)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(4 / 7)


def test_no_triples_anywhere_scores_zero_not_nan():
    assert score([("", "")])["exact"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": 0}


def test_the_command(tmp_path):
    rows = [{"g": "A|r|B\nC|s|D", "p": "A|r|B"}, {"g": "E|t|F", "p": "E|t|F\nG|u|H\njunk"}]
    as_json, as_jsonl = tmp_path / "rows.json", tmp_path / "rows.jsonl"
    as_json.write_text(json.dumps(rows))
    as_jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for path in (as_json, as_jsonl):
        result = subprocess.run(
            [REDISTILL, "score", path, "--gold", "g", "--pred", "p", "--json"], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        printed = json.loads(result.stdout)
        assert set(printed) == {"exact", "lenient"}
        assert set(printed["exact"]) == {"precision", "recall", "f1", "tp", "fp", "fn"}
        assert printed == score([(row["g"], row["p"]) for row in rows])
    table = subprocess.run([REDISTILL, "score", as_json, "--gold", "g", "--pred", "p"], capture_output=True, text=True)
    assert "exact" in table.stdout and "0.5714" in table.stdout
    missing = subprocess.run(
        [REDISTILL, "score", as_json, "--gold", "g", "--pred", "nope"], capture_output=True, text=True
    )
    assert (
        missing.returncode == 1 and missing.stderr.strip() == f"error: {as_json}: record 0 has no string field 'nope'"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (random.Random(0).randbytes(512), "rows.jsonl: not UTF-8 text"),
        (b"", "rows.jsonl: no records to score"),
        (b"\n\n", "rows.jsonl: no records to score"),
    ],
)
def test_the_command_refuses_a_file_it_cannot_score(tmp_path, content, message):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    result = subprocess.run([REDISTILL, "score", path, "--gold", "g", "--pred", "p"], capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: {path.parent}/{message}") and len(result.stderr.splitlines()) == 1
