"""Loading the student, the one home for it: a base model (hub id or folder), a trained adapter on its base, or a
merged folder, each with its tokenizer, the instruction it was trained with and its context length.

A folder that training or `redistill merge` writes carries `redistill.json`: the base model and the system prompt
it was trained with (its saved tokenizer carries the chat template). `evaluate`, `extract` and `merge` read them
from there, so an answer never depends on the directory a command runs in.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from redistill.errors import PipelineError
from redistill.io import write_json
from redistill.prompts import DEFAULT_SYSTEM_PROMPT, ensure_chat_template
from redistill.student import StudentParams

TRAINED_WITH = "redistill.json"
# For models that name no fallback (extract, merge): ChatML, as the train stage's default.
DEFAULT_CHAT_TEMPLATE_FALLBACK = "chatml"


@dataclass(frozen=True)
class LoadedModel:
    model: object
    tokenizer: object
    system_prompt: str  # the instruction it was trained with
    context: int  # tokens the model attends to: prompt plus answer must fit
    base_model: str | None = None  # what a trained model was trained from, where that is known


def pick_device(requested: str = "auto") -> str:
    """``requested`` ("cpu", "cuda", "cuda:1"), or for "auto" the GPU where there is one."""
    import torch

    return requested if requested != "auto" else "cuda" if torch.cuda.is_available() else "cpu"


def inference_dtype(device: str):
    """bfloat16 on a GPU; float32 on the CPU, where bfloat16 matrix products are slow."""
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


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


def load_tokenizer(source: str, chat_template_fallback: str | None = DEFAULT_CHAT_TEMPLATE_FALLBACK):
    """The tokenizer of a model folder or hub id, with a chat template and a pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise PipelineError(f"could not load the tokenizer of {source} ({_first_line(error)})") from None
    ensure_chat_template(tokenizer, chat_template_fallback, source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # safe: labels are masked by position, never by token id
    return tokenizer


def student_tokenizer(student: StudentParams):
    """The configured student's tokenizer, with the chat template that training and evaluation use."""
    return load_tokenizer(resolve_model(student.model), student.chat_template_fallback)


def load_student(student: StudentParams, system_prompt: str, device: str = "auto", dtype: object = None) -> LoadedModel:
    """The configured student as it is before training, to answer under ``system_prompt``."""
    device = pick_device(device)
    model = load_base(student.model, dtype or inference_dtype(device), device, attention=student.attn_implementation)
    return _answering(model, student_tokenizer(student), system_prompt)


def load_base(model: str, dtype, device: str | None, quantization: str = "none", attention: str = "sdpa"):
    """The causal LM ``model`` on ``device`` ("cpu", "cuda", "cuda:1"; None: where it loads, for FSDP to shard and
    place); ``quantization="nf4"`` loads it 4-bit (QLoRA) through bitsandbytes."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    options = {"dtype": dtype, "attn_implementation": attention}
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
    source = resolve_model(model)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(source, **options)
    except (OSError, ValueError) as error:
        raise PipelineError(f"could not load student.model {source} ({_first_line(error)})") from None
    return loaded if device is None or device.startswith("cuda") else loaded.to(device)


def decoder_of(model):
    """The decoder (embeddings, layers, final norm) of a causal LM, under peft's wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()


def write_trained_with(folder: Path, base_model: str, system_prompt: str, **extra: str) -> None:
    """Record in ``folder`` what its model was trained with, for whoever loads it later."""
    write_json(Path(folder) / TRAINED_WITH, {"base_model": base_model, "system_prompt": system_prompt, **extra})


def trained_with(folder: Path) -> dict:
    """What ``folder``'s model was trained with: its base model and system prompt; {} where nothing is recorded (a
    hub model, a folder of another tool)."""
    info = Path(folder) / TRAINED_WITH
    return json.loads(info.read_text(encoding="utf-8")) if info.is_file() else {}


def load_trained(
    model: str,
    base: str | None = None,
    device: str = "auto",
    dtype: object = None,
    quantization: str = "none",
    attention: str = "sdpa",
    merge: bool = True,
) -> LoadedModel:
    """A model that answers: an adapter on its base (merged in memory unless 4-bit or ``merge`` is off), a merged
    folder, or a hub id. ``dtype`` defaults to inference_dtype(device); "auto" keeps the stored one."""
    device = pick_device(device)
    dtype = dtype or inference_dtype(device)
    folder = Path(model)
    record = trained_with(folder)
    if is_adapter(folder):
        base = base or adapter_base(folder)
        loaded = load_adapter(folder, base, dtype, device, quantization, attention)
        if merge and quantization == "none":
            loaded = loaded.merge_and_unload()
    else:
        if base:
            raise PipelineError(f"--base applies to adapters only, and {model} is a whole model")
        loaded = load_base(model, dtype, device, quantization, attention)
    has_tokenizer = (folder / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(folder) if has_tokenizer else base or resolve_model(model))
    system_prompt = record.get("system_prompt") or _default_prompt(folder)
    return _answering(loaded, tokenizer, system_prompt, base or record.get("base_model"))


def _answering(model, tokenizer, system_prompt: str, base_model: str | None = None) -> LoadedModel:
    model.eval()
    context = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    return LoadedModel(model, tokenizer, system_prompt, context, base_model)


def _default_prompt(folder: Path) -> str:
    if is_adapter(folder):  # trained before adapters recorded their prompt
        print(
            f"warning: {folder} records no system prompt ({TRAINED_WITH}); using the default one: pass "
            "--system-prompt if it was trained with another",
            file=sys.stderr,
        )
    return DEFAULT_SYSTEM_PROMPT


def adapter_base(folder: Path) -> str:
    """The base model an adapter was trained on: as recorded by training, else as peft recorded it."""
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    base = trained_with(folder).get("base_model") or config.get("base_model_name_or_path")
    if not base:
        raise PipelineError(f"{folder}: adapter_config.json names no base model; pass --base")
    return base


def load_adapter(adapter: Path, base: str, dtype, device: str, quantization: str, attention: str = "sdpa"):
    """The base model with the adapter applied; an adapter trained on another base is one clear line."""
    from peft import PeftModel

    model = load_base(base, dtype, device, quantization, attention)
    try:
        return PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError, KeyError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        reason = next((line for line in lines if "size mismatch" in line), lines[0])[:200]
        raise PipelineError(
            f"the adapter {adapter} does not fit the base model {base} ({reason}); "
            "pass the base it was trained on with --base"
        ) from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
