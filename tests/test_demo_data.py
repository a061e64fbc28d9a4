"""The shipped demo corpus and cassette: big enough, with the traps, and a recorded answer for every sentence."""

from collections import Counter

import yaml
from conftest import ROOT

from redistill.io import read_jsonl
from redistill.params import load_block
from redistill.sampling import SampleParams, sample_sentences
from redistill.sentences import sentence_id
from redistill.triples import clean_label

DEMO = ROOT / "demo"
DEMO_PARAMS = yaml.safe_load((DEMO / "params.yaml").read_text())
CORPUS = read_jsonl(DEMO / DEMO_PARAMS["sample"]["source"])
CASSETTE = read_jsonl(DEMO / DEMO_PARAMS["teacher"]["cassette"])


def sampled() -> tuple[list[dict], dict]:
    return sample_sentences(CORPUS, load_block(SampleParams, "sample", DEMO_PARAMS))


def test_corpus_has_the_size_and_variety_the_demo_needs():
    categories = Counter(record["category"] for record in CORPUS)
    assert len(CORPUS) >= 300 and categories["information_extraction"] >= 200 and len(categories) >= 6
    assert all(set(record) == {"instruction", "context", "response", "category"} for record in CORPUS)
    contexts = [record["context"] for record in CORPUS if record["category"] == "information_extraction"]
    assert sum("\n" in context for context in contexts) >= 20
    for trap in ("U.S.", "Dr.", "J. R. R.", "No. 5", "(b. ", "e.g.", "St.", "Mt."):
        assert any(trap in context for context in contexts), trap


def test_every_filter_has_something_to_do():
    _, counts = sampled()
    assert counts["records"] > counts["in_category"] > counts["in_length"] > counts["distinct"] >= 150


def test_every_kept_sentence_has_exactly_one_recorded_answer_and_none_is_unused():
    sentences, _ = sampled()
    recorded = Counter(sentence_id(entry["text"]) for entry in CASSETTE)
    assert max(recorded.values()) == 1
    assert set(recorded) == {sentence["id"] for sentence in sentences}


def test_recorded_answers_are_mostly_clean_with_some_realistic_noise():
    parsed = [clean_label(entry["answer"]) for entry in CASSETTE]
    assert all(answer.triples for answer in parsed)
    noisy = sum(bool(answer.malformed or answer.prose) for answer in parsed)
    assert 5 <= noisy <= len(parsed) // 5
