"""Live-column attention: the decoding step's kernel reads the prefix of the first row and each row's own columns
round the ring, nothing else, and gives SDPA's answer over the masked row; the generator answers as before with it.
The kernel runs on a GPU, or under Triton's interpreter where Triton is installed."""

import pytest
import torch
from test_continuous import SENTENCES
from test_extract import SYSTEM, stopping_early
from triton_kernels import needs_triton, run_under_interpreter, runs_here

from redistill import live_attention
from redistill.decoding import Decoding
from redistill.generation import Generator
from redistill.live_attention import decode_attention
from redistill.prompts import DEFAULT_SYSTEM_PROMPT

pytestmark = needs_triton


def reference(query, key, value, mask, scaling):
    """SDPA over every column of every row, the mask added: what the kernel must give."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    output = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return output.transpose(1, 2)


def test_the_kernel_reads_the_first_rows_prefix_and_each_rows_own_columns_round_the_ring(kernel_device):
    rows, heads, kv_heads, dim, columns, prefix = 5, 8, 2, 32, 40, 7
    # a GPU runs the kernel as extraction does, in bfloat16: the reference takes the same rounded inputs
    dtype, tolerance = (torch.bfloat16, 2e-2) if kernel_device == "cuda" else (torch.float32, 1e-5)
    generator = torch.Generator().manual_seed(0)
    query, key, value = (
        torch.randn(shape, generator=generator).to(dtype).float()
        for shape in ((rows, heads, 1, dim), (rows, kv_heads, columns, dim), (rows, kv_heads, columns, dim))
    )
    key[:, :, :prefix], value[:, :, :prefix] = key[:1, :, :prefix], value[:1, :, :prefix]  # one shared prefix
    end = 12  # the column after the step's write: the rows below go round the ring (columns 7..39)
    starts = torch.tensor([7, 30, 12, 35, 11])  # own columns: 7..11, 30..39 + 7..11, all 33, 35..39 + 7..11, 11
    blocked = torch.finfo(torch.float32).min
    mask = torch.full((rows, columns), blocked)
    mask[:, :prefix] = 0
    read = torch.zeros((rows, columns), dtype=torch.bool)  # what the kernel may read: all else is NaN below
    read[0, :prefix] = True  # the prefix, of the first row only
    ring = columns - prefix
    for row, start in enumerate(starts.tolist()):
        own = [prefix + (start - prefix + step) % ring for step in range((end - start - 1) % ring + 1)]
        mask[row, own] = 0
        mask[row, own[1:2]] = blocked  # padding before the sentence: read, masked
        read[row, own] = True
    expected = reference(query, key, value, mask[:, None, None], dim**-0.5)
    poisoned_key, poisoned_value = key.clone(), value.clone()
    unread = ~read[:, None, :, None].expand_as(key)
    poisoned_key[unread], poisoned_value[unread] = float("nan"), float("nan")

    on = {"device": kernel_device, "dtype": dtype}
    result = decode_attention(
        query.to(**on),
        poisoned_key.to(**on),
        poisoned_value.to(**on).transpose(1, 2).contiguous().transpose(1, 2),  # other strides than the keys'
        mask[:, None, None].to(**on),
        starts.to(dtype=torch.int32, device=kernel_device),
        torch.tensor([prefix, end], dtype=torch.int32, device=kernel_device),
        dim**-0.5,
    )
    assert result.shape == (rows, 1, heads, dim) and result.dtype == dtype
    torch.testing.assert_close(result.float().cpu(), expected, atol=tolerance, rtol=tolerance)


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    """A tiny random Llama whose heads are 16 wide (the kernel's matrix products need 16), its tokenizer, and stop
    tokens that end its greedy answers at different steps, so that rows refill and go round the ring."""
    from tiny_model import build_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_model(tmp_path_factory.mktemp("tiny-llama-16"), hidden_size=64)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.eos_token
    return (
        model,
        tokenizer,
        stopping_early(model, tokenizer, SENTENCES, Generator(model, tokenizer, SYSTEM, 30, 1).stops),
    )


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """The rows of every call to the kernel from now on."""
    calls = []

    def spy(query, *args):
        calls.append(query.shape[0])
        return decode_attention(query, *args)

    monkeypatch.setattr(live_attention, "decode_attention", spy)
    return calls


@pytest.mark.parametrize(
    ("continuous", "settings"),
    [(False, {}), (True, {}), (False, {"structured": True}), (True, {"structured": True}), (False, {"num_beams": 2})],
    ids=["batches", "continuous", "batches-structured", "continuous-structured", "batches-beams"],
)
def test_the_answers_are_the_same_with_live_column_attention(tiny16, kernel_device, kernel_calls, continuous, settings):
    model, tokenizer, stops = tiny16
    model = model.to(kernel_device)

    def answers(live: bool) -> list:
        generator = Generator(
            model,
            tokenizer,
            SYSTEM,
            30,
            5,
            static=True,
            decoding=Decoding(**settings),
            continuous=continuous,
            live_column_attention=live,
        )
        generator.stops = stops if not settings else generator.stops  # the grammar and beams end answers themselves
        return generator.generate(SENTENCES, progress=False)

    before = answers(live=False)
    assert not kernel_calls
    assert answers(live=True) == before
    assert kernel_calls  # the decoding steps ran the kernel
    assert model.config._attn_implementation == "sdpa"  # the model's own attention is back


@pytest.mark.slow
def test_smollm2s_greedy_answers_are_the_same_with_live_column_attention(kernel_device, kernel_calls, tmp_path):
    """A real model (heads 64 wide, 3 query heads to a key/value head), whose answers end at its own end of turn."""
    from test_import import SMOLLM2

    from redistill.models import load_student
    from redistill.student import StudentParams, import_gguf

    import_gguf(SMOLLM2, tmp_path / "base")
    student = StudentParams(
        model=str(tmp_path / "base"), system_prompt=None, chat_template_fallback=None, attn_implementation="sdpa"
    )
    loaded = load_student(student, DEFAULT_SYSTEM_PROMPT, kernel_device)
    texts = ["Marie Curie was born in Warsaw.", "Bob met Ann.", "Tolkien wrote The Hobbit.", "Rome is in Italy."]

    def answers(live: bool, continuous: bool) -> list:
        generator = Generator(
            loaded.model,
            loaded.tokenizer,
            DEFAULT_SYSTEM_PROMPT,
            24,
            3,
            static=True,
            continuous=continuous,
            live_column_attention=live,
        )
        return generator.generate(texts, progress=False)

    before = answers(live=False, continuous=False)
    assert any(answer.ended for answer in before)
    assert answers(live=True, continuous=False) == before
    assert answers(live=True, continuous=True) == before
    assert kernel_calls


@runs_here
def test_under_tritons_interpreter():
    """This module's kernel tests, on the CPU, in a process where Triton starts in its interpreter."""
    run_under_interpreter(__file__)
