"""The student block of params.yaml, and converting a GGUF student once into a model folder (the import stage).

Loading the student, trained or not, is redistill/models.py."""

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from redistill.errors import PipelineError
from redistill.params import require
from redistill.prompts import CHAT_TEMPLATE_FALLBACKS

ATTENTION = ("sdpa", "eager", "flash_attention_2")


@dataclass(frozen=True)
class StudentParams:
    model: str
    system_prompt: str | None
    chat_template_fallback: str | None
    attn_implementation: str

    def prompt(self, teacher_prompt: str) -> str:
        """The student's instruction: its own, or the teacher's (as the post trained it)."""
        return self.system_prompt or teacher_prompt

    def validate(self) -> None:
        require(bool(self.model), "student.model", "must name a Hugging Face model id or a local folder")
        fallbacks = ", ".join(CHAT_TEMPLATE_FALLBACKS)
        require(
            self.chat_template_fallback in (None, *CHAT_TEMPLATE_FALLBACKS),
            "student.chat_template_fallback",
            f"must be null or one of {fallbacks}, got {self.chat_template_fallback!r}",
        )
        require(
            self.attn_implementation in ATTENTION,
            "student.attn_implementation",
            f"must be one of {', '.join(ATTENTION)}, got {self.attn_implementation!r}",
        )


def locate_gguf(spec: str) -> Path:
    """A .gguf path, or ``package:FILE``: a file inside an installed package (found without importing it)."""
    if ":" in spec and not Path(spec).exists():
        package, _, name = spec.partition(":")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise PipelineError(f"import.gguf: package {package!r} is not installed (see README: the demo student)")
        path = Path(found.submodule_search_locations[0]) / name
    else:
        path = Path(spec)
    if not path.is_file():
        raise PipelineError(f"import.gguf: no file at {path}")
    return path


@dataclass(frozen=True)
class ImportParams:
    gguf: str | None


def import_gguf(spec: str, out: str | Path) -> dict:
    """Convert a GGUF model and its tokenizer into a bf16 safetensors folder ``out`` that loads in a second."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = locate_gguf(spec)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    # The weights are dequantised on load; saving them must not claim they are still GGUF-quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Dequantised weights load as float32; bfloat16 halves the folder and loses nothing a 4-bit file had.
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"gguf": path.name, "parameters": model.num_parameters(), "dtype": "bfloat16"}
