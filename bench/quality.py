"""Quality: the student trained through the train stage, scored on sentences it never saw.

The post's labelled sentences (or redistill's labelled JSONL), one row per distinct sentence, are split by sentence
hash: the `--holdout` sentences with the smallest ids are the held-out test set, the rest train; the post's own 20
test sentences (`--post-test`) are taken out of both and scored on their own. Each variant (params overrides: the
demo's LoRA by default) is trained once per seed by the stage's `train()` with the recipe from `--params` and `--set`;
the evaluate stage's code then has the trained model answer each test set under each decoding (`--decode`: greedy by
default). Prints one table (means over the seeds, with their range); runs on CPU or GPU. `--parallel N` trains N
runs at once, each in its own process (a small student's steps leave a GPU idle between launches: four SmolLM2 runs
share one GPU at nearly the speed of one); `--soup` adds, for each variant trained on every weight, the average of
its seeds' weights as one more model (a model soup, Wortsman et al., 2022).

    python bench/quality.py --student demo/models/base --data sft_dataset.json --post-test all_tests.json \
        --params demo/params.yaml --variant 'full={"train": {"method": "full"}}' --out q.json

`--set train.packing=true` and the like change one key of the recipe (docs/training.md has more).
"""

import argparse
import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
import yaml
from common import bench_params, device_name, labelled_rows, with_overrides

from redistill.evaluation import EvalParams, model_metrics, student_outputs
from redistill.io import write_json, write_jsonl
from redistill.models import load_trained
from redistill.params import load_block
from redistill.prompts import answer_text, teacher_prompt
from redistill.student import StudentParams
from redistill.train_params import TrainParams
from redistill.training import train

DEFAULT_VARIANTS = ('lora={"train": {"method": "lora"}}',)
GREEDY = "greedy={}"


def holdout_split(rows: list[dict], size: int) -> tuple[list[dict], list[dict]]:
    """(train, test): the ``size`` rows with the smallest sentence ids (hashes) are the test set."""
    ordered = sorted(rows, key=lambda row: row["id"])
    return ordered[size:], ordered[:size]


def distinct(rows: list[dict]) -> list[dict]:
    """The first row of each sentence (the post's data repeats some sentences up to 8 times)."""
    seen: dict[str, dict] = {}
    for row in rows:
        seen.setdefault(row["id"], row)
    return list(seen.values())


def parse_settings(settings: list[str]) -> dict:
    """``section.key=value`` settings (as `dvc exp run -S`, values read as YAML) as nested params overrides."""
    overrides: dict = {}
    for setting in settings:
        path, _, value = setting.partition("=")
        *sections, key = path.split(".")
        block = overrides
        for section in sections:
            block = block.setdefault(section, {})
        block[key] = yaml.safe_load(value)
    return overrides


def named(specs: list[str]) -> dict[str, dict]:
    """``NAME={params overrides as JSON}`` specs by name."""
    return {name: json.loads(overrides or "{}") for name, _, overrides in (spec.partition("=") for spec in specs)}


def train_once(params: dict, train_rows: list[dict], workdir: Path) -> dict:
    """The train stage's training with these params; the trained folder is ``workdir/adapter``."""
    train_params = load_block(TrainParams, "train", params)
    student = load_block(StudentParams, "student", params)
    metrics, trained = train(
        train_params,
        student,
        student.prompt(teacher_prompt(params)),
        train_rows,
        [],
        workdir / "adapter",
        workdir / "checkpoints",
        log_dir=None,
    )
    del trained
    return metrics


def answer(loaded, params: dict, rows: list[dict], workdir: Path, name: str) -> dict:
    """The evaluate stage's scores of ``loaded`` on ``rows`` under these params' decoding; answers to a file."""
    eval_params = load_block(EvalParams, "evaluate", params)
    outputs, seconds = student_outputs(loaded, [row["text"] for row in rows], eval_params, name)
    golds = [answer_text(row["triples"]) for row in rows]
    answers = [
        {"id": row["id"], "text": row["text"], "gold": gold, "answer": output.text}
        for row, gold, output in zip(rows, golds, outputs, strict=True)
    ]
    write_jsonl(workdir / f"answers-{name}.jsonl", answers)
    return model_metrics(golds, outputs, seconds)


def run_variant(params: dict, train_rows: list[dict], tests: dict, decodings: dict, workdir: Path) -> dict:
    """Train once, then score every test set under every decoding."""
    started = time.monotonic()
    metrics = train_once(params, train_rows, workdir)
    return {
        "train": metrics,
        "eval": evaluate(workdir, params, tests, decodings),
        "seconds": time.monotonic() - started,
    }


def evaluate(workdir: Path, params: dict, tests: dict, decodings: dict) -> dict:
    """The model in ``workdir/adapter`` scored on every test set under every decoding."""
    loaded = load_trained(str(workdir / "adapter"))
    return {
        decoding: {
            test: answer(loaded, with_overrides(params, overrides), rows, workdir, f"{decoding}-{test}")
            for test, rows in tests.items()
        }
        for decoding, overrides in decodings.items()
    }


def score_soup(folders: list[Path], workdir: Path, params: dict, tests: dict, decodings: dict) -> dict:
    """The soup of ``folders`` in ``workdir/adapter``, scored as a trained run is."""
    started = time.monotonic()
    soup(folders, workdir / "adapter")
    return {"train": {}, "eval": evaluate(workdir, params, tests, decodings), "seconds": time.monotonic() - started}


def logged(workdir: Path, function, *args):
    """``function(*args)`` with this process's output in ``workdir/log.txt`` (parallel runs would interleave)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / "log.txt").open("w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        return function(*args)


def soup(folders: list[Path], out: Path) -> None:
    """A model folder whose weights are the mean of those of ``folders`` (whole models of one architecture)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folders[0], out, dirs_exist_ok=True)
    states = [load_file(folder / "model.safetensors") for folder in folders]
    mean = {name: sum(state[name].float() for state in states) / len(states) for name in states[0]}
    save_file({name: mean[name].to(tensor.dtype) for name, tensor in states[0].items()}, out / "model.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="folder of the student (the demo's: models/base)")
    parser.add_argument("--data", required=True, help="labelled JSONL, or the post's JSON list of {text, gold_re}")
    parser.add_argument("--post-test", help="the post's 20 test sentences (all_tests.json): scored on their own")
    parser.add_argument("--params", default="params.yaml", help="the recipe (the demo's: demo/params.yaml)")
    parser.add_argument("--set", action="append", default=[], help="section.key=value over --params; repeatable")
    parser.add_argument("--variant", action="append", help="NAME={params overrides as JSON}, trained; repeatable")
    parser.add_argument("--decode", action="append", help="NAME={params overrides}, decoded per variant; repeatable")
    parser.add_argument("--seeds", default="17,18", help="train.seed of each run of a variant (comma-separated)")
    parser.add_argument("--holdout", type=int, default=100)
    parser.add_argument("--train-sentences", type=int, help="train on this many of the rest (default: all)")
    parser.add_argument("--parallel", type=int, default=1, help="runs trained at once, each in its own process")
    parser.add_argument("--soup", action="store_true", help="also score the mean of each full variant's seeds")
    parser.add_argument("--work", default="quality-work")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    params = bench_params(Path(args.student).resolve(), parse_settings(args.set), source=args.params)
    post_test = distinct(labelled_rows(args.post_test)) if args.post_test else []
    never_trained = {row["id"] for row in post_test}
    rows = [row for row in distinct(labelled_rows(args.data)) if row["id"] not in never_trained]
    train_rows, holdout = holdout_split(rows, args.holdout)
    train_rows = train_rows[: args.train_sentences]
    tests = {"holdout": holdout} | ({"post20": post_test} if post_test else {})
    decodings = named(args.decode or [GREEDY])
    results = {"device": device_name(), "torch": torch.__version__, "settings": args.set, "runs": {}}
    results |= {"train_sentences": len(train_rows), "tests": {name: len(rows) for name, rows in tests.items()}}
    runs = {
        f"{variant}-seed{seed}": (
            variant,
            seed,
            with_overrides(with_overrides(params, overrides), {"train": {"seed": seed}}),
        )
        for variant, overrides in named(args.variant or list(DEFAULT_VARIANTS)).items()
        for seed in (int(seed) for seed in args.seeds.split(","))
    }
    work = Path(args.work).resolve()
    with ProcessPoolExecutor(args.parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {}
        for run, (variant, seed, run_params) in runs.items():
            job = pool.submit(logged, work / run, run_variant, run_params, train_rows, tests, decodings, work / run)
            jobs[job] = (run, {"variant": variant, "seed": seed})
        collect(jobs, results, args.out)
        if args.soup:
            jobs = {}
            for variant, (variant_params, folders) in full_models(runs, work).items():
                run = f"{variant}-soup"
                job = pool.submit(logged, work / run, score_soup, folders, work / run, variant_params, tests, decodings)
                jobs[job] = (run, {"variant": run, "seed": 0})
            collect(jobs, results, args.out)
    print(table(results))


def full_models(runs: dict, work: Path) -> dict[str, tuple[dict, list[Path]]]:
    """Of each variant that trains every weight: its first run's params, and its runs' trained folders."""
    folders: dict[str, tuple[dict, list[Path]]] = {}
    for run, (variant, _, run_params) in runs.items():
        if load_block(TrainParams, "train", run_params).method == "full":
            folders.setdefault(variant, (run_params, []))[1].append(work / run / "adapter")
    return folders


def collect(jobs: dict, results: dict, out: str) -> None:
    """Each job's result as it finishes, written at once: what has run so far survives a later run's failure."""
    for job in as_completed(jobs):
        run, facts = jobs[job]
        results["runs"][run] = job.result() | facts
        write_json(out, results)
        print(run, json.dumps({d: e["holdout"]["exact"]["f1"] for d, e in results["runs"][run]["eval"].items()}))


def spread(values: list[float]) -> str:
    """The mean, and the range over the seeds."""
    mean = sum(values) / len(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"


def table(results: dict) -> str:
    """One row per variant and decoding: each test set's exact F1 (mean over seeds, range), and on the held-out
    sentences lenient F1, exact P and R, the share of answers ended at EOS and of well-formed lines."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in results["runs"].values():
        for decoding, scores in run["eval"].items():
            groups.setdefault((run["variant"], decoding), []).append(scores)
    tests = list(results["tests"])
    lines = [
        f"{results['device']}, torch {results['torch']}: {results['train_sentences']} train sentences; "
        + ", ".join(f"{name} {count}" for name, count in results["tests"].items()),
        "| variant | decoding | " + " | ".join(f"{test} exact F1" for test in tests)
        + " | lenient F1 | P | R | ended at EOS | well-formed |",
        "|---|---|" + "---:|" * (len(tests) + 5),
    ]  # fmt: skip
    for (variant, decoding), runs in groups.items():
        held = [run["holdout"] for run in runs]
        cells = [spread([run[test]["exact"]["f1"] for run in runs]) for test in tests]
        cells += [spread([h["lenient"]["f1"] for h in held])]
        cells += [spread([h["exact"][key] for h in held]) for key in ("precision", "recall")]
        cells += [spread([h[key] for h in held]) for key in ("ended_at_eos_share", "well_formed_share")]
        lines.append(f"| {variant} | {decoding} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
