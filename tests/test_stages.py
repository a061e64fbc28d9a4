"""The stage scripts as a user runs them: `python stages/<name>.py` from the project root."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, dolly, write_jsonl
from fake_provider import FakeProvider

from redistill.io import read_jsonl

CORPUS = [
    dolly("The U.S. Army was founded in 1775 by the Continental Congress. It grew."),
    dolly("Dr. Jane Smith was born in Leeds in 1950 to a family of doctors. She studied."),
    dolly("J. R. R. Tolkien wrote The Hobbit, published in 1937 by Allen & Unwin. It sold."),
    dolly("Python version 3.12 was released in October 2023 by its foundation. It is fast."),
    dolly("The No. 5 bus runs from the station to the harbour every ten minutes. It is red."),
    dolly("Mt. Fuji is the highest mountain in Japan at 3,776 metres tall. It is a volcano."),
    dolly("Marie Curie (b. 1867) won two Nobel Prizes, in physics and in chemistry. She died."),
    dolly("Berries, e.g. the blueberry, grow well in acidic soils of the north. They are sweet."),
]


def run(stage: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / f"{stage}.py")], capture_output=True, text=True, env=env
    )


def outputs(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file() and path.name != "params.yaml"}


def test_sample_synthesize_split_against_a_loopback_groq(project, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    teacher = "openai/gpt-oss-120b"
    project(sample__source="corpus.jsonl", split__test_size=2, split__val_size=1, evaluate_teacher__models=[teacher])
    with FakeProvider(models=(teacher,)) as server:
        env = {"PATH": "/usr/bin:/bin", "GROQ_API_KEY": "test-key", "GROQ_BASE_URL": server.url, "HF_HUB_OFFLINE": "1"}
        for stage in ("sample", "synthesize", "split", "evaluate_teacher"):
            result = run(stage, env)
            assert result.returncode == 0, result.stderr
        assert len(server.requests) == len(CORPUS) + 2  # each sentence labelled, then the 2 test ones compared
        rerun = run("synthesize", env)
        assert rerun.returncode == 0 and len(server.requests) == len(CORPUS) + 2  # all came from the journal

    sentences = read_jsonl("data/sentences.jsonl")
    assert [s["text"] for s in sentences][:3] == [
        "The U.S. Army was founded in 1775 by the Continental Congress.",
        "Dr. Jane Smith was born in Leeds in 1950 to a family of doctors.",
        "J. R. R. Tolkien wrote The Hobbit, published in 1937 by Allen & Unwin.",
    ]
    labeled = read_jsonl("data/labeled.jsonl")
    assert labeled[0]["triples"] == [["The", "is followed by", "Congress"]]
    assert json.loads(Path("metrics/synthesize.json").read_text())["answers"] == 0  # the re-run's
    split = json.loads(Path("metrics/split.json").read_text())
    assert (split["train"], split["val"], split["test"]) == (5, 1, 2)
    compared = json.loads(Path("metrics/eval_teacher.json").read_text())
    assert compared[f"teacher:{teacher}"]["exact"]["f1"] == 1.0  # the labelling teacher agrees with its own labels
    assert [set(row) for row in read_jsonl("data/teacher_predictions.jsonl")] == [
        {"id", "text", "gold", f"teacher:{teacher}"}
    ] * 2
    assert outputs(tmp_path) == {
        "corpus.jsonl",
        "data/sentences.jsonl",
        "data/labeled.jsonl",
        "data/teacher_journal.jsonl",
        "data/train.jsonl",
        "data/val.jsonl",
        "data/test.jsonl",
        "metrics/sample.json",
        "metrics/synthesize.json",
        "metrics/split.json",
        "data/teacher_predictions.jsonl",
        "metrics/eval_teacher.json",
    }


@pytest.mark.parametrize(
    ("stage", "setup", "message"),
    [
        ("sample", {"sample__source": "missing.jsonl"}, "error: missing.jsonl: file not found"),
        ("sample", {"sample__source": "bad.jsonl"}, "error: bad.jsonl:2: not valid JSON"),
        ("sample", {"sample__source": "corpus.jsonl", "sample__field": "nope"}, "record 0 has no 'nope' field"),
        (
            "sample",
            {"sample__source": "corpus.jsonl", "sample__category": "open_qa"},
            "no sentence left after the filters",
        ),
        ("sample", {"sample__source": "corpus.jsonl", "sample__min_chars": 500}, "sample.min_chars must be smaller"),
        ("sample", {"sample__source": "random.jsonl"}, "error: random.jsonl: not UTF-8 text"),
        ("sample", {"sample__source": "random.json"}, "error: random.json: not UTF-8 text"),
        ("sample", {"sample__source": "random.parquet"}, "error: random.parquet: not a Parquet file"),
        ("sample", {"sample__source": "data/corpus"}, "error: data/corpus: file not found"),
        ("sample", {"sample__source": "./corpus"}, "error: corpus: file not found"),
        ("synthesize", {"teacher__provider": "claude"}, "teacher.provider must be one of groq, openai, replay"),
        ("synthesize", {}, "error: GROQ_API_KEY is not set; export GROQ_API_KEY=..."),
        ("split", {"split__test_size": 50}, "split.test_size (50) + split.val_size (0) leave no training data"),
        ("split", {"split__val_size": -1}, "split.val_size as a count must be >= 0"),
        ("evaluate", {"evaluate__models": ["teacher:m"]}, "entries must be base or finetuned (teacher models: evalu"),
        ("evaluate_teacher", {"evaluate_teacher__models": ["m"]}, "error: GROQ_API_KEY is not set"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(project, tmp_path, stage, setup, message):
    write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    (tmp_path / "bad.jsonl").write_text(json.dumps(CORPUS[0]) + "\nnot json\n")
    for suffix in (".jsonl", ".json", ".parquet"):
        (tmp_path / f"random{suffix}").write_bytes(random.Random(0).randbytes(512))
    write_jsonl(tmp_path / "data/sentences.jsonl", [{"id": "a", "text": "Alice is from France."}])
    write_jsonl(
        tmp_path / "data/labeled.jsonl", [{"id": "a", "text": "Alice is from France.", "triples": [["A", "r", "B"]]}]
    )
    before = outputs(tmp_path)
    project(**{"split__val_size": 0, **setup})
    result = run(stage, {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and message in result.stderr
    assert outputs(tmp_path) == before


def test_a_cassette_with_a_torn_last_line_is_refused_even_when_the_journal_answers_all(project, tmp_path):
    sentence = "Alice is from France."
    write_jsonl(tmp_path / "data/sentences.jsonl", [{"id": "a", "text": sentence}])
    cassette = write_jsonl(tmp_path / "cassette.jsonl", [{"text": sentence, "answer": "Alice|is from|France"}])
    project(teacher__provider="replay", teacher__cassette="cassette.jsonl")
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    assert run("synthesize", env).returncode == 0
    cassette.write_text(cassette.read_text() + '{"text": "Bob is from Peru.", "ans')
    before = {path: (tmp_path / path).read_bytes() for path in outputs(tmp_path)}
    result = run("synthesize", env)
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == "error: cassette.jsonl:2: not valid JSON (Unterminated string starting at); fix or remove that line"
    )
    assert {path: (tmp_path / path).read_bytes() for path in outputs(tmp_path)} == before
