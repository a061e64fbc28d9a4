"""Benchmark the train stage on 1, 2, ... GPUs of one host: the Llama-3-8B architecture (random weights), LoRA.

Each run is `stages/train.py` with `train.num_processes` set, so it goes through `accelerate launch` (DDP) exactly
as a user's run would. Every GPU gets the same per-device batch, so N GPUs see N times the sentences per step
(weak scaling); per-GPU efficiency = tokens/s on N GPUs / (N x tokens/s on one). Optionally also runs FSDP+QLoRA
(`train.distributed: fsdp`, nf4) and DDP QLoRA with the shipped params on all GPUs, as working checks.

    python bench/train_multi_gpu.py --tokenizer models/base --data sft_train_data.json --gpus 1,2 --out scaling.json
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from common import ROOT, bench_params, labelled_rows, random_llama3_8b

from redistill.io import write_json, write_jsonl

CHECKS = {
    "ddp-qlora": {},  # params.yaml as shipped: nf4 QLoRA through DDP
    "fsdp-qlora": {"quantization": "nf4", "distributed": "fsdp", "optim": "adamw_torch"},
}


def run_stage(workdir: Path, model: Path, max_steps: int, overrides: dict) -> dict:
    """`stages/train.py` in ``workdir`` with params.yaml's train block under ``overrides`` (common.with_overrides)."""
    params = bench_params(model, {"train": {"max_steps": max_steps, "save_steps": 10**6, **overrides}})
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([sys.executable, str(ROOT / "stages/train.py")], cwd=workdir, check=True)
    return json.loads((workdir / "metrics/train.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="folder of a tokenizer (e.g. models/base)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--gpus", default=None, help="comma-separated GPU counts (default: 1 and all; '' for none)")
    parser.add_argument("--recipe", default='{"preset": "fast"}', help="train-block overrides (JSON) of the runs")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--check-steps", type=int, default=0, help="steps of each check run on all GPUs (0: none)")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated, of: {', '.join(CHECKS)}")
    parser.add_argument("--work", default="bench-work")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    recipe = json.loads(args.recipe)

    available = torch.cuda.device_count()
    counts = [int(n) for n in args.gpus.split(",") if n] if args.gpus is not None else sorted({1, available})
    checks = args.checks.split(",")
    if unknown := set(checks) - set(CHECKS):
        parser.error(f"unknown check(s) {', '.join(sorted(unknown))}; choose from {', '.join(CHECKS)}")
    work, model, results = random_llama3_8b(args.work, args.tokenizer)
    results |= {"device": f"{available} x {results['device']}", "max_steps": args.max_steps, "recipe": recipe}
    rows = labelled_rows(args.data)

    def run(name: str, steps: int, overrides: dict) -> dict:
        workdir = work / name
        write_jsonl(workdir / "data/train.jsonl", rows)
        write_jsonl(workdir / "data/val.jsonl", [])
        started = time.monotonic()
        metrics = run_stage(workdir, model, steps, overrides)
        metrics["stage_seconds"] = time.monotonic() - started  # with model loading and process start-up
        results[name] = metrics
        write_json(args.out, results)  # what has run so far survives a later run's failure
        print(name, json.dumps(metrics), flush=True)
        return metrics

    single = None
    for count in counts:
        metrics = run(f"lora-{count}gpu", args.max_steps, {**recipe, "num_processes": count})
        if count == 1:
            single = metrics
        elif single:
            for rate in ("tokens_per_second", "tokens_per_second_after_warmup"):
                metrics[f"efficiency ({rate})"] = metrics[rate] / (count * single[rate])
            write_json(args.out, results)
    if args.check_steps:
        for name in checks:
            try:
                run(name, args.check_steps, {**CHECKS[name], "num_processes": available})
            except Exception as error:  # a check that fails is a result to report, not the end of the benchmark
                results[name] = {"failed": str(error)}
                write_json(args.out, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
