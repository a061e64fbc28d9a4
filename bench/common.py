"""What the training benchmarks share: the Llama-3-8B architecture with random weights, the labelled sentences, and
one way to override params.

Llama-3-8B's weights can't be downloaded here, so the model is built from its published config with random weights:
the same compute and memory. Its tokenizer is any one with a similar English compression (the demo student's, 49k
tokens), so token counts are close to Llama-3's own.
"""

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from redistill.io import read_records
from redistill.params import read_params_file
from redistill.sentences import sentence_id
from redistill.triples import clean_label

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params.yaml"
# meta-llama/Meta-Llama-3-8B's config.json, as published.
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}


def build_random_llama3_8b(folder: Path, tokenizer_dir: str) -> float:
    """Save a randomly initialised Llama-3-8B and a tokenizer without chat template (as the base model's); returns
    the seconds it took, 0 where ``folder`` holds one already (one build serves every run of a work folder)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return 0.0
    started = time.monotonic()
    config = LlamaConfig(**LLAMA3_8B)
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    return time.monotonic() - started


def random_llama3_8b(work: str, tokenizer_dir: str) -> tuple[Path, Path, dict]:
    """The work folder (absolute), the random Llama-3-8B in it (built unless there) and the results' first keys:
    the device, torch's version and the seconds the build took."""
    folder = Path(work).resolve()
    model = folder / "llama3-8b-random"
    header = {"device": device_name(), "torch": torch.__version__}
    header["build_seconds"] = build_random_llama3_8b(model, tokenizer_dir)
    return folder, model, header


def device_name() -> str:
    """The GPU's name, or "cpu" where there is none."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def labelled_rows(path: str) -> list[dict]:
    """redistill's labelled rows, or the post's {"text", "gold_re"} records cleaned into them."""
    rows = read_records(path)
    if rows and "gold_re" in rows[0]:
        rows = [
            {
                "id": sentence_id(row["text"]),
                "text": row["text"],
                "triples": [list(t) for t in clean_label(row["gold_re"]).triples],
            }
            for row in rows
        ]
    return [row for row in rows if row["triples"]]


def with_overrides(params: dict, overrides: dict, prefix: str = "") -> dict:
    """A copy of ``params`` (a params.yaml mapping) with ``overrides`` merged in: where both hold a mapping under a
    key, the override's keys update that mapping's and leave its others (``{"train": {"lora": {"dropout": 0}}}``
    changes one key of the lora block); any other value replaces the key's. A key that ``params`` lacks is a
    ValueError: params.yaml names every key, so it is a misspelling."""
    merged = copy.deepcopy(params)
    for key, value in overrides.items():
        if key not in merged:
            raise ValueError(f"unknown param {prefix}{key}; known: {', '.join(map(str, merged))}")
        if isinstance(value, dict) and isinstance(merged[key], dict):
            merged[key] = with_overrides(merged[key], value, f"{prefix}{key}.")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def bench_params(student: str | Path, overrides: dict, source: str | Path = PARAMS) -> dict:
    """``source`` (the project's params.yaml) with ``overrides`` merged in, then the student at ``student``."""
    params = with_overrides(read_params_file(source), overrides)
    return with_overrides(params, {"student": {"model": str(student)}})


def micro_benchmark_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """A GPU micro-benchmark's arguments: ``parser``'s own, then the packed row's tokens, the LoRA rank and the
    output file; an error where there is no CUDA GPU."""
    parser.add_argument("--tokens", type=int, default=1280, help="a step's packed row (the post's: ~1,170-1,300)")
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    return args


def time_widths(out: str, tokens: int, rank: int, widths: tuple[int, ...], measure) -> None:
    """A micro-benchmark's results on this GPU: ``measure(width)`` (a dict of microseconds by call) for each width,
    printed and written to ``out`` as JSON beside the device, the tokens and the rank."""
    results = {"device": torch.cuda.get_device_name(), "tokens": tokens, "rank": rank}
    for width in widths:
        results[str(width)] = measure(width)
        print(width, ", ".join(f"{name} {us:.1f} us" for name, us in results[str(width)].items()), flush=True)
    Path(out).write_text(json.dumps(results, indent=1))
