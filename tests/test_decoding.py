"""Decoding settings in the one generator: greedy by default, sampling and voting, beam search, the structured floor."""

import json
import re

import pytest
from test_extract import SYSTEM, extract, reference_tokens, stopping_early

from redistill.decoding import GREEDY, Decoding, triples_text, vote
from redistill.evaluation import EvalParams
from redistill.params import ParamError, load_block, read_params_file
from redistill.triples import parse_answer

TEXTS = ["Marie Curie was born in Warsaw.", "She won two Nobel Prizes.", "x", "Rome is in Italy.", "Bob met Ann."]


def generator(tiny, max_new_tokens=30, batch_size=8, static=False, **settings):
    from redistill.generation import Generator

    model, tokenizer = tiny
    return Generator(model, tokenizer, SYSTEM, max_new_tokens, batch_size, static=static, decoding=Decoding(**settings))


def texts_of(answers) -> list[str]:
    return [answer.text for answer in answers]


# The defaults


@pytest.mark.parametrize("static", [False, True], ids=["growing", "static"])
def test_the_defaults_are_greedy_decoding_token_for_token(tiny, static):
    model, tokenizer = tiny
    assert Decoding() == GREEDY and GREEDY.rows == 1 and not GREEDY.structured
    chosen = generator(tiny, batch_size=3, static=static)
    chosen.stops = stopping_early(model, tokenizer, TEXTS, chosen.stops)
    expected = reference_tokens(model, tokenizer, TEXTS, SYSTEM, chosen.stops, 30)
    answers = chosen.generate(TEXTS, progress=False)
    assert texts_of(answers) == [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in expected]
    assert [answer.new_tokens for answer in answers] == [len(ids) for ids in expected]


# Sampling and voting


def test_sampling_is_reproducible_by_its_seed_and_differs_across_seeds(tiny):
    first = [
        texts_of(generator(tiny, temperature=1.0, seed=seed).generate(TEXTS, progress=False)) for seed in (0, 0, 1)
    ]
    assert first[0] == first[1] != first[2]
    greedy = texts_of(generator(tiny).generate(TEXTS, progress=False))
    assert greedy not in first
    # a temperature near 0 is greedy again: softmax(logits / T) puts all the mass on the likeliest token
    assert texts_of(generator(tiny, temperature=1e-6).generate(TEXTS, progress=False)) == greedy


def test_voting_keeps_the_triples_in_at_least_min_votes_answers_in_order_of_first_appearance():
    answers = [
        "a|b|c\nd|e|f\nnot a triple",
        'A | b | "c."\nx|y|z\nbroken|line',
        "d|e|f\na|b|c\na|b|c",  # one answer votes once for a triple, however often it says it
    ]
    assert vote(answers, 1) == [("a", "b", "c"), ("d", "e", "f"), ("x", "y", "z")]
    assert vote(answers, 2) == [("a", "b", "c"), ("d", "e", "f")]
    assert vote(answers, 3) == [("a", "b", "c")]
    assert vote(answers, 4) == []
    assert vote(["", "prose only"], 1) == []


def test_self_consistency_samples_each_sentence_and_votes(tiny, monkeypatch):
    import redistill.generation as generation

    votes, voted = [], generation.voted
    monkeypatch.setattr(generation, "voted", lambda samples, least: votes.append(samples) or voted(samples, least))
    settings = {"samples": 4, "temperature": 0.5, "min_votes": 2, "structured": True}
    answers = generator(tiny, max_new_tokens=24, batch_size=8, **settings).generate(TEXTS, progress=False)
    assert len(votes) == len(TEXTS) and all(len(samples) == 4 for samples in votes)
    assert all(len({sample.text for sample in samples}) > 1 for samples in votes)  # each row sampled on its own
    expected = [
        (
            triples_text(vote([sample.text for sample in samples], 2)),
            2 * sum(sample.ended for sample in samples) > 4,  # ended: most samples did
            sum(sample.new_tokens for sample in samples),  # the tokens decoded for the sentence
        )
        for samples in votes
    ]
    assert sorted((answer.text, answer.ended, answer.new_tokens) for answer in answers) == sorted(expected)
    assert any(parse_answer(sample.text).triples for samples in votes for sample in samples)
    assert generator(tiny, max_new_tokens=24, batch_size=8, **settings).generate(TEXTS, progress=False) == answers


# Beam search


def beams_stopping_early(chosen, model, tokenizer) -> list[int]:
    """As test_extract's stopping_early, for beams: a stop token among those of the greedy answers after which some
    sentences' best beams end at it and others at the cap."""
    greedy = reference_tokens(model, tokenizer, TEXTS, SYSTEM, chosen.stops, 30)
    plain = chosen.stops
    for token in dict.fromkeys(token for answer in greedy for token in answer):
        chosen.stops = [*plain, token]
        ends = [answer.ended for answer in chosen.generate(TEXTS, progress=False)]
        if any(ends) and not all(ends):
            return chosen.stops
    raise AssertionError("no token of the greedy answers ends some beams and not others")


@pytest.mark.parametrize("static", [False, True], ids=["growing", "static"])
@pytest.mark.parametrize(
    ("beams", "batch_size", "early_stopping"), [(2, 2, False), (3, 9, False), (4, 40, False), (3, 9, True)]
)
def test_beam_search_gives_transformers_beam_search_answers(
    tiny, beams, batch_size, early_stopping, static, monkeypatch
):
    """transformers' generate(num_beams=k, do_sample=False, early_stopping=..., length_penalty=1.0), one sentence
    at a time, against beams side by side in batches (rows of finished sentences leaving a growing cache)."""
    import torch

    import redistill.generation as generation
    from redistill.prompts import prompt_ids

    monkeypatch.setattr(generation, "EARLY_STOPPING", early_stopping)
    model, tokenizer = tiny
    chosen = generator(tiny, max_new_tokens=20, batch_size=batch_size, static=static, num_beams=beams)
    chosen.stops = beams_stopping_early(chosen, model, tokenizer)
    expected = []
    for text in TEXTS:
        ids = torch.tensor([prompt_ids(tokenizer, text, SYSTEM)])
        search = {"num_beams": beams, "do_sample": False, "early_stopping": early_stopping, "length_penalty": 1.0}
        output = model.generate(
            input_ids=ids, max_new_tokens=20, eos_token_id=chosen.stops, pad_token_id=tokenizer.eos_token_id, **search
        )
        new = output[0, ids.shape[1] :].tolist()
        end = next((index for index, token in enumerate(new) if token in chosen.stops), None)
        expected.append((tokenizer.decode(new[:end], skip_special_tokens=True).strip(), end is not None))
    answers = chosen.generate(TEXTS, progress=False)
    assert [(answer.text, answer.ended) for answer in answers] == expected
    assert any(ended for _, ended in expected) and not all(ended for _, ended in expected)


def test_one_beam_is_greedy(tiny):
    assert generator(tiny, num_beams=1).generate(TEXTS, progress=False) == generator(tiny).generate(TEXTS, False)


# The structured floor


@pytest.fixture(scope="module")
def grammar(tiny):
    from redistill.prompts import stop_token_ids
    from redistill.structured import TripleGrammar

    _, tokenizer = tiny
    return TripleGrammar.build(tokenizer, len(tokenizer), stop_token_ids(tokenizer), "cpu")


def walk(grammar, tokenizer, text: str, remaining: int = 100):
    """Feed ``text``'s tokens to one row: the text of the first token the grammar refuses (None: all allowed), and
    the row's state."""
    import torch

    row = grammar.start(1, remaining)
    for index, token in enumerate(tokenizer.encode(text, add_special_tokens=False)):
        if not row.allowed(remaining - index)[0, token]:
            return tokenizer.decode([token]), row
        row.advance(torch.tensor([token]))
    return None, row


def only_stops(grammar, allowed) -> bool:
    return set(allowed[0].nonzero().flatten().tolist()) == set(grammar.stops)


def test_the_grammar_allows_whole_lines_and_a_stop_only_where_a_line_ends(tiny, grammar):
    _, tokenizer = tiny
    stop = grammar.stops[0]
    refused, row = walk(grammar, tokenizer, "Marie Curie|was born in|Warsaw\nAlice | is from | France.")
    assert refused is None and row.allowed(10)[0, stop]
    assert walk(grammar, tokenizer, "")[1].allowed(10)[0, stop]  # an empty answer: no triples
    for text, first_refused in [
        ("|was|born", "|"),  # an empty head
        ("a||b", "|"),
        ("a|b\n", "\n"),  # a line of two parts
        ("a|b|c|d", "|"),  # a fourth part
        ("a|b| \n", "\n"),  # a tail of spaces only
        ("a|b|c\n\n", "\n"),  # a blank line
    ]:
        refused, _ = walk(grammar, tokenizer, text)
        assert refused is not None and first_refused in refused, text
    _, midline = walk(grammar, tokenizer, "a|b")
    assert not midline.allowed(10)[0, stop]


def test_the_grammar_stops_a_row_that_repeats_a_line_and_ends_rows_before_the_cap(tiny, grammar):
    _, tokenizer = tiny
    refused, row = walk(grammar, tokenizer, "a|b|c\nd|e|f\n")
    assert refused is None and not only_stops(grammar, row.allowed(50))
    refused, row = walk(grammar, tokenizer, 'a|b|c\nd|e|f\n "A"|B |c.\n')  # the first line again, normalised
    assert refused is None and only_stops(grammar, row.allowed(50))
    _, row = walk(grammar, tokenizer, "a|b|c\n")
    assert only_stops(grammar, row.allowed(1))  # one token left: the stop token


@pytest.mark.parametrize("settings", [{}, {"num_beams": 3}, {"samples": 3, "temperature": 1.0}], ids=str)
@pytest.mark.parametrize("static", [False, True], ids=["growing", "static"])
def test_structured_answers_of_a_random_model_are_whole_lines_that_end_at_eos(tiny, settings, static, monkeypatch):
    """Unconstrained, the random model writes junk that never ends (test_extract's answers run to the cap)."""
    from redistill.generation import Generator

    _, tokenizer = tiny
    raw = []
    decode = Generator._decode
    monkeypatch.setattr(Generator, "_decode", lambda self, new: raw.append(new) or decode(self, new))
    answers = generator(tiny, max_new_tokens=40, batch_size=6, static=static, structured=True, **settings)
    answers = answers.generate(TEXTS, progress=False)
    stops = set(generator(tiny).stops)
    for new in raw:
        end = next(index for index, token in enumerate(new) if token in stops)  # every answer said a stop token
        lines = tokenizer.decode(new[:end]).split("\n")
        assert all(len(line.split("|")) == 3 and all(part.strip() for part in line.split("|")) for line in lines)
    assert all(answer.ended and answer.new_tokens < 40 * settings.get("samples", 1) for answer in answers)
    for answer in answers:
        parsed = parse_answer(answer.text)
        assert parsed.malformed == parsed.prose == []
        assert len({tuple(part.casefold() for part in triple) for triple in parsed.triples}) == len(parsed.triples)
    assert any(parse_answer(answer.text).triples for answer in answers)


# Settings


@pytest.mark.usefixtures("project")
@pytest.mark.parametrize(
    ("changes", "line"),
    [
        ({"num_beams": 0}, "params.yaml: evaluate.decoding.num_beams must be positive, got 0"),
        ({"temperature": -0.5}, "params.yaml: evaluate.decoding.temperature must be >= 0, got -0.5"),
        (
            {"samples": 8},
            "params.yaml: evaluate.decoding.samples > 1 needs evaluate.decoding.temperature > 0 (greedy samples are "
            "all one answer)",
        ),
        (
            {"samples": 8, "temperature": 0.7, "min_votes": 9},
            "params.yaml: evaluate.decoding.min_votes must be at most evaluate.decoding.samples (8), got 9",
        ),
        (
            {"samples": 8, "temperature": 0.7, "num_beams": 4},
            "params.yaml: evaluate.decoding.num_beams and evaluate.decoding.samples can't both be above 1: beam "
            "search does not sample",
        ),
        (
            {"num_beams": 4, "temperature": 0.7},
            "params.yaml: evaluate.decoding.num_beams > 1 searches for the likeliest answer: it needs "
            "evaluate.decoding.temperature 0",
        ),
        ({"structured": "yes"}, "params.yaml: evaluate.decoding.structured must be true or false, got 'yes'"),
        ({"beams": 4}, "params.yaml: unknown key evaluate.decoding.beams"),
    ],
)
def test_bad_decoding_settings_are_one_line_naming_the_key(changes, line):
    params = read_params_file()
    params["evaluate"]["decoding"].update(changes)
    with pytest.raises(ParamError) as error:
        load_block(EvalParams, "evaluate", params)
    assert str(error.value).startswith(line) and "\n" not in str(error.value)


@pytest.mark.usefixtures("project")
def test_the_shipped_decoding_is_greedy_and_evaluate_records_it_beside_the_scores(tiny):
    from redistill.evaluation import evaluate
    from redistill.models import LoadedModel

    params = read_params_file()
    assert load_block(EvalParams, "evaluate", params).decoding == GREEDY
    params["evaluate"].update(models=["base"], max_new_tokens=24)
    params["evaluate"]["decoding"]["structured"] = True
    settings = load_block(EvalParams, "evaluate", params)
    test = [{"id": str(index), "text": text, "triples": [["a", "b", "c"]]} for index, text in enumerate(TEXTS)]
    metrics, _ = evaluate(settings, test, lambda name: LoadedModel(*tiny, SYSTEM, 512))
    assert metrics["base"]["decoding"] == GREEDY.settings() | {"structured": True}
    assert metrics["base"]["well_formed_share"] == 1.0 and metrics["base"]["ended_at_eos_share"] == 1.0


def test_extract_takes_the_settings_as_options_and_its_sidecar_records_them(tmp_path, tiny_adapter, capsys):
    source = tmp_path / "in.txt"
    source.write_text("Alice is from France.\nBob lives in Rome.\n")
    out = tmp_path / "out.jsonl"
    options = ("--model", str(tiny_adapter), "--input-format", "lines", "-o", str(out))
    assert extract(str(source), *options, "--structured", "--num-beams", "2") == 0
    run = json.loads((tmp_path / "out.jsonl.run.json").read_text())
    assert run["decoding"] == GREEDY.settings() | {"num_beams": 2, "structured": True}
    assert len(out.read_text().splitlines()) == 2
    capsys.readouterr()
    assert extract(str(source), *options) == 1  # greedy now: another run
    assert "was written by another run (its decoding differ)" in capsys.readouterr().err
    assert extract(str(source), *options, "--structured", "--num-beams", "2") == 0  # the same: continued, all done

    greedy = tmp_path / "greedy.jsonl"  # an output of extract before it recorded decoding: greedy
    assert extract(str(source), "--model", str(tiny_adapter), "--input-format", "lines", "-o", str(greedy)) == 0
    sidecar = tmp_path / "greedy.jsonl.run.json"
    sidecar.write_text(json.dumps({k: v for k, v in json.loads(sidecar.read_text()).items() if k != "decoding"}))
    assert extract(str(source), "--model", str(tiny_adapter), "--input-format", "lines", "-o", str(greedy)) == 0

    capsys.readouterr()
    assert extract(str(source), *options, "--samples", "3") == 1
    error = capsys.readouterr().err.strip()
    assert error == "error: --samples > 1 needs --temperature > 0 (greedy samples are all one answer)"
    assert re.search("--min-votes", error) is None
