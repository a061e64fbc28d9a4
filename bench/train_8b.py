"""Benchmark the train stage on the Llama-3-8B architecture (random weights) against the post's recipe.

Runs, on one GPU and in one process tree: redistill's `stages/train.py` in nf4 QLoRA (the post's settings) and
in bf16 LoRA, then `bench/post_recipe.py`, each for the same number of optimiser steps on the same sentences.
Llama-3-8B's weights can't be downloaded here, so the model is built from its published config with random
weights: the same compute and memory. Its tokenizer is any one with a similar English compression (the demo
student's, 49k tokens), so token counts are close to Llama-3's own.

    python bench/train_8b.py --tokenizer DIR --data FILE --max-steps 20 --out bench-results.json

``--data`` is redistill's labelled JSONL, or a JSON list of {"text", "gold_re"} as in the post's repository.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from redistill.io import read_records, write_json, write_jsonl
from redistill.sentences import sentence_id
from redistill.triples import clean_label

ROOT = Path(__file__).resolve().parent.parent
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


def run_stage(workdir: Path, model: Path, max_steps: int, overrides: dict) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["student"]["model"] = str(model)
    params["train"].update(max_steps=max_steps, save_steps=10**6, **overrides)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([sys.executable, str(ROOT / "stages/train.py")], cwd=workdir, check=True)
    return json.loads((workdir / "metrics/train.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="folder of a tokenizer (e.g. models/base)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--work", default="bench-work")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    work = Path(args.work).resolve()
    model = work / "llama3-8b-random"
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "max_steps": args.max_steps}
    results["build_seconds"] = build_random_llama3_8b(model, args.tokenizer)
    rows = labelled_rows(args.data)
    results["sentences"] = len(rows)

    runs = {
        "redistill nf4 QLoRA (post's settings)": {"quantization": "nf4"},
        "redistill bf16 LoRA": {"quantization": "none"},
        "redistill bf16 LoRA, no checkpointing": {"quantization": "none", "gradient_checkpointing": False},
        "redistill bf16 LoRA, no checkpointing, batch 8 x 1": {
            "quantization": "none", "gradient_checkpointing": False, "batch_size": 8, "grad_accum": 1,
        },
    }  # fmt: skip
    for name, overrides in runs.items():
        workdir = work / name.split(" (")[0].replace(" ", "-").replace(",", "")
        write_jsonl(workdir / "data/train.jsonl", rows)
        write_jsonl(workdir / "data/val.jsonl", [])
        results[name] = run_stage(workdir, model, args.max_steps, overrides)
        print(name, results[name], flush=True)
    post_out = work / "post-recipe.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench/post_recipe.py"),
            "--model",
            str(model),
            "--data",
            str(work / "redistill-nf4-QLoRA/data/train.jsonl"),
            "--max-steps",
            str(args.max_steps),
            "--out",
            str(post_out),
        ],
        cwd=work,
        check=True,
    )
    results["post's recipe (nf4 QLoRA)"] = json.loads(post_out.read_text())
    write_json(args.out, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
