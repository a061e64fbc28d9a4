"""The `redistill` command: `score`, `extract`, `merge` and `graph` (`redistill COMMAND --help`)."""

import argparse
import json
import sys
from pathlib import Path

from redistill import extraction, graph, merging
from redistill.errors import PipelineError
from redistill.io import read_records
from redistill.scoring import MODES, score


def score_file(path: str, gold_key: str, pred_key: str) -> dict:
    """Score the raw answer strings under ``pred_key`` against those under ``gold_key`` in each record."""
    if Path(path).suffix not in (".json", ".jsonl"):
        raise PipelineError(f"{path}: expected a .json list or a .jsonl file of objects")
    records = read_records(path)
    if not records:
        raise PipelineError(f"{path}: no records to score")
    pairs = []
    for index, record in enumerate(records):
        for key in (gold_key, pred_key):
            if not isinstance(record.get(key), str):
                raise PipelineError(f"{path}: record {index} has no string field {key!r}")
        pairs.append((record[gold_key], record[pred_key]))
    return score(pairs)


def format_table(result: dict) -> str:
    lines = [f"{'':8} {'precision':>9} {'recall':>7} {'f1':>7} {'tp':>6} {'fp':>6} {'fn':>6}"]
    for mode in MODES:
        row = result[mode]
        lines.append(
            f"{mode:8} {row['precision']:9.4f} {row['recall']:7.4f} {row['f1']:7.4f} "
            f"{row['tp']:6d} {row['fp']:6d} {row['fn']:6d}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="redistill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    scorer = commands.add_parser("score", help="score predicted triples against gold ones (micro P/R/F1)")
    scorer.add_argument("file", help="a JSON list or JSONL file of objects")
    scorer.add_argument("--gold", required=True, help="field holding the gold answer string")
    scorer.add_argument("--pred", required=True, help="field holding the predicted answer string")
    scorer.add_argument("--json", action="store_true", help="print the result as JSON")
    for command in (extraction, merging, graph):
        command.add_parser(commands)
    args = parser.parse_args(argv)
    try:
        if args.command != "score":
            args.run(args)
            return 0
        result = score_file(args.file, args.gold, args.pred)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
