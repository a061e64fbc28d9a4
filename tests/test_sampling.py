import json

import pytest
from conftest import dolly, write_jsonl

from redistill.errors import PipelineError
from redistill.io import read_jsonl, read_records
from redistill.sampling import SampleParams, load_source, sample_sentences

PARAMS = SampleParams(
    source="x.jsonl",
    revision=None,
    category="information_extraction",
    field="context",
    min_chars=30,
    max_chars=170,
    limit=None,
    seed=17,
)


def params(**changes):
    return SampleParams(**{**PARAMS.__dict__, **changes})


RECORDS = [
    dolly("The U.S. Army was founded in 1775 by the Continental Congress. It grew."),
    dolly("Too short here. Yes, it is."),
    dolly("A" * 80 + " " + "b" * 100 + ". Then more."),
    dolly("the u.s. army was founded in 1775 by the  Continental\nCongress. A duplicate."),
    dolly("Paris is the capital and largest city of France. It is old.", category="open_qa"),
    dolly(""),
    dolly("Dr. Jane Smith was born in Leeds in 1950 to a family of doctors. She studied."),
]


def test_filters_are_counted_in_order():
    sentences, counts = sample_sentences(RECORDS, PARAMS)
    assert counts == {"records": 7, "in_category": 6, "with_text": 5, "in_length": 3, "distinct": 2, "kept": 2}
    assert [s["text"] for s in sentences] == [
        "The U.S. Army was founded in 1775 by the Continental Congress.",
        "Dr. Jane Smith was born in Leeds in 1950 to a family of doctors.",
    ]


def test_length_bounds_are_exclusive():
    exactly_30 = "x" * 29 + "."
    exactly_31 = "x" * 30 + "."
    sentences, _ = sample_sentences([dolly(exactly_30), dolly(exactly_31)], params(max_chars=32))
    assert [s["text"] for s in sentences] == [exactly_31]
    kept, _ = sample_sentences([dolly("y" * 31 + ".")], params(max_chars=33))
    assert [s["text"] for s in kept] == ["y" * 31 + "."]
    with pytest.raises(PipelineError):
        sample_sentences([dolly("y" * 31 + ".")], params(max_chars=32))


def test_category_null_keeps_every_category():
    _, counts = sample_sentences(RECORDS, params(category=None))
    assert counts["in_category"] == 7 and counts["kept"] == 3


def test_ids_are_stable_hashes_of_the_normalised_text():
    first, _ = sample_sentences(RECORDS, PARAMS)
    again, _ = sample_sentences(list(RECORDS), PARAMS)
    assert first == again
    assert len({s["id"] for s in first}) == len(first)


def test_limit_is_a_seeded_subset_in_corpus_order():
    many = [dolly(f"Sentence number {i} is long enough to be kept here. Next.") for i in range(50)]
    a, counts = sample_sentences(many, params(limit=10, seed=1))
    b, _ = sample_sentences(many, params(limit=10, seed=1))
    c, _ = sample_sentences(many, params(limit=10, seed=2))
    assert a == b and a != c and counts["kept"] == 10
    numbers = [int(s["text"].split()[2]) for s in a]
    assert numbers == sorted(numbers)


def test_nothing_left_is_an_error():
    with pytest.raises(PipelineError, match="no sentence left after the filters"):
        sample_sentences(RECORDS, params(category="brainstorming"))


def test_missing_fields_name_the_record():
    with pytest.raises(PipelineError, match="record 1 has no 'context' field"):
        sample_sentences(
            [dolly("Fine sentence that is long enough to keep."), {"category": "information_extraction"}], PARAMS
        )
    with pytest.raises(PipelineError, match="record 0 has no 'category' field"):
        sample_sentences([{"context": "x"}], PARAMS)


def test_local_formats_load_alike(tmp_path):
    jsonl = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps(RECORDS))
    import pyarrow
    import pyarrow.parquet

    as_parquet = tmp_path / "d.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(RECORDS), as_parquet)
    assert load_source(str(jsonl)) == load_source(str(as_json)) == load_source(str(as_parquet)) == RECORDS


def test_bad_files_are_reported_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    with pytest.raises(PipelineError, match=r"bad.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(PipelineError, match=r"bad.jsonl:1: expected a JSON object"):
        read_jsonl(path)
    with pytest.raises(PipelineError, match=r"missing\.jsonl: file not found"):
        load_source(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.json").write_text('{"a": 1}')
    with pytest.raises(PipelineError, match="expected a JSON list of objects"):
        read_records(tmp_path / "d.json")


def test_unreachable_hub_dataset_is_one_clear_error():
    with pytest.raises(PipelineError, match=r"could not load dataset 'nobody/no-such-dataset'.*set sample\.source"):
        load_source("nobody/no-such-dataset")
