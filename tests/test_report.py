"""The error report, data/errors.md, on hand-written prediction rows; and `make sweep`'s grid against the params."""

import re
import shlex
import subprocess

import yaml
from conftest import ROOT

from redistill.evaluation import EvalParams
from redistill.params import load_block
from redistill.report import (
    EXACT,
    LENIENT,
    MALFORMED,
    MISSING,
    SPURIOUS,
    error_report,
    escape,
    quoted,
    sentence_errors,
    worst,
    write_error_report,
)
from redistill.scoring import score
from redistill.train_params import TrainParams

ROWS = [
    {  # one exact match, one lenient-only, one missed, one spurious, one malformed line: F1 1/3
        "id": "mixed",
        "text": "Marie Curie won the Nobel Prize in 1903 and was born in Warsaw.",
        "gold": "Marie Curie|won|Nobel Prize\nMarie Curie|born in|Warsaw\nNobel Prize|awarded in|1903",
        "finetuned": "Marie Curie|won|nobel prize.\nMarie Curie|born in|the Warsaw\nCurie|likes|radium\nCurie|1903",
    },
    {  # perfect: never listed
        "id": "perfect",
        "text": "Paris is in France.",
        "gold": "Paris|located in|France",
        "finetuned": "- Paris | located in | France",
    },
    {  # nothing right, one error
        "id": "zero-one",
        "text": "Bob met Alice.",
        "gold": "Bob|met|Alice",
        "finetuned": "",
    },
    {  # nothing right, three errors: listed before zero-one
        "id": "zero-three",
        "text": "1. A *bold* claim: x|y.",
        "gold": "A|claims|x|y\nA|makes|claim",
        "finetuned": "Here are the triples:\nA|states|claim",
    },
    {  # no gold triple, one predicted
        "id": "no-gold",
        "text": "Nothing happens here.",
        "gold": "",
        "finetuned": "Nothing|happens|here",
    },
    {  # neither gold nor predicted: agreement, never listed
        "id": "both-empty",
        "text": "Silence.",
        "gold": "",
        "finetuned": "",
    },
]


def test_the_worst_sentences_come_first_ties_by_most_errors_and_agreements_are_left_out():
    listed = worst(ROWS, "finetuned")
    assert [s.id for s in listed] == ["zero-three", "no-gold", "zero-one", "mixed"]
    assert [s.f1 for s in listed[:3]] == [0.0, 0.0, 0.0]
    assert [s.id for s in worst(ROWS, "finetuned", limit=2)] == ["zero-three", "no-gold"]


def test_each_sentences_counts_are_the_scorers():
    for row in ROWS:
        sentence = sentence_errors(row, "finetuned")
        exact = score([(row["gold"], row["finetuned"])])["exact"]
        assert (sentence.tp, sentence.fp, sentence.fn) == (exact["tp"], exact["fp"], exact["fn"]), row["id"]
    mixed = sentence_errors(ROWS[0], "finetuned")
    assert (mixed.tp, mixed.fp, mixed.fn) == (1, 3, 2) and abs(mixed.f1 - 2 * 0.25 * (1 / 3) / (0.25 + 1 / 3)) < 1e-9


def test_gold_and_predicted_triples_are_paired_and_marked():
    assert sentence_errors(ROWS[0], "finetuned").rows == [
        (EXACT, "Marie Curie | won | Nobel Prize", "Marie Curie | won | nobel prize."),
        (LENIENT, "Marie Curie | born in | Warsaw", "Marie Curie | born in | the Warsaw"),
        (MISSING, "Nobel Prize | awarded in | 1903", ""),
        (SPURIOUS, "", "Curie | likes | radium"),
        (MALFORMED, "", "Curie|1903"),
    ]
    # Prose counts as malformed, as the scorer counts it; a malformed gold line is ignored, as the scorer ignores it.
    assert sentence_errors(ROWS[3], "finetuned").rows == [
        (MISSING, "A | makes | claim", ""),
        (SPURIOUS, "", "A | states | claim"),
        (MALFORMED, "", "Here are the triples:"),
    ]


def test_a_triple_repeated_in_the_answer_is_listed_once_as_the_scorer_counts_it_once():
    row = {"id": "r", "text": "t", "gold": "a|b|c", "finetuned": "a|b|c\nA|B|C.\nx|y|z\nX|Y|Z"}
    sentence = sentence_errors(row, "finetuned")
    assert sentence.rows == [(EXACT, "a | b | c", "a | b | c"), (SPURIOUS, "", "x | y | z")]
    assert (sentence.tp, sentence.fp, sentence.fn) == (1, 1, 0)


def test_markdown_special_characters_are_escaped_so_tables_hold_three_columns():
    assert escape("a|b *c* _d_ `e` [f](g) <h> \\") == r"a\|b \*c\* \_d\_ \`e\` \[f\](g) \<h\> \\"
    assert escape("two\nlines") == "two lines"
    assert quoted("1. A list?") == r"1\. A list?" and quoted("# Not a heading") == r"\# Not a heading"
    page = error_report(ROWS, "finetuned")
    table_rows = [line for line in page.splitlines() if line.startswith("| ")]
    assert table_rows
    for line in table_rows:  # every unescaped | is a column border: 4 of them
        assert len(re.findall(r"(?<!\\)\|", line)) == 4, line
    assert r"| ✗ missing | Nobel Prize \| awarded in \| 1903 |  |" in page
    assert r"> 1\. A \*bold\* claim: x\|y." in page


def test_the_report_has_a_header_with_the_models_scores_and_one_section_per_listed_sentence():
    page = error_report(ROWS, "finetuned")
    scores = score([(row["gold"], row["finetuned"]) for row in ROWS])
    assert page.startswith("# Where finetuned and the teacher disagree\n")
    assert (
        f"exact F1 {scores['exact']['f1']:.3f}, lenient F1 {scores['lenient']['f1']:.3f}. 3 sentences score "
        "exact F1 0; 4 differ from the teacher's answer at all." in page
    )
    headings = re.findall(r"^## (\d+)\. (\S+): exact F1 (\S+)", page, re.MULTILINE)
    assert headings == [
        ("1", "zero-three", "0.00"),
        ("2", "no-gold", "0.00"),
        ("3", "zero-one", "0.00"),
        ("4", "mixed", "0.29"),
    ]
    no_gold = page.split("## 2. ")[1].split("## 3. ")[0]
    assert (
        "The teacher's answer holds no triple." in no_gold
        and "| + spurious |  | Nothing \\| happens \\| here |" in no_gold
    )
    assert "Paris" not in page and "Silence" not in page


def test_the_report_is_written_whole(tmp_path):
    path = tmp_path / "data" / "errors.md"
    write_error_report(path, ROWS, "finetuned")
    assert path.read_text(encoding="utf-8") == error_report(ROWS, "finetuned")
    assert [p.name for p in path.parent.iterdir()] == ["errors.md"]  # no temp file left beside it


def sweep_settings() -> list[list[str]]:
    """Each experiment `make sweep` queues: its `-S key=value` settings, from the commands make would run."""
    commands = subprocess.run(
        ["make", "-n", "sweep", "VENV=/nonexistent"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    experiments = []
    for line in commands.splitlines():
        if "--queue" in line:
            words = shlex.split(line.split("--queue", 1)[1].split("&&")[0].split(";")[0])
            experiments.append([words[i + 1] for i, word in enumerate(words) if word == "-S"])
    return experiments


def test_every_setting_make_sweep_queues_is_a_valid_param_of_the_demo():
    experiments = sweep_settings()
    assert len(experiments) >= 4 and len({tuple(e) for e in experiments}) == len(experiments)
    for settings in experiments:
        params = yaml.safe_load((ROOT / "demo" / "params.yaml").read_text())
        for setting in settings:
            key, value = setting.split("=", 1)
            *parents, leaf = key.split(".")
            block = params
            for parent in parents:
                block = block[parent]
            assert leaf in block, f"make sweep sets {key}, which demo/params.yaml lacks"
            block[leaf] = yaml.safe_load(value)
        load_block(TrainParams, "train", params)
        load_block(EvalParams, "evaluate", params)
