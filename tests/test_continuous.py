"""Extraction speed: the shared prefix is prefilled once, and continuous batching gives batch-by-batch answers."""

import pytest
from test_decoding import TEXTS
from test_extract import SYSTEM, stopping_early

from redistill.decoding import Decoding
from redistill.generation import Generator
from redistill.prompts import DEFAULT_SYSTEM_PROMPT

# Sentences of many lengths, more than a batch holds: rows finish at different steps and take the next ones.
SENTENCES = [
    *TEXTS,
    "The U.S. Army was founded in 1775 by the Continental Congress.",
    "y z",
    "Alice is from France.",
] * 3


def forwarded_tokens(model) -> tuple[list[tuple[int, int]], object]:
    """The (rows, tokens) of every forward pass of ``model`` from now on, and the hook's handle."""
    shapes = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    return shapes, handle


def both_ways(
    model,
    tokenizer,
    texts,
    batch_size,
    max_new_tokens=30,
    system=SYSTEM,
    stops=None,
    **settings,
):
    """The answers batch by batch on the static cache, and continuously batched."""
    runs = []
    for continuous in (False, True):
        generator = Generator(
            model,
            tokenizer,
            system,
            max_new_tokens,
            batch_size,
            static=True,
            decoding=Decoding(**settings),
            continuous=continuous,
        )
        generator.stops = stops or generator.stops
        runs.append(generator.generate(texts, progress=False))
    return runs


@pytest.mark.parametrize("continuous", [False, True], ids=["batches", "continuous"])
@pytest.mark.parametrize("static", [False, True], ids=["growing", "static"])
def test_the_shared_prefix_is_prefilled_once_per_generator_and_each_row_only_its_own_tokens(tiny, static, continuous):
    model, tokenizer = tiny
    generator = Generator(model, tokenizer, SYSTEM, 4, 3, static=static, continuous=continuous)
    prompts = [generator.prompt_ids(text) for text in TEXTS]
    shapes, handle = forwarded_tokens(model)
    try:
        generator.generate(TEXTS, progress=False)
        generator.generate(TEXTS, progress=False)
    finally:
        handle.remove()
    first, *rest = shapes
    assert first == (1, len(generator._prefix)) and len(generator._prefix) > len(tokenizer(SYSTEM)["input_ids"])
    longest_suffix = max(len(prompt) for prompt in prompts) - len(generator._prefix)
    assert all(tokens <= longest_suffix for _, tokens in rest)  # no later forward holds the prefix again


def test_continuous_batching_gives_the_batch_by_batch_greedy_answers_as_rows_finish_and_refill(tiny):
    model, tokenizer = tiny
    stops = stopping_early(model, tokenizer, SENTENCES, Generator(model, tokenizer, SYSTEM, 30, 1).stops)
    batches, continuous = both_ways(model, tokenizer, SENTENCES, 4, stops=stops)
    assert len({answer.new_tokens for answer in batches}) > 2  # answers of mixed lengths
    assert continuous == batches


def test_continuous_batching_goes_round_the_cache_many_times_and_admits_rows_in_chunks(tiny, monkeypatch):
    import redistill.generation as generation

    monkeypatch.setattr(generation, "ADMIT_ROWS", 2)
    model, tokenizer = tiny
    texts = SENTENCES * 3
    stops = stopping_early(model, tokenizer, texts, Generator(model, tokenizer, SYSTEM, 12, 1).stops)
    batches, continuous = both_ways(model, tokenizer, texts, 5, max_new_tokens=12, stops=stops)
    assert continuous == batches


@pytest.mark.parametrize(
    "settings",
    [{"structured": True}, {"samples": 3, "temperature": 1e-6, "min_votes": 2, "structured": True}],
    ids=["structured", "samples"],
)
def test_continuous_batching_keeps_structured_decoding_and_the_samples_vote(tiny, settings):
    """Near zero temperature every sample is the greedy answer, whichever row and step draws it."""
    model, tokenizer = tiny
    batches, continuous = both_ways(model, tokenizer, SENTENCES, 6, **settings)
    assert continuous == batches
    assert all(answer.ended for answer in continuous)  # the grammar ended them, row by row, before the cap


def test_sampled_continuous_answers_are_reproducible_by_their_seed(tiny):
    model, tokenizer = tiny

    def answers(seed: int) -> list:
        decoding = Decoding(samples=2, temperature=1.0, seed=seed, structured=True)  # triples, and varied lengths
        generator = Generator(model, tokenizer, SYSTEM, 20, 4, static=True, decoding=decoding, continuous=True)
        return generator.generate(SENTENCES, progress=False)

    assert answers(0) == answers(0) != answers(1)


def test_beam_search_and_the_growing_cache_decode_batch_by_batch(tiny):
    model, tokenizer = tiny
    beams = Generator(model, tokenizer, SYSTEM, 8, 4, static=True, decoding=Decoding(num_beams=2), continuous=True)
    growing = Generator(model, tokenizer, SYSTEM, 8, 4, static=False, continuous=True)
    assert not beams.continuous and not growing.continuous


@pytest.mark.slow
def test_continuous_batching_gives_smollm2s_greedy_answers(tmp_path):
    """A real model, whose answers end at its own end-of-turn token after different lengths."""
    from test_import import SMOLLM2

    from redistill.models import load_student
    from redistill.student import StudentParams, import_gguf

    import_gguf(SMOLLM2, tmp_path / "base")
    student = StudentParams(
        model=str(tmp_path / "base"), system_prompt=None, chat_template_fallback=None, attn_implementation="sdpa"
    )
    loaded = load_student(student, DEFAULT_SYSTEM_PROMPT, "cpu")
    texts = [
        "Marie Curie was born in Warsaw.",
        "The Eiffel Tower is in Paris and was built by Gustave Eiffel.",
        "Bob met Ann.",
        "Rome is the capital of Italy.",
        "Apple was founded by Steve Jobs, Steve Wozniak and Ronald Wayne in 1976 in Los Altos, California.",
        "The Nile flows into the Mediterranean Sea.",
        "Tolkien wrote The Hobbit.",
        "Mount Everest is in Nepal.",
    ]
    batches, continuous = both_ways(
        loaded.model, loaded.tokenizer, texts, 3, max_new_tokens=40, system=DEFAULT_SYSTEM_PROMPT
    )
    assert len({answer.new_tokens for answer in batches}) > 2 and any(answer.ended for answer in batches)
    assert continuous == batches
