"""Benchmark the train presets (post, low_memory, fast) on the Llama-3-8B architecture on one GPU, in one run.

Llama-3-8B is built from its published config with random weights (bench/train_8b.py): the same compute and memory.
Each run is a fresh process that calls the train stage's `train()` with params.yaml's train block under a preset,
from loading the student to the saved adapter, so peak memory and start-up are each run's own; the post's
notebook (bench/post_recipe.py) runs on the same card for comparison. The examples come in the same order in every
run (length-grouped, seeded), so the table's loss over the same examples compares runs that take 8 or 16 of them a
step. Prints one table.

    python bench/train.py --tokenizer DIR --data FILE --steps 40 --out results.json [--profile 3]

Runs in the device image, which lacks dvclive: the runs write no DVCLive curve; the loss per step goes to --out.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from train_8b import build_random_llama3_8b, labelled_rows
from transformers import TrainerCallback

from redistill.io import write_json, write_jsonl
from redistill.params import load_block
from redistill.prompts import teacher_prompt
from redistill.student import StudentParams
from redistill.train_params import TrainParams

ROOT = Path(__file__).resolve().parent.parent
# name: (train-block overrides, whether it runs --steps steps (else whole epochs)). A "lora" override is merged into
# the lora block; "profile" profiles that many steps of the run (as --profile does for every timed run).
RUNS = {
    "post": ({"preset": "post"}, True),
    "low_memory": ({"preset": "low_memory"}, True),
    "fast": ({"preset": "fast"}, True),
    # The packed row through SDPA with a block-diagonal mask (cuDNN's kernel off), as before the varlen kernel.
    "fast-sdpa": ({"preset": "fast", "attention": "sdpa"}, True),
    # peft's casts of each projection's input to the fp32 adapter dtype kept (the stage turns them off under bf16).
    "fast-input-casts": ({"preset": "fast", "input_casts": True}, True),
    "fast-compiled": ({"preset": "fast", "compile": True}, True),
    "fast-no-dropout": ({"preset": "fast", "lora": {"dropout": 0.0}}, True),
    "fast-padded": ({"preset": "fast", "packing": False}, True),
    # 16 examples a step at sqrt(2) x the learning rate: 1.5-1.9x the tokens/s, a lower held-out F1 (BENCHMARKS.md).
    "fast-16": ({"preset": "fast", "batch_size": 16, "learning_rate": 2.83e-4}, True),
    "fast-16-compiled": ({"preset": "fast", "batch_size": 16, "learning_rate": 2.83e-4, "compile": True}, True),
    "fast-2-epochs": ({"preset": "fast"}, False),
    "fast-compiled-2-epochs": ({"preset": "fast", "compile": True}, False),
    "fast-16-2-epochs": ({"preset": "fast", "batch_size": 16, "learning_rate": 2.83e-4}, False),
    "fast-profiled": ({"preset": "fast", "profile": 3}, True),  # its rate includes the profiler's overhead
    "fast-compiled-profiled": ({"preset": "fast", "compile": True, "profile": 3}, True),
}


class StepLog(TrainerCallback):
    """The loss of every logged step and the wall-clock seconds of every optimiser step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.step_seconds: list[float] = []
        self.last = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.step_seconds.append(now - self.last)
        self.last = now

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


class StepProfiler(TrainerCallback):
    """Profiles ``steps`` optimiser steps after the warm-up with torch.profiler and writes the kernel table."""

    def __init__(self, steps: int, first: int, out: Path) -> None:
        self.steps, self.first, self.out = steps, first, out
        self.profiler = None
        self.started = 0.0

    def on_step_end(self, args, state, control, **kwargs):  # from one step's end to another's: all in between
        if state.global_step == self.first and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            torch.cuda.synchronize()
            self.started = time.perf_counter()
        elif self.profiler is not None and state.global_step == self.first + self.steps:
            torch.cuda.synchronize()
            wall = time.perf_counter() - self.started
            self.profiler.__exit__(None, None, None)
            events = self.profiler.key_averages()
            gpu = sum(event.self_device_time_total for event in events) / 1e6
            table = events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)
            table += events.table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=70)
            summary = f"{self.steps} steps: wall {wall:.3f} s, GPU kernels {gpu:.3f} s ({gpu / wall:.0%} busy)\n"
            self.out.write_text(summary + table)
            print(summary, flush=True)
            self.profiler = None
            self.first = -1


def child(argv: list[str]) -> None:
    """One run in this process: the train stage's training on the random 8B, results to --result."""
    from redistill.training import train

    parser = argparse.ArgumentParser()
    for name in ("--model", "--overrides", "--rows", "--result"):
        parser.add_argument(name, required=True)
    parser.add_argument("--profile", type=int, default=0)
    args = parser.parse_args(argv)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["student"]["model"] = args.model
    overrides = json.loads(args.overrides)
    if overrides.pop("attention", None) == "sdpa":
        import redistill.training

        redistill.training.packed_attention_available = lambda dtype: False
        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN plans every new row length: 2.4x slower (BENCHMARKS.md)
    if overrides.pop("input_casts", False):
        import contextlib

        import peft.helpers

        peft.helpers.disable_input_dtype_casting = lambda model, active: contextlib.nullcontext()
    params["train"]["lora"].update(overrides.pop("lora", {}))
    params["train"].update(overrides)
    train_params = load_block(TrainParams, "train", params)
    student = load_block(StudentParams, "student", params)
    workdir = Path(args.result).parent
    log = StepLog()
    callbacks = [log]
    if args.profile:
        callbacks.append(StepProfiler(args.profile, first=5, out=workdir / "profile.txt"))
    metrics, _ = train(
        train_params,
        student,
        student.prompt(teacher_prompt(params)),
        [json.loads(line) for line in Path(args.rows).read_text().splitlines()],
        [],
        adapter_dir=workdir / "adapter",
        checkpoints=workdir / "checkpoints",
        log_dir=None,
        callbacks=tuple(callbacks),
    )
    if train_params.compile:  # where the compiling time went (tracing, autograd, inductor), and how often
        metrics["compile_times"] = torch._dynamo.utils.compile_times(repr="str")
    write_json(args.result, {**metrics, "losses": log.losses, "step_seconds": log.step_seconds})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="folder of a tokenizer (e.g. models/base)")
    parser.add_argument("--data", required=True, help="labelled JSONL, or the post's JSON list of {text, gold_re}")
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps of the timed runs")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated: post-notebook, {', '.join(RUNS)}")
    parser.add_argument("--profile", type=int, default=0, help="profile this many steps of each timed run (0: none)")
    parser.add_argument("--run-timeout", type=int, default=600, help="seconds before a run is stopped")
    parser.add_argument("--work", default="bench-work")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    work = Path(args.work).resolve()
    model = work / "llama3-8b-random"
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": args.steps}
    results["build_seconds"] = build_random_llama3_8b(model, args.tokenizer)
    rows_file = work / "train.jsonl"
    write_jsonl(rows_file, labelled_rows(args.data))
    results["sentences"] = sum(1 for _ in rows_file.open())
    for name in args.runs.split(","):
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        result = folder / "result.json"
        started = time.monotonic()
        if name == "post-notebook":
            command = [sys.executable, str(ROOT / "bench/post_recipe.py"), "--model", str(model), "--data"]
            command += [str(rows_file), "--max-steps", str(args.steps), "--out", str(result)]
        else:
            overrides, timed = RUNS[name]
            overrides = dict(overrides)
            profile = overrides.pop("profile", args.profile if timed else 0)
            # Timed runs save no checkpoint; whole runs save the preset's, as users' runs do.
            overrides = {**overrides, **({"max_steps": args.steps, "save_steps": 10**6} if timed else {})}
            command = [sys.executable, __file__, "--child", "--model", str(model), "--rows", str(rows_file)]
            command += ["--overrides", json.dumps(overrides), "--result", str(result)]
            command += ["--profile", str(profile)]
        try:
            code = subprocess.run(command, cwd=folder, timeout=args.run_timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        metrics = json.loads(result.read_text()) if code == 0 else {"failed": code}
        metrics["process_seconds"] = time.monotonic() - started  # imports, loading, training, saving
        results[name] = metrics
        write_json(args.out, results)  # what has run so far survives a later run's failure
        print(name, json.dumps({k: v for k, v in metrics.items() if k not in ("losses", "step_seconds")}), flush=True)
    print(table(results))


def table(results: dict) -> str:
    runs = {name: m for name, m in results.items() if isinstance(m, dict) and "process_seconds" in m}
    # The loss over the same examples in every run (the batches come in the same order): the last 80 of the fewest
    # examples that any run logged a loss for.
    examples = {name: len(m["losses"]) * m["global_batch_size"] for name, m in runs.items() if m.get("losses")}
    last = min(examples.values(), default=0)
    window = f"loss, examples {max(0, last - 80) + 1}-{last}"
    lines = [
        f"{results['device']}, torch {results['torch']}, {results['sentences']} sentences",
        "| run | tokens/s after warm-up | whole run | median step s | process s | setup s | saving s | peak GiB "
        f"| {window} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, metrics in runs.items():
        loss = "-"
        if name in examples and last:
            batch = metrics["global_batch_size"]
            losses = metrics["losses"][max(0, last - 80) // batch : last // batch]
            loss = f"{sum(losses) / len(losses):.3f}" if losses else "-"
        after = metrics.get("tokens_per_second_after_warmup")
        step = statistics.median(metrics["step_seconds"]) if metrics.get("step_seconds") else 0
        lines.append(
            f"| {name} | {after or 0:,.0f} | {metrics.get('tokens_per_second') or 0:,.0f} | {step:.3f} | "
            f"{metrics['process_seconds']:.0f} | {metrics.get('setup_seconds', 0):.1f} | "
            f"{metrics.get('saving_seconds', 0):.1f} | {metrics.get('peak_gpu_memory_gb', 0):.1f} | {loss} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    child(sys.argv[2:]) if sys.argv[1:2] == ["--child"] else main()
