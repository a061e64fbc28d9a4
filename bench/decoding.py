"""Benchmark the decoding settings (evaluate.decoding, `redistill extract`'s options) on one model, CPU or GPU.

On the same sentences, one generator per setting: greedy (the default), structured, self-consistency (8 samples at
temperature 0.7, a triple kept when 3 hold it), beam search (4 beams),
the last two structured, and the small student's recipe (16 samples, 5 votes, structured). Per setting: the
time per sentence, the tokens decoded, what the answers look like (triples, well-formed lines, answers ended at the
end-of-turn token), and how many answers are the same as greedy's. The cost of a setting is its time against
greedy's; its worth is measured on the test split (bench/quality.py), not here.

    python bench/decoding.py --model FOLDER --data demo/corpus/dolly.jsonl --sentences 20 --out results.json

``--model``: a model folder (a merged student, a converted base) or an adapter folder. ``--data``: JSON(L) records
with a text field, or Dolly's (its `context`), cut into sentences.
"""

import argparse
import json
import time

import torch

from redistill.decoding import Decoding
from redistill.evaluation import model_metrics
from redistill.generation import Generator
from redistill.io import read_records, write_json
from redistill.models import load_trained
from redistill.sentences import split_sentences

SETTINGS = {  # short names: bench/extract.py's --decodings takes them comma-separated
    "greedy": Decoding(),
    "structured": Decoding(structured=True),
    "sc8": Decoding(samples=8, temperature=0.7, min_votes=3),
    "beams4": Decoding(num_beams=4),
    "sc8-structured": Decoding(samples=8, temperature=0.7, min_votes=3, structured=True),
    "beams4-structured": Decoding(num_beams=4, structured=True),
    "sc16-structured": Decoding(samples=16, temperature=0.7, min_votes=5, structured=True),  # the small student's
}


def sentences_of(path: str, count: int) -> list[str]:
    sentences = []
    for record in read_records(path):
        text = record.get("text") or record.get("context") or ""
        sentences += [sentence for _, sentence in split_sentences(text)]
        if len(sentences) >= count:
            break
    return sentences[:count]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(name: str, decoding: Decoding, extractor, texts: list[str], args, greedy: list[str] | None) -> dict:
    generator = Generator(
        extractor.model,
        extractor.tokenizer,
        extractor.system_prompt,
        args.new_tokens,
        args.batch_size,
        decoding=decoding,
    )
    generator.generate(texts[: generator.sentences_per_batch], progress=False)  # warm-up: prefix, tables, graph
    device = generator.device
    synchronize(device)
    started = time.perf_counter()
    outputs = generator.generate(texts, progress=False)
    synchronize(device)
    seconds = time.perf_counter() - started
    metrics = model_metrics([""] * len(texts), outputs, seconds)
    row = {
        "setting": name,
        "seconds": round(seconds, 2),
        "seconds_per_sentence": round(seconds / len(texts), 3),
        "decoded_tokens": sum(output.new_tokens for output in outputs),
        "mean_triples": round(metrics["mean_triples"], 2),
        "well_formed_share": round(metrics["well_formed_share"], 3),
        "ended_at_eos_share": round(metrics["ended_at_eos_share"], 3),
        "same_as_greedy": None if greedy is None else sum(a.text == b for a, b in zip(outputs, greedy, strict=True)),
    }
    print(json.dumps(row), flush=True)
    return row | {"answers": [output.text for output in outputs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default="demo/corpus/dolly.jsonl")
    parser.add_argument("--sentences", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32, help="rows decoded together, as evaluate.batch_size")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--settings", help="comma-separated names of SETTINGS to run (default: all)")
    parser.add_argument("--threads", type=int, help="torch's CPU threads")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    texts = sentences_of(args.data, args.sentences)
    started = time.perf_counter()
    extractor = load_trained(args.model, device=args.device)
    load_seconds = time.perf_counter() - started
    names = args.settings.split(",") if args.settings else list(SETTINGS)
    runs, greedy = [], None
    for name in names:
        row = run(name, SETTINGS[name], extractor, texts, args, greedy)
        greedy = row["answers"] if name == "greedy" else greedy
        runs.append(row)
    base = next((row["seconds"] for row in runs if row["setting"] == "greedy"), None)
    print(f"\n{args.model}, {len(texts)} sentences, cap {args.new_tokens}, batch {args.batch_size} rows")
    for row in runs:
        ratio = f"{row['seconds'] / base:5.1f}x greedy" if base else ""
        print(
            f"{row['seconds_per_sentence']:7.3f} s/sentence {ratio}  {row['decoded_tokens']:6d} tokens  "
            f"{row['mean_triples']:5.2f} triples  well-formed {row['well_formed_share']:.2f}  "
            f"ended {row['ended_at_eos_share']:.2f}  same as greedy {row['same_as_greedy']}  {row['setting']}"
        )
    if args.out:
        results = {"model": args.model, "torch": torch.__version__, "load_seconds": round(load_seconds, 1)}
        results |= {"sentences": len(texts), "new_tokens": args.new_tokens, "batch_size": args.batch_size}
        write_json(args.out, results | {"runs": [{k: v for k, v in r.items() if k != "answers"} for r in runs]})


if __name__ == "__main__":
    main()
