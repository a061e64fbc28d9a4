"""Stage split: labelled sentences -> data/{train,val,test}.jsonl, seeded, with no sentence in two splits."""

from redistill import paths
from redistill.errors import run_stage
from redistill.io import read_jsonl, write_json, write_jsonl
from redistill.params import load_block, read_params_file
from redistill.splitting import SplitParams, split_records


def main() -> None:
    params = load_block(SplitParams, "split", read_params_file())
    splits, counts = split_records(read_jsonl(paths.LABELED), params)
    print(", ".join(f"{name} {count}" for name, count in counts.items()))
    for name, records in splits.items():
        write_jsonl(paths.SPLITS[name], records)
    write_json(paths.METRICS / "split.json", counts)


if __name__ == "__main__":
    run_stage(main)
