"""Stage sample: dolly-format corpus -> first sentences, filtered and de-duplicated -> data/sentences.jsonl."""

from redistill import paths
from redistill.errors import run_stage
from redistill.io import write_json, write_jsonl
from redistill.params import load_block, read_params_file
from redistill.sampling import SampleParams, load_source, sample_sentences


def main() -> None:
    params = load_block(SampleParams, "sample", read_params_file())
    records = load_source(params.source, params.revision)
    sentences, counts = sample_sentences(records, params, source=params.source)
    print(" -> ".join(f"{name} {count}" for name, count in counts.items()))
    write_jsonl(paths.SENTENCES, sentences)
    write_json(paths.METRICS / "sample.json", counts)


if __name__ == "__main__":
    run_stage(main)
