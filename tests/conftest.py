import json
import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # fake_provider, browser

from browser import chromium  # noqa: E402, F401  (the fixture)
from triton_kernels import kernel_device  # noqa: E402, F401  (the fixture)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A temp copy of the project's params.yaml with the cwd inside it; returns a helper to edit params."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)

    def write_params(**overrides: object) -> dict:
        for dotted, value in overrides.items():
            block, key = dotted.split("__", 1)
            params[block][key] = value
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        return params

    write_params()
    return write_params


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def dolly(context: str, category: str = "information_extraction") -> dict:
    return {"instruction": "Extract the relations.", "context": context, "response": "", "category": category}


@pytest.fixture(autouse=True)
def no_real_keys(monkeypatch):
    for variable in ("GROQ_API_KEY", "OPENAI_API_KEY", "GROQ_BASE_URL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setitem(os.environ, "HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> Path:
    """A saved tiny random Llama (ChatML template, pad token unset) usable as student.model."""
    from tiny_model import build_model

    return build_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_adapter(tiny_student, tmp_path_factory) -> Path:
    """A LoRA adapter with random non-zero weights on the tiny student, saved with its tokenizer as train does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-adapter")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_student).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_student):
    """The tiny random model and its tokenizer (pad = EOS, as many real tokenizers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(tiny_student), tokenizer


def labeled_rows(count: int, start: int = 0) -> list[dict]:
    """Labelled sentences with one easy pattern, so a tiny model can learn something in a few steps."""
    cities = ["Warsaw", "Paris", "Leeds", "Rome", "Vienna", "Oslo", "Lima", "Cairo"]
    rows = []
    for index in range(start, start + count):
        city = cities[index % len(cities)]
        text = f"Person{index} was born in {city}."
        rows.append({"id": f"s{index}", "text": text, "triples": [[f"Person{index}", "was born in", city]]})
    return rows
