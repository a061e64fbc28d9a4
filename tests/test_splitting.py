import pytest

from redistill.errors import PipelineError
from redistill.sentences import normalize
from redistill.splitting import SplitParams, split_records


def labeled(n, dupes=0):
    rows = [{"id": str(i), "text": f"Sentence {i} is here.", "triples": [["S", "is", str(i)]]} for i in range(n)]
    rows += [{"id": "d", "text": f"sentence {i}  IS here.", "triples": [["S", "is", str(i)]]} for i in range(dupes)]
    return rows


def test_counts_and_fractions():
    splits, counts = split_records(labeled(100), SplitParams(seed=17, test_size=20, val_size=0.1))
    assert (len(splits["test"]), len(splits["val"]), len(splits["train"])) == (20, 10, 70)
    assert counts == {"labeled": 100, "unlabeled_dropped": 0, "test": 20, "val": 10, "train": 70}


def test_seeded_and_deterministic():
    a, _ = split_records(labeled(50), SplitParams(seed=1, test_size=10, val_size=0))
    b, _ = split_records(labeled(50), SplitParams(seed=1, test_size=10, val_size=0))
    c, _ = split_records(labeled(50), SplitParams(seed=2, test_size=10, val_size=0))
    assert a == b and a["test"] != c["test"]


def test_no_normalised_sentence_is_in_two_splits():
    splits, _ = split_records(labeled(30, dupes=30), SplitParams(seed=3, test_size=0.3, val_size=0.2))
    seen = {name: {normalize(r["text"]) for r in rows} for name, rows in splits.items()}
    assert not seen["train"] & seen["test"] and not seen["train"] & seen["val"] and not seen["val"] & seen["test"]
    assert sum(len(rows) for rows in splits.values()) == 60


def test_sentences_without_triples_are_dropped_and_counted():
    rows = [*labeled(10), {"id": "e", "text": "Nothing here.", "triples": []}]
    splits, counts = split_records(rows, SplitParams(seed=0, test_size=2, val_size=0))
    assert counts["unlabeled_dropped"] == 1
    assert all(r["triples"] for rows in splits.values() for r in rows)


def test_test_size_larger_than_the_data():
    with pytest.raises(PipelineError, match=r"leave no training data: only 10 labelled sentences"):
        split_records(labeled(10), SplitParams(seed=0, test_size=10, val_size=0))
