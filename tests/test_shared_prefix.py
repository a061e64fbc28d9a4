"""Cascade attention in the decoding step: the shared prefix read once for all rows gives SDPA's attention and the
same answers."""

import types

import pytest
import torch
from test_continuous import SENTENCES
from test_extract import SYSTEM, stopping_early
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from redistill import prefix_attention
from redistill.decoding import Decoding
from redistill.generation import Generator
from redistill.prefix_attention import shared_prefix_attention

ROWS, HEADS, KV_HEADS, COLUMNS, PREFIX, DIM = 6, 8, 2, 24, 9, 16
ATTENTION = types.SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, is_causal=True)  # what SDPA reads


def step_inputs(dtype: torch.dtype, query_length: int = 1) -> tuple[torch.Tensor, ...]:
    """A decoding step's query, keys, values and 4D mask: every row holds row 0's prefix in its first columns, its
    own columns partly blocked, and row 1's own columns all blocked (it sees the prefix only)."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(ROWS, HEADS, query_length, DIM, generator=generator)
    key, value = (torch.randn(ROWS, KV_HEADS, COLUMNS, DIM, generator=generator) for _ in range(2))
    key[:, :, :PREFIX], value[:, :, :PREFIX] = key[0, :, :PREFIX], value[0, :, :PREFIX]
    blocked = torch.rand(ROWS, 1, query_length, COLUMNS, generator=generator) < 0.5
    blocked[:, ..., :PREFIX] = False
    blocked[1, ..., PREFIX:] = True
    mask = torch.zeros(blocked.shape).masked_fill(blocked, torch.finfo(dtype).min)
    return tuple(tensor.to(dtype) for tensor in (query, key, value, mask))


def sdpa(query, key, value, mask) -> torch.Tensor:
    return sdpa_attention_forward(ATTENTION, query, key, value, mask, scaling=DIM**-0.5)[0]


def cascade(query, key, value, mask, shared_prefix: int = PREFIX) -> torch.Tensor:
    return shared_prefix_attention(ATTENTION, query, key, value, mask, scaling=DIM**-0.5, shared_prefix=shared_prefix)[
        0
    ]


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_the_prefix_read_once_gives_sdpas_attention(dtype, tolerance):
    inputs = step_inputs(dtype)
    exact = sdpa(*(tensor.float() for tensor in inputs))  # the bf16 inputs' attention, computed in float32
    assert cascade(*inputs).dtype == dtype
    assert (cascade(*inputs).float() - exact).abs().max() < tolerance
    # what the comparison would catch: a prefix one column too long (row 0's own first column for every row), or
    # the mask left out
    assert (cascade(*inputs, shared_prefix=PREFIX + 1).float() - exact).abs().max() > 0.1
    assert (cascade(*inputs[:3], None).float() - exact).abs().max() > 0.1
    assert (sdpa(*inputs).float() - exact).abs().max() < tolerance  # SDPA's own rounding is within it too


def test_a_prefill_or_no_prefix_runs_sdpa_as_it_is():
    prefill = step_inputs(torch.float32, query_length=3)
    assert torch.equal(cascade(*prefill), sdpa(*prefill))
    step = step_inputs(torch.float32)
    assert torch.equal(cascade(*step, shared_prefix=0), sdpa(*step))


@pytest.fixture
def cascade_calls(monkeypatch) -> list[tuple[int, int]]:
    """The (query length, prefix length) of every call to the cascade attention from now on."""
    calls = []

    def spy(module, query, *args, shared_prefix: int = 0, **kwargs):
        calls.append((query.shape[2], shared_prefix))
        return shared_prefix_attention(module, query, *args, shared_prefix=shared_prefix, **kwargs)

    monkeypatch.setattr(prefix_attention, "shared_prefix_attention", spy)
    return calls


@pytest.fixture(scope="module")
def stops(tiny) -> list[int]:
    """Stop tokens that end the greedy answers at different steps (test_continuous checks), so rows refill."""
    model, tokenizer = tiny
    return stopping_early(model, tokenizer, SENTENCES, Generator(model, tokenizer, SYSTEM, 30, 1).stops)


def answers(model, tokenizer, texts, shared: bool, continuous: bool, stops=None, **settings) -> tuple[list, Generator]:
    generator = Generator(
        model,
        tokenizer,
        SYSTEM,
        30,
        5,
        static=True,
        decoding=Decoding(**settings),
        continuous=continuous,
        shared_prefix_attention=shared,
    )
    generator.stops = stops or generator.stops
    return generator.generate(texts, progress=False), generator


@pytest.mark.parametrize("continuous", [False, True], ids=["batches", "continuous"])
@pytest.mark.parametrize(
    "settings",
    [{}, {"structured": True}, {"samples": 2, "temperature": 1.0, "seed": 3}],
    ids=["greedy", "structured", "sampled"],
)
def test_the_answers_are_the_same_with_the_prefix_read_once(tiny, stops, cascade_calls, continuous, settings):
    model, tokenizer = tiny
    stops = None if settings.get("structured") else stops  # the grammar ends the answers itself
    before, _ = answers(model, tokenizer, SENTENCES, False, continuous, stops, **settings)
    assert not cascade_calls
    after, generator = answers(model, tokenizer, SENTENCES, True, continuous, stops, **settings)
    assert after == before
    assert {query_length for query_length, _ in cascade_calls} == {1}  # the decoding steps, not the prefills
    assert cascade_calls[-1][1] == len(generator._prefix)
    assert model.config._attn_implementation == "sdpa"  # the model's own attention is back


def test_beam_search_reorders_rows_under_the_prefix_read_once(tiny, cascade_calls):
    model, tokenizer = tiny
    before, _ = answers(model, tokenizer, SENTENCES, False, False, num_beams=3)
    after, _ = answers(model, tokenizer, SENTENCES, True, False, num_beams=3)
    assert after == before and cascade_calls


def test_a_new_prefix_gets_a_step_of_its_own(tiny, cascade_calls):
    """Prompts that share more than the system turn make a longer prefix; a later call's shorter one must not
    replay a step that reads the longer one once for all rows."""
    model, tokenizer = tiny
    first, second = ["The cat sat.", "The dog ran."], ["Alice is from France.", "Bob met Ann."]
    generators = [
        Generator(model, tokenizer, SYSTEM, 8, 2, static=True, shared_prefix_attention=shared)
        for shared in (False, True)
    ]
    runs = [[generator.generate(texts, progress=False) for texts in (first, second)] for generator in generators]
    assert runs[1] == runs[0]
    lengths = [prefix for _, prefix in cascade_calls]
    assert lengths[0] > lengths[-1] == len(generators[1]._prefix)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_flexattentions_own_part_is_the_plain_one(monkeypatch, dtype, tolerance):
    """On a GPU the rows' own columns go through FlexAttention's compiled kernel; its conventions (grouped heads,
    the mask in the score function, the natural log-sum-exp) are checked here through FlexAttention's own unfused
    implementation (the compiled one is for GPUs: on a CPU it returns no log-sum-exp)."""
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(prefix_attention, "compiled_flex_attention", lambda: flex_attention)
    query, key, value, mask = step_inputs(dtype)
    own = (query, key[:, :, PREFIX:], value[:, :, PREFIX:], DIM**-0.5, mask[:, 0, 0, PREFIX:])
    (flex_output, flex_lse), (output, lse) = prefix_attention.flex_own_part(*own), prefix_attention.plain_own_part(*own)
    assert flex_output.shape == output.shape == (ROWS, HEADS, 1, DIM) and flex_lse.shape == lse.shape
    seen = lse > torch.finfo(dtype).min / 2  # row 1 sees none of its own columns: its weight in the merge is 0
    assert (flex_output - output)[seen].abs().max() < tolerance
    assert (flex_lse - lse)[seen].abs().max() < tolerance
    assert (flex_lse[~seen] < torch.finfo(dtype).min / 2).all()
