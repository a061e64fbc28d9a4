"""`redistill extract` and `redistill merge` on a tiny random Llama: inputs, outputs, restarts, bad input."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from redistill.cli import main
from redistill.extraction import read_inputs, sentences_of
from redistill.generation import SYNC_EVERY, Generator, prompt_batches, shared_prefix_length
from redistill.prompts import stop_token_ids
from redistill.sentences import split_sentences

TEXT = (
    "Marie Curie was born in Warsaw. She won two Nobel Prizes.\n"
    "The U.S. Army was founded in 1775\nby the Continental Congress.\n\nAlice is from France.\n"
)
SYSTEM = "Extract the triples."


def extract(*args: str) -> int:
    return main(["extract", *args, "--max-new-tokens", "8", "--device", "cpu"])


def read_output(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# The generator


def reference_tokens(model, tokenizer, texts, system_prompt, stops, max_new_tokens) -> list[list[int]]:
    """transformers' own greedy generate, one sentence at a time (no padding at all): new tokens up to a stop."""
    import torch

    from redistill.prompts import prompt_ids

    answers = []
    for text in texts:
        ids = torch.tensor([prompt_ids(tokenizer, text, system_prompt)])
        output = model.generate(
            input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=stops[0]
        )
        new = output[0, ids.shape[1] :].tolist()
        answers.append(new[: next((index for index, token in enumerate(new) if token in stops), len(new))])
    return answers


@pytest.fixture(scope="module")
def tiny_decoding(tiny_student):
    """The tiny random model, its tokenizer, and sentences of different lengths to answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_student), AutoTokenizer.from_pretrained(tiny_student)
    tokenizer.pad_token = tokenizer.eos_token
    texts = [sentence for _, sentence in split_sentences(TEXT.replace("\n", " "))] + ["x", "Rome is in Italy."]
    return model, tokenizer, texts


def stopping_early(model, tokenizer, texts: list[str], stops: list[int]) -> list[int]:
    """The random model never says end of turn: stop also at a token it says at different steps in different answers
    (or never), so that rows finish at different times and leave the batch."""
    plain = reference_tokens(model, tokenizer, texts, SYSTEM, stops, 30)
    firsts = [{token: answer.index(token) for token in reversed(answer)} for answer in plain]
    stop = next(
        token
        for token in sorted({token for answer in plain for token in answer})
        if len({first.get(token) for first in firsts}) > 2
    )
    return [*stops, stop]


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_generator_gives_transformers_greedy_answers(tiny_decoding, batch_size, static):
    """Both ways of decoding: rows leaving a growing cache (CPU), a fixed batch on a static cache (GPU graphs)."""
    model, tokenizer, texts = tiny_decoding
    generator = Generator(model, tokenizer, SYSTEM, 30, batch_size, static=static)
    generator.stops = stopping_early(model, tokenizer, texts, generator.stops)
    answers = generator.generate(texts, progress=False)
    expected = reference_tokens(model, tokenizer, texts, SYSTEM, generator.stops, 30)
    assert [answer.text for answer in answers] == [
        tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in expected
    ]
    assert [answer.new_tokens for answer in answers] == [len(ids) for ids in expected]
    assert any(answer.ended for answer in answers) and len({answer.new_tokens for answer in answers}) > 2


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_static_and_growing_caches_give_identical_answers(tiny_decoding, batch_size):
    """One decoding loop over two caches: on the CPU, the same answers, ends and lengths from a static batch (filled
    up, finished rows kept) as from a growing one (finished rows dropped), past a sync step (SYNC_EVERY)."""
    model, tokenizer, texts = tiny_decoding
    texts = [*texts, "Paris is in France."]  # 7: at 3 a row, the last static batch is one sentence and two fillers
    stops = stopping_early(model, tokenizer, texts, stop_token_ids(tokenizer))
    answers = []
    for static in (False, True):
        generator = Generator(model, tokenizer, SYSTEM, 30, batch_size, static=static)
        generator.stops = stops
        answers.append(generator.generate(texts, progress=False))
    assert answers[0] == answers[1]
    assert any(answer.ended for answer in answers[0]) and not all(answer.ended for answer in answers[0])
    assert max(answer.new_tokens for answer in answers[0]) > SYNC_EVERY


def test_batches_are_sorted_by_length_and_of_nearly_one_size():
    batches = prompt_batches(list(range(1041, 0, -1)), 512)
    assert [len(batch) for batch in batches] == [347, 347, 347]
    assert batches[0][:2] == [1040, 1039]  # shortest first
    assert [len(batch) for batch in prompt_batches([5] * 10, 4)] == [4, 4, 2]
    assert prompt_batches([], 8) == []


def test_shared_prefix_leaves_every_prompt_a_token_of_its_own():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert shared_prefix_length([[1, 2], [1, 2, 3]]) == 1
    assert shared_prefix_length([[7, 1], [8, 1]]) == 0


# Inputs


def test_text_input_is_cut_into_sentences_with_the_line_each_starts_on():
    sentences = sentences_of("in.txt", TEXT, "text", "text")
    assert [(s.text, s.source) for s in sentences] == [
        ("Marie Curie was born in Warsaw.", "in.txt:1"),
        ("She won two Nobel Prizes.", "in.txt:1"),
        ("The U.S. Army was founded in 1775 by the Continental Congress.", "in.txt:2"),
        ("Alice is from France.", "in.txt:5"),
    ]
    lines = sentences_of("in.txt", "one. Two\n\nthree\n", "lines", "text")
    assert [(s.text, s.source) for s in lines] == [("one. Two", "in.txt:1"), ("three", "in.txt:3")]
    jsonl = sentences_of("in.jsonl", '{"body": "Ann met Bob. Cid met Dan."}\n\n{"body": "Eve."}\n', "jsonl", "body")
    assert [(s.text, s.source) for s in jsonl] == [
        ("Ann met Bob.", "in.jsonl:1"),
        ("Cid met Dan.", "in.jsonl:1"),
        ("Eve.", "in.jsonl:3"),
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the input is empty"),
        (b"\n \n", "the input is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "looks like a binary file"),
        ("caf\u00e9 au lait.".encode("latin-1"), "not UTF-8 (byte 0xe9 at offset 3)"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, content, message):
    source = tmp_path / "in.txt"
    source.write_bytes(content)
    assert extract(str(source), "-o", str(tmp_path / "out.jsonl")) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "\n" not in error
    assert not (tmp_path / "out.jsonl").exists()


def test_jsonl_without_the_field_names_the_line(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "A is B."}\n{"body": "C."}\n')
    with pytest.raises(Exception, match=r"in.jsonl:2: no string field 'text'; choose the text field with --field"):
        read_inputs([str(source)], "auto", "text")


# The command


def test_extract_writes_one_record_per_sentence_in_each_format(tmp_path, tiny_adapter):
    source = tmp_path / "in.txt"
    source.write_text(TEXT)
    assert extract(str(source), "--model", str(tiny_adapter), "-o", str(tmp_path / "out.jsonl")) == 0
    records = read_output(tmp_path / "out.jsonl")
    assert [r["source"] for r in records] == [f"{source}:1", f"{source}:1", f"{source}:2", f"{source}:5"]
    assert set(records[0]) == {"id", "sentence", "source", "triples", "ended"}
    assert all(isinstance(r["triples"], list) and isinstance(r["ended"], bool) for r in records)
    for form, delimiter in (("csv", ","), ("tsv", "\t")):
        out = tmp_path / f"out.{form}"
        assert extract(str(source), "--model", str(tiny_adapter), "-o", str(out)) == 0
        with out.open(newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter=delimiter))
        assert [row["id"] for row in rows] == [r["id"] for r in records]
        assert [json.loads(row["triples"]) for row in rows] == [r["triples"] for r in records]


def test_extract_reads_stdin_and_writes_stdout(tmp_path, tiny_adapter):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "redistill.cli",
            "extract",
            "--model",
            str(tiny_adapter),
            "--input-format",
            "lines",
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
        ],
        input="Alice is from France.\nBob lives in Rome.\n",
        capture_output=True,
        text=True,
        check=True,
    )
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["source"] for r in records] == ["<stdin>:1", "<stdin>:2"]
    assert "extract" in result.stderr  # the progress bar goes to stderr


def test_an_interrupted_extract_continues_where_it_stopped(tmp_path, tiny_adapter):
    source = tmp_path / "in.txt"
    source.write_text("".join(f"Person{index} was born in Rome.\n" for index in range(12)))
    out = tmp_path / "out.jsonl"
    options = ("--model", str(tiny_adapter), "--input-format", "lines", "--batch-size", "2", "-o", str(out))
    assert extract(str(source), *options) == 0
    complete = out.read_text()
    # As a kill would leave it: some whole records and half of the next.
    lines = complete.splitlines(keepends=True)
    out.write_text("".join(lines[:5]) + lines[5][:20])
    assert extract(str(source), *options) == 0
    assert sorted(out.read_text().splitlines()) == sorted(complete.splitlines())
    assert out.read_text().startswith("".join(lines[:5]))
    assert extract(str(source), *options) == 0  # all done: nothing written twice
    assert len(out.read_text().splitlines()) == 12


def test_an_output_from_another_run_is_refused_and_kept(tmp_path, tiny_adapter, capsys):
    source = tmp_path / "in.txt"
    source.write_text("Alice is from France.\n")
    out = tmp_path / "out.jsonl"
    assert extract(str(source), "--model", str(tiny_adapter), "-o", str(out)) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert extract(str(source), "--model", str(tiny_adapter), "-o", str(out), "--system-prompt", "Other.") == 1
    assert "was written by another run (its system_prompt differ)" in capsys.readouterr().err
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text('{"mine": 1}\n')
    assert extract(str(source), "--model", str(tiny_adapter), "-o", str(foreign)) == 1
    assert "is not a redistill extract output" in capsys.readouterr().err
    assert out.read_bytes() == before and foreign.read_text() == '{"mine": 1}\n'


def test_a_sentence_longer_than_the_context_is_skipped_with_a_warning(tmp_path, tiny_adapter, capsys):
    source = tmp_path / "in.txt"
    source.write_text("Alice is from France.\n" + "word " * 600 + "\nBob lives in Rome.\n")
    out = tmp_path / "out.jsonl"
    assert extract(str(source), "--model", str(tiny_adapter), "--input-format", "lines", "-o", str(out)) == 0
    err = capsys.readouterr().err
    assert f"warning: {source}:2: a sentence of" in err and "skipped 1 too long" in err
    assert [r["source"] for r in read_output(out)] == [f"{source}:1", f"{source}:3"]


def test_an_adapter_on_the_wrong_base_is_one_line(tmp_path, tiny_adapter, capsys):
    from tiny_model import build_model

    other = build_model(tmp_path / "wider", hidden_size=64)
    source = tmp_path / "in.txt"
    source.write_text("Alice is from France.\n")
    capsys.readouterr()
    assert extract(str(source), "--model", str(tiny_adapter), "--base", str(other), "-o", str(tmp_path / "o")) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: the adapter {tiny_adapter} does not fit the base model {other}")
    assert "size mismatch" in error and error.endswith("pass the base it was trained on with --base")
    assert not (tmp_path / "o").exists()


def test_extract_without_a_trained_adapter_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.txt").write_text("Alice is from France.\n")
    assert extract("in.txt") == 1
    assert "no adapter at models/adapter: run `make demo`" in capsys.readouterr().err


# Merge


def test_merged_model_answers_as_the_adapter_and_carries_its_prompt(tmp_path, tiny_adapter):
    from transformers import AutoTokenizer

    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_adapter), "-o", str(merged)]) == 0
    source = tmp_path / "in.txt"
    source.write_text(TEXT)
    for model, out in ((tiny_adapter, "adapter.jsonl"), (merged, "merged.jsonl")):
        options = ("--model", str(model), "--system-prompt", "Extract the triples.", "--max-new-tokens", "24")
        assert main(["extract", str(source), *options, "--device", "cpu", "-o", str(tmp_path / out)]) == 0
    assert (tmp_path / "adapter.jsonl").read_text() == (tmp_path / "merged.jsonl").read_text()

    info = json.loads((merged / "redistill.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(merged)
    user = [{"role": "user", "content": "Alice is from France."}]
    with_system = [{"role": "system", "content": info["system_prompt"]}, *user]
    assert tokenizer.apply_chat_template(user, tokenize=False) == tokenizer.apply_chat_template(
        with_system, tokenize=False
    )
    assert not list(tmp_path.glob(".merged.*"))  # written through a temp folder


def test_merge_refuses_a_folder_that_is_not_an_adapter(tmp_path, tiny_student, capsys):
    assert main(["merge", "--model", str(tiny_student), "-o", str(tmp_path / "m")]) == 1
    assert "is not an adapter folder (no adapter_config.json)" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_the_instruction_is_the_one_the_folder_records_wherever_the_command_runs(
    tmp_path, tiny_adapter, monkeypatch, capsys
):
    import shutil

    from redistill.models import load_trained, write_trained_with
    from redistill.prompts import DEFAULT_SYSTEM_PROMPT

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, adapter)
    monkeypatch.chdir(tmp_path)  # a project whose params name another instruction changes nothing
    (tmp_path / "params.yaml").write_text("student: {system_prompt: From params.}\n")
    # an adapter trained before adapters recorded their instruction: the default, and a warning that says so
    assert load_trained(str(adapter), device="cpu").system_prompt == DEFAULT_SYSTEM_PROMPT
    assert "records no system prompt (redistill.json)" in capsys.readouterr().err
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    write_trained_with(adapter, base, "Short one.")
    assert load_trained(str(adapter), device="cpu").system_prompt == "Short one."
    assert "warning" not in capsys.readouterr().err
