"""Benchmark the train presets (post, low_memory, fast) on the Llama-3-8B architecture on one GPU, in one run.

Llama-3-8B is built from its published config with random weights (bench/common.py): the same compute and memory.
Each run (RUNS: a preset, train-block overrides, train()'s speed-ups) is a fresh process that calls the train stage's
`train()` with params.yaml's train block under the run's preset, from loading the student to the saved adapter, so
peak memory and start-up are each run's own; the post's notebook (bench/post_recipe.py, the run `post-notebook`)
runs on the same card for comparison. The examples come in the same order in every run (length-grouped, seeded), so
the table's loss over the same examples compares runs that take 8 or 16 of them a step. Prints one table.

    python bench/train.py --tokenizer DIR --data FILE --steps 40 --out results.json [--profile 3]

Runs in the device image, which lacks dvclive: the runs write no DVCLive curve; the loss per step goes to --out.
"""

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import ROOT, bench_params, labelled_rows, random_llama3_8b
from transformers import TrainerCallback

from redistill.io import write_json, write_jsonl
from redistill.params import load_block
from redistill.prompts import teacher_prompt
from redistill.student import StudentParams
from redistill.train_params import TrainParams
from redistill.training import Speedups


@dataclass(frozen=True)
class Run:
    """One run of the table: ``preset`` with train-block ``overrides`` (merged into params.yaml's train block by
    common.with_overrides: ``{"lora": {"dropout": 0.0}}`` changes that key alone), the ``speedups`` that train()
    leaves on, and its length: --steps optimiser steps without checkpoints, or ``whole_epochs`` (the train block's
    epochs) saving the preset's checkpoints, as users' runs do. ``profile``: steps to profile (0: --profile's, for
    runs of --steps steps)."""

    preset: str
    overrides: dict = field(default_factory=dict)
    speedups: Speedups = field(default_factory=Speedups)
    whole_epochs: bool = False
    profile: int = 0

    def train_overrides(self, steps: int) -> dict:
        length = {} if self.whole_epochs else {"max_steps": steps, "save_steps": 10**6}
        return {"preset": self.preset, **self.overrides, **length}


# 16 examples a step at sqrt(2) x the learning rate: 1.5-1.9x the tokens/s, a lower held-out F1 (BENCHMARKS.md).
BATCH_16 = {"batch_size": 16, "learning_rate": 2.83e-4}
COMPILED = {"compile": True}
EAGER = {"cuda_graphs": False, "row_length_multiple": 0, "fused_lora": False}
FUSED = {"fused_lora": True}
# Rows padded up to a multiple of 256 tokens (~11% padding at ~1,170), as CUDA graphs need; the layers replayed.
ROW_PADDED = {"row_length_multiple": 256}
GRAPHS = {**ROW_PADDED, "cuda_graphs": True}
# Rows padded to a multiple of 128 (~5% padding, 10-11 row lengths over an epoch of the post's data instead of 6).
GRAPHS_128 = {**GRAPHS, "row_length_multiple": 128}
LIGER = {"liger_kernels": True}
NO_LIGER = {"liger_kernels": False}
LOG_AT_ONCE = Speedups(log_a_step_late=False)
RUNS = {
    "post": Run("post"),
    "low_memory": Run("low_memory"),
    "fast": Run("fast"),
    # `fast` as it was before it took the graphs, their padded rows and fused LoRA (BENCHMARKS.md's earlier `fast`).
    "fast-eager": Run("fast", EAGER),
    "fast-eager-2-epochs": Run("fast", EAGER, whole_epochs=True),
    # `fast` before it took Liger's kernels: graphs over rows to 128, fused LoRA.
    "fast-no-liger": Run("fast", NO_LIGER),
    "fast-no-liger-2-epochs": Run("fast", NO_LIGER, whole_epochs=True),
    # Each logged step read at once, as before Speedups.log_a_step_late.
    "fast-log-at-once": Run("fast", speedups=LOG_AT_ONCE),
    "fast-log-at-once-2-epochs": Run("fast", speedups=LOG_AT_ONCE, whole_epochs=True),
    "fast-waits": Run("fast", speedups=Speedups(no_host_waits=False)),  # each step waits for the GPU, as before
    # Each row shape recorded when the run meets it, as before Speedups.record_rows_ahead.
    "fast-rows-met": Run("fast", speedups=Speedups(record_rows_ahead=False)),
    "fast-rows-met-2-epochs": Run("fast", speedups=Speedups(record_rows_ahead=False), whole_epochs=True),
    # The trainer's checkpoint after the last step written, as before Speedups.no_checkpoint_at_end.
    "fast-checkpoint-at-end-2-epochs": Run("fast", speedups=Speedups(no_checkpoint_at_end=False), whole_epochs=True),
    # Rows padded to a multiple of 128 as before (5.6% padding on the post's data against 2.8% at 64; 11 row shapes
    # to record instead of 20), or of 32 (1.4%, 36 shapes).
    "fast-rows-128-2-epochs": Run("fast", {"row_length_multiple": 128}, whole_epochs=True),
    "fast-rows-32-2-epochs": Run("fast", {"row_length_multiple": 32}, whole_epochs=True),
    # Fused LoRA's backward through dropout as a product, dropout's backward and an addition, as before
    # Speedups.dropout_kernel; each adapter weight cast at each call, as before Speedups.casts_once.
    "fast-dropout-unfused-2-epochs": Run("fast", speedups=Speedups(dropout_kernel=False), whole_epochs=True),
    "fast-casts-per-call-2-epochs": Run("fast", speedups=Speedups(casts_once=False), whole_epochs=True),
    # q, k and v (gate and up) each hand autograd their input gradient, as before Speedups.shared_input_gradients.
    "fast-input-gradients-apart-2-epochs": Run(
        "fast", speedups=Speedups(shared_input_gradients=False), whole_epochs=True
    ),
    # The adapters made and initialised on the host, as before Speedups.adapters_made_on_device.
    "fast-adapters-on-host-2-epochs": Run("fast", speedups=Speedups(adapters_made_on_device=False), whole_epochs=True),
    # The trainer's clipping (a pass scaling every gradient), as before Speedups.clip_in_optimizer.
    "fast-clip-by-trainer-2-epochs": Run("fast", speedups=Speedups(clip_in_optimizer=False), whole_epochs=True),
    # The packed row through SDPA with a block-diagonal mask (cuDNN's kernel off), as before the varlen kernel.
    "fast-sdpa": Run("fast", speedups=Speedups(packed_attention=False)),
    # peft's casts of each projection's input to the fp32 adapter dtype kept (train() skips them under bf16).
    "fast-input-casts": Run("fast", speedups=Speedups(skip_input_casts=False)),
    "fast-compiled": Run("fast", COMPILED),
    "fast-no-dropout": Run("fast", {"lora": {"dropout": 0.0}}),
    "fast-padded": Run("fast", {"packing": False}),
    "fast-16": Run("fast", BATCH_16),
    "fast-16-compiled": Run("fast", {**BATCH_16, **COMPILED}),
    "fast-2-epochs": Run("fast", whole_epochs=True),
    "fast-compiled-2-epochs": Run("fast", COMPILED, whole_epochs=True),
    "fast-16-2-epochs": Run("fast", BATCH_16, whole_epochs=True),
    "fast-fused": Run("fast", FUSED),
    "fast-row-padded": Run("fast", ROW_PADDED),  # fast-graphs' rows, eager
    "fast-compiled-row-padded": Run("fast", {**COMPILED, **ROW_PADDED}),
    "fast-graphs": Run("fast", GRAPHS),
    "fast-graphs-fused": Run("fast", {**GRAPHS, **FUSED}),
    "fast-graphs-compiled": Run("fast", {**GRAPHS, **COMPILED}),
    "fast-graphs-128": Run("fast", GRAPHS_128),
    "fast-graphs-128-fused": Run("fast", {**GRAPHS_128, **FUSED}),
    "fast-graphs-128-compiled": Run("fast", {**GRAPHS_128, **COMPILED}),
    "fast-liger": Run("fast", LIGER),
    # Each step waits for the GPU on the host, as before Speedups.no_host_waits.
    "fast-graphs-128-liger-fused-waits": Run("fast", {**GRAPHS_128, **LIGER, **FUSED}, Speedups(no_host_waits=False)),
    "fast-graphs-128-liger-fused-log-10": Run("fast", {**GRAPHS_128, **LIGER, **FUSED, "logging_steps": 10}),
    "fast-graphs-128-liger-fused-profiled": Run("fast", {**GRAPHS_128, **LIGER, **FUSED}, profile=3),
    "fast-graphs-128-liger-fused-compiled": Run("fast", {**GRAPHS_128, **LIGER, **FUSED, **COMPILED}),
    "fast-graphs-128-liger": Run("fast", {**GRAPHS_128, **LIGER}),
    "fast-graphs-128-liger-fused": Run("fast", {**GRAPHS_128, **LIGER, **FUSED}),
    "fast-graphs-128-liger-fused-2-epochs": Run("fast", {**GRAPHS_128, **LIGER, **FUSED}, whole_epochs=True),
    "fast-graphs-128-liger-profiled": Run("fast", {**GRAPHS_128, **LIGER}, profile=3),
    "fast-graphs-128-compiled-2-epochs": Run("fast", {**GRAPHS_128, **COMPILED}, whole_epochs=True),
    "fast-graphs-128-fused-2-epochs": Run("fast", {**GRAPHS_128, **FUSED}, whole_epochs=True),
    "fast-fused-2-epochs": Run("fast", FUSED, whole_epochs=True),
    "fast-graphs-2-epochs": Run("fast", GRAPHS, whole_epochs=True),
    "fast-profiled": Run("fast", profile=3),  # its rate includes the profiler's overhead
    "fast-compiled-profiled": Run("fast", COMPILED, profile=3),
    "fast-fused-profiled": Run("fast", FUSED, profile=3),
    "fast-graphs-profiled": Run("fast", GRAPHS, profile=3),
}
NOTEBOOK = "post-notebook"  # the post's notebook, bench/post_recipe.py, for --steps steps


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
            table = events.table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=90)
            table += events.table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=70)
            summary = f"{self.steps} steps: wall {wall:.3f} s, GPU kernels {gpu:.3f} s ({gpu / wall:.0%} busy)\n"
            self.out.write_text(summary + table)
            print(summary, flush=True)
            self.profiler = None
            self.first = -1


def child(argv: list[str]) -> None:
    """One run in this process: the train stage's training on --model, results to --result."""
    from redistill.training import train

    parser = argparse.ArgumentParser()
    for name in ("--model", "--overrides", "--rows", "--result"):
        parser.add_argument(name, required=True)
    parser.add_argument("--speedups", default="{}", help="Speedups' fields to set (JSON)")
    parser.add_argument("--profile", type=int, default=0)
    parser.add_argument("--profile-from", type=int, default=5)
    parser.add_argument("--inductor", default="{}", help="torch._inductor.config settings (JSON, dotted keys)")
    args = parser.parse_args(argv)
    torch._inductor.config.patch(json.loads(args.inductor)).__enter__()  # for the whole process
    params = bench_params(args.model, {"train": json.loads(args.overrides)})
    speedups = Speedups(**json.loads(args.speedups))
    if not speedups.packed_attention:  # a global switch, not train()'s: packed rows through SDPA, as before varlen
        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN plans every new row length: 2.4x slower (BENCHMARKS.md)
    train_params = load_block(TrainParams, "train", params)
    student = load_block(StudentParams, "student", params)
    workdir = Path(args.result).parent
    log = StepLog()
    callbacks = [log]
    if args.profile:
        callbacks.append(StepProfiler(args.profile, first=args.profile_from, out=workdir / "profile.txt"))
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
        speedups=speedups,
    )
    if train_params.compile:  # where the compiling time went (tracing, autograd, inductor), and how often
        metrics["compile_times"] = torch._dynamo.utils.compile_times(repr="str")
        # Whether the on-disk caches served this run (a second run on the machine should only hit).
        counters = torch._dynamo.utils.counters
        caches = {**counters["aot_autograd"], **counters["inductor"]}
        metrics["compile_caches"] = {name: count for name, count in caches.items() if "cache" in name}
    write_json(args.result, {**metrics, "losses": log.losses, "step_seconds": log.step_seconds})


def run_argv(name: str, args: argparse.Namespace, model: Path, rows_file: Path, result: Path) -> list[str]:
    """The process of run ``name``: the post's notebook, or this script's child with the run's params."""
    if name == NOTEBOOK:
        argv = [sys.executable, str(ROOT / "bench/post_recipe.py"), "--model", str(model), "--data"]
        argv += [str(rows_file), "--max-steps", str(args.steps), "--out", str(result)]
        return argv
    run = RUNS[name]
    argv = [sys.executable, __file__, "--child", "--model", str(model), "--rows", str(rows_file)]
    argv += ["--overrides", json.dumps(run.train_overrides(args.steps)), "--result", str(result)]
    argv += ["--speedups", json.dumps(dataclasses.asdict(run.speedups))]
    argv += ["--profile", str(run.profile or (0 if run.whole_epochs else args.profile))]
    argv += ["--profile-from", str(args.profile_from)]
    argv += ["--inductor", json.dumps(dict(args.inductor))]
    return argv


def inductor_setting(text: str) -> tuple[str, object]:
    """KEY=VALUE, VALUE read as JSON (false, 8, "x")."""
    key, _, value = text.partition("=")
    return key, json.loads(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="folder of a tokenizer (e.g. models/base)")
    parser.add_argument("--data", required=True, help="labelled JSONL, or the post's JSON list of {text, gold_re}")
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps of the timed runs")
    parser.add_argument(
        "--runs",
        default=",".join(RUNS),
        help=f"comma-separated (a name twice runs twice): {NOTEBOOK}, {', '.join(RUNS)}",
    )
    parser.add_argument("--profile", type=int, default=0, help="profile this many steps of each timed run (0: none)")
    parser.add_argument(
        "--profile-from", type=int, default=5, help="the optimiser step profiling starts after (past the recordings)"
    )
    parser.add_argument(
        "--inductor",
        action="append",
        default=[],
        type=inductor_setting,
        help="a torch._inductor.config setting for every run, e.g. triton.cudagraph_trees=false (repeatable)",
    )
    parser.add_argument("--run-timeout", type=int, default=600, help="seconds before a run is stopped")
    parser.add_argument("--work", default="bench-work")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    names = args.runs.split(",")
    if unknown := set(names) - {NOTEBOOK, *RUNS}:
        parser.error(f"unknown run(s) {', '.join(sorted(unknown))}; choose from {NOTEBOOK}, {', '.join(RUNS)}")

    work, model, results = random_llama3_8b(args.work, args.tokenizer)
    results["steps"] = args.steps
    rows_file = work / "train.jsonl"
    write_jsonl(rows_file, labelled_rows(args.data))
    results["sentences"] = sum(1 for _ in rows_file.open())
    for index, name in enumerate(names):
        # A run named twice runs twice: a compiled run's second finds the first's compile caches (train.compile).
        label = name if name not in names[:index] else f"{name}-again-{names[:index].count(name)}"
        folder = work / label
        folder.mkdir(parents=True, exist_ok=True)
        result = folder / "result.json"
        started = time.monotonic()
        argv = run_argv(name, args, model, rows_file, result)
        log = folder / "stderr.log"  # the run's progress and, where it fails, its error: kept in the results
        try:
            with log.open("w") as stderr:
                code = subprocess.run(argv, cwd=folder, timeout=args.run_timeout, stderr=stderr).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        metrics = json.loads(result.read_text()) if code == 0 else {"failed": code, "error": last_lines(log)}
        metrics["process_seconds"] = time.monotonic() - started  # imports, loading, training, saving
        results[label] = metrics
        write_json(args.out, results)  # what has run so far survives a later run's failure
        print(label, json.dumps({k: v for k, v in metrics.items() if k not in ("losses", "step_seconds")}), flush=True)
    print(table(results))


def last_lines(log: Path, count: int = 40) -> list[str]:
    """The last ``count`` lines of a run's stderr, progress bars' redraws left out."""
    lines = log.read_text(errors="replace").replace("\r", "\n").splitlines()
    return [line for line in lines if "it/s]" not in line and "s/it]" not in line][-count:]


def table(results: dict) -> str:
    runs = {name: m for name, m in results.items() if isinstance(m, dict) and "process_seconds" in m}
    # The loss over the same examples in every run (the batches come in the same order): the last 80 of the fewest
    # examples that any run logged a loss for.
    examples = {name: len(m["losses"]) * m["global_batch_size"] for name, m in runs.items() if m.get("losses")}
    last = min(examples.values(), default=0)
    window = f"loss, examples {max(0, last - 80) + 1}-{last}"
    lines = [
        f"{results['device']}, torch {results['torch']}, {results['sentences']} sentences",
        "| run | tokens/s after warm-up | whole run | median step s | first step s | process s | imports s | setup s "
        f"| saving s | peak GiB | {window} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, metrics in runs.items():
        loss = "-"
        if name in examples and last:
            batch = metrics["global_batch_size"]
            losses = metrics["losses"][max(0, last - 80) // batch : last // batch]
            loss = f"{sum(losses) / len(losses):.3f}" if losses else "-"
        after = metrics.get("tokens_per_second_after_warmup")
        steps = metrics.get("step_seconds") or [0]
        process, setup, saving = (metrics.get(key, 0) for key in ("process_seconds", "setup_seconds", "saving_seconds"))
        # The process's start to train()'s: Python, torch, transformers and trl imported (the post's notebook: all).
        imports = process - setup - metrics.get("runtime_seconds", 0) - saving
        lines.append(
            f"| {name} | {after or 0:,.0f} | {metrics.get('tokens_per_second') or 0:,.0f} | "
            f"{statistics.median(steps):.3f} | {steps[0]:.1f} | {process:.0f} | {imports:.1f} | {setup:.1f} | "
            f"{saving:.1f} | {metrics.get('peak_gpu_memory_gb', 0):.1f} | {loss} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    child(sys.argv[2:]) if sys.argv[1:2] == ["--child"] else main()
