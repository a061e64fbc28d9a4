"""The split stage's logic: a seeded split into train/val/test in which no sentence is in two splits."""

import random
from dataclasses import dataclass

from redistill.errors import PipelineError
from redistill.params import require
from redistill.sentences import sentence_id


@dataclass(frozen=True)
class SplitParams:
    seed: int
    test_size: int | float
    val_size: int | float

    def validate(self) -> None:
        for key, size in (("split.test_size", self.test_size), ("split.val_size", self.val_size)):
            if isinstance(size, float):
                require(0 <= size < 1, key, f"as a fraction must be in [0, 1), got {size}")
            else:
                require(size >= 0, key, f"as a count must be >= 0, got {size}")
        require(bool(self.test_size), "split.test_size", "must be positive: the evaluate stage needs a test set")


def resolve_size(size: int | float, total: int) -> int:
    """A count as is; a fraction of ``total`` rounded to the nearest sentence."""
    return round(size * total) if isinstance(size, float) else size


def split_records(records: list[dict], params: SplitParams) -> tuple[dict[str, list[dict]], dict]:
    """Split labelled records that have triples; records keep their input order within each split."""
    groups: dict[str, list[int]] = {}
    unlabeled = 0
    for index, record in enumerate(records):
        if not record["triples"]:
            unlabeled += 1
            continue
        # Grouping by the id of the normalised text keeps duplicates together even if an upstream stage let one in.
        groups.setdefault(sentence_id(record["text"]), []).append(index)
    keys = sorted(groups)
    random.Random(params.seed).shuffle(keys)
    n_test = resolve_size(params.test_size, len(keys))
    n_val = resolve_size(params.val_size, len(keys))
    if n_test + n_val >= len(keys):
        raise PipelineError(
            f"split.test_size ({n_test}) + split.val_size ({n_val}) leave no training data: "
            f"only {len(keys)} labelled sentences; lower them"
        )
    chosen = {"test": keys[:n_test], "val": keys[n_test : n_test + n_val], "train": keys[n_test + n_val :]}
    splits = {}
    for name, names in chosen.items():
        indices = sorted(index for key in names for index in groups[key])
        splits[name] = [records[index] for index in indices]
    counts = {"labeled": len(records), "unlabeled_dropped": unlabeled} | {
        name: len(rows) for name, rows in splits.items()
    }
    return splits, counts
