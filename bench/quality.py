"""Same quality: the student trained through the train stage, scored by exact F1 on sentences it never saw.

The post's labelled sentences (or redistill's labelled JSONL) are split by sentence hash: the `--holdout` sentences
with the smallest ids are the test set, the rest train. For each variant (a set of train-key overrides: packing off
and on by default) the stage's `train()` fine-tunes the student with the recipe from `--params` and `--set`, and the
evaluate stage's code has the merged model answer the held-out sentences. Prints one table; runs on CPU or GPU.

    python bench/quality.py --student models/base --data sft_dataset.json --params demo/params.yaml --out q.json

`--set train.packing=true` and the like change one key of the recipe (docs/training.md has the whole command).
"""

import argparse
import json
import time
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

DEFAULT_VARIANTS = ('padded={"packing": false}', 'packed={"packing": true}')


def holdout_split(rows: list[dict], size: int) -> tuple[list[dict], list[dict]]:
    """(train, test): the ``size`` rows with the smallest sentence ids (hashes) are the test set."""
    ordered = sorted(rows, key=lambda row: row["id"])
    return ordered[size:], ordered[:size]


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


def run_variant(params: dict, overrides: dict, train_rows, test_rows, workdir: Path) -> dict:
    params = with_overrides(params, {"train": overrides})
    train_params = load_block(TrainParams, "train", params)
    student = load_block(StudentParams, "student", params)
    eval_params = load_block(EvalParams, "evaluate", params)
    system_prompt = student.prompt(teacher_prompt(params))
    adapter = workdir / "adapter"
    train_metrics, trained = train(
        train_params, student, system_prompt, train_rows, [], adapter, workdir / "checkpoints", log_dir=None
    )
    del trained
    texts = [row["text"] for row in test_rows]
    outputs, seconds = student_outputs(load_trained(str(adapter)), texts, eval_params, workdir.name)
    golds = [answer_text(row["triples"]) for row in test_rows]
    answers = [
        {"id": row["id"], "gold": gold, "answer": output.text}
        for row, gold, output in zip(test_rows, golds, outputs, strict=True)
    ]
    write_jsonl(workdir / "answers.jsonl", answers)
    return {"train": train_metrics, "eval": model_metrics(golds, outputs, seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="folder of the student (the demo's: models/base)")
    parser.add_argument("--data", required=True, help="labelled JSONL, or the post's JSON list of {text, gold_re}")
    parser.add_argument("--params", default="params.yaml", help="the recipe (the demo's: demo/params.yaml)")
    parser.add_argument("--set", action="append", default=[], help="section.key=value over --params; repeatable")
    parser.add_argument("--variant", action="append", help="NAME={train overrides as JSON}; repeatable")
    parser.add_argument("--holdout", type=int, default=100)
    parser.add_argument("--train-sentences", type=int, help="train on this many of the rest (default: all)")
    parser.add_argument("--work", default="quality-work")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    params = bench_params(Path(args.student).resolve(), parse_settings(args.set), source=args.params)
    train_rows, test_rows = holdout_split(labelled_rows(args.data), args.holdout)
    train_rows = train_rows[: args.train_sentences]
    results = {"device": device_name(), "torch": torch.__version__}
    results |= {"train_sentences": len(train_rows), "test_sentences": len(test_rows), "settings": args.set}
    for variant in args.variant or DEFAULT_VARIANTS:
        name, _, overrides = variant.partition("=")
        workdir = Path(args.work).resolve() / name
        started = time.monotonic()
        results[name] = run_variant(params, json.loads(overrides), train_rows, test_rows, workdir)
        results[name]["seconds"] = time.monotonic() - started
        write_json(args.out, results)
        print(name, json.dumps(results[name]["eval"]["exact"]), flush=True)
    print(table(results))


def table(results: dict) -> str:
    lines = [
        f"{results['device']}, torch {results['torch']}: {results['train_sentences']} train, "
        f"{results['test_sentences']} held-out sentences",
        "| variant | exact F1 | lenient F1 | final train loss | train s | tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, result in results.items():
        if isinstance(result, dict) and "eval" in result:
            scores, trained = result["eval"], result["train"]
            lines.append(
                f"| {name} | {scores['exact']['f1']:.3f} | {scores['lenient']['f1']:.3f} | {trained['final_loss']:.3f} "
                f"| {trained['runtime_seconds']:.0f} | {trained['tokens_per_second']:,.0f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
