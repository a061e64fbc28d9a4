"""The synthesize stage's logic: ask the teacher about each sentence (journal first), clean answers to triples."""

import time

from tqdm import tqdm

from redistill.prompts import chat_messages
from redistill.teacher import TeacherParams
from redistill.teacher.journal import TeacherJournal, request_key
from redistill.triples import clean_label


def label_sentences(
    sentences: list[dict], params: TeacherParams, teacher_factory, journal: TeacherJournal
) -> tuple[list[dict], dict]:
    """Labelled records in the order of ``sentences``, and the stage's counts.

    ``teacher_factory`` is called, before any request, only when some answer is missing from the journal, so a
    fully journalled re-run needs no key, no network and no cassette.
    """
    stats = dict.fromkeys(
        [
            "sentences",
            "api_calls",
            "cache_hits",
            "answers",
            "triples",
            "malformed_lines",
            "prose_lines",
            "empty_answers",
            "truncated_answers",
            "prompt_tokens",
            "completion_tokens",
        ],
        0,
    )
    stats["sentences"] = len(sentences)
    started = time.monotonic()
    requests = []
    for sentence in sentences:
        messages = chat_messages(sentence["text"], params.prompt)
        requests.append((sentence, messages, request_key(params.provider, params.model, messages, params.sampling)))
    missing = sum(journal.get(key) is None for _, _, key in requests)
    teacher = teacher_factory() if missing else None
    labeled = []
    for sentence, messages, key in tqdm(requests, desc="synthesize", unit="sentence"):
        entry = journal.get(key)
        if entry is None:
            completion = teacher.complete(messages)
            entry = {
                "key": key,
                "id": sentence["id"],
                "model": params.model,
                "answer": completion.text,
                "finish_reason": completion.finish_reason,
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
            }
            journal.append(entry)
            stats["api_calls"] += 1
            stats["prompt_tokens"] += completion.prompt_tokens
            stats["completion_tokens"] += completion.completion_tokens
        else:
            stats["cache_hits"] += 1
        parsed = clean_label(entry["answer"])
        stats["answers"] += 1
        stats["triples"] += len(parsed.triples)
        stats["malformed_lines"] += len(parsed.malformed)
        stats["prose_lines"] += len(parsed.prose)
        stats["empty_answers"] += not parsed.triples
        stats["truncated_answers"] += entry["finish_reason"] == "length"
        labeled.append({**sentence, "triples": [list(triple) for triple in parsed.triples], "raw": entry["answer"]})
    stats["seconds"] = round(time.monotonic() - started, 3)
    return labeled, stats
