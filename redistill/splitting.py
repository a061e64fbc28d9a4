"""The split stage's logic: a seeded split into train/val/test in which no sentence is in two splits."""

import random
from dataclasses import dataclass

from redistill.errors import PipelineError
from redistill.params import Check, at_least, in_range, param
from redistill.sentences import sentence_id


def _size_check() -> Check:
    """A count of sentences (an integer) or a fraction of them (a number); the error says which it was read as."""
    count, fraction = at_least(0), in_range(0, 1)

    def rule_for(size: int | float) -> Check:
        return fraction if isinstance(size, float) else count

    return Check(
        f"a count {count.rule} or a fraction {fraction.rule}",
        lambda size: rule_for(size).holds(size),
        lambda size: f"as a {'fraction' if isinstance(size, float) else 'count'} {rule_for(size).error(size)}",
    )


SIZE = _size_check()


@dataclass(frozen=True)
class SplitParams:
    seed: int = param("seed of the split, as in the post")
    test_size: int | float = param(
        "a count (`20`) or a fraction of the labelled sentences (`0.1`)",
        SIZE,
        Check("not 0", bool, lambda _: "must be positive: the evaluate stage needs a test set"),
    )
    val_size: int | float = param("the same for the validation set (its loss is logged each epoch); `0` for none", SIZE)


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
