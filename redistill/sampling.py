"""The sample stage's logic: load a dolly-format corpus, cut first sentences, filter, de-duplicate."""

import random
from dataclasses import dataclass
from pathlib import Path

from redistill.errors import PipelineError
from redistill.io import read_records
from redistill.params import at_least, naming, or_null, param, positive, require
from redistill.sentences import first_sentence, normalize, sentence_id

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


@dataclass(frozen=True)
class SampleParams:
    source: str = param(
        "a Hugging Face dataset id, or a local `.json` (a list), `.jsonl` or `.parquet` file with dolly's fields "
        "(`instruction`, `context`, `response`, `category`)",
        naming("a Hugging Face dataset id or a local file"),
    )
    revision: str | None = param(
        "commit of a hub dataset (dolly-15k's main since 2023-06-30); how to move it: "
        "[teacher.md](teacher.md#the-pinned-dolly-revision)"
    )
    category: str | None = param("keep records of this category; `null` keeps all")
    field: str = param("the field whose first sentence is taken", naming("a field of the records, e.g. context"))
    min_chars: int = param(
        "keep sentences with `min_chars < length < max_chars` (exclusive, as in the post)", at_least(0)
    )
    max_chars: int = param("the upper bound of that length filter (exclusive)")
    limit: int | None = param(
        "keep a seeded random subset of this many sentences (in corpus order); `null` keeps all", or_null(positive)
    )
    seed: int = param("seed of that subset")

    def validate(self) -> None:
        require(
            self.min_chars < self.max_chars,
            "sample.min_chars",
            f"must be smaller than sample.max_chars ({self.min_chars} >= {self.max_chars})",
        )


def is_local(source: str) -> bool:
    """A path rather than a Hub id: a local file's suffix, an existing file, or a shape no Hub id has.

    Hub ids are ``name`` or ``owner/name``; ``./x``, ``/x``, ``~/x``, ``a/b/c`` and ``data/x`` (where ``data/`` is a
    local folder) are paths, so a missing file is reported as missing rather than looked up on the Hub.
    """
    path = Path(source)
    return (
        source.endswith(LOCAL_SUFFIXES)
        or path.exists()
        or source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or (len(path.parts) == 2 and path.parent.is_dir())
    )


def load_source(source: str, revision: str | None = None) -> list[dict]:
    """Records from a local .json/.jsonl/.parquet file, or the train split of a Hugging Face dataset."""
    if is_local(source):
        return read_records(source)
    import datasets

    try:
        return datasets.load_dataset(source, split="train", revision=revision).to_list()
    except Exception as error:  # the hub raises many types; all mean the same thing to the user
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise PipelineError(
            f"could not load dataset {source!r} from the Hugging Face Hub ({reason}); "
            "check the id and your network, or set sample.source to a local .json/.jsonl/.parquet file"
        ) from None


def sample_sentences(records: list[dict], params: SampleParams, source: str = "source") -> tuple[list[dict], dict]:
    """First sentences that pass the filters, de-duplicated, in corpus order; and the count after each filter."""
    counts = {"records": len(records)}
    if params.category is not None:
        for index, record in enumerate(records):
            if "category" not in record:
                raise PipelineError(f"{source}: record {index} has no 'category' field; set sample.category to null")
        records = [record for record in records if record["category"] == params.category]
    counts["in_category"] = len(records)

    cut = []
    for index, record in enumerate(records):
        value = record.get(params.field)
        if value is None:
            raise PipelineError(f"{source}: record {index} has no {params.field!r} field (sample.field)")
        if not isinstance(value, str):
            raise PipelineError(f"{source}: record {index} field {params.field!r} is not a string")
        if value.strip():
            cut.append(first_sentence(value))
    counts["with_text"] = len(cut)

    cut = [text for text in cut if params.min_chars < len(text) < params.max_chars]
    counts["in_length"] = len(cut)

    seen: set[str] = set()
    distinct = []
    for text in cut:
        key = normalize(text)
        if key not in seen:
            seen.add(key)
            distinct.append(text)
    counts["distinct"] = len(distinct)

    if params.limit is not None and params.limit < len(distinct):
        chosen = sorted(random.Random(params.seed).sample(range(len(distinct)), params.limit))
        distinct = [distinct[index] for index in chosen]
    counts["kept"] = len(distinct)

    if not distinct:
        raise PipelineError(
            f"{source}: no sentence left after the filters ({counts}); "
            "check sample.category, sample.field and sample.min_chars/max_chars"
        )
    return [{"id": sentence_id(text), "text": text} for text in distinct], counts
