"""The synthesize stage's logic: ask the teacher about each sentence (journal first), clean answers to triples."""

import asyncio
import sys
import time
from collections import Counter

from tqdm import tqdm

from redistill.errors import PipelineError
from redistill.prompts import chat_messages
from redistill.teacher import TeacherParams, make_limiter
from redistill.teacher.base import Completion
from redistill.teacher.batch import ask_batch
from redistill.teacher.engine import AskStats, Request, ask_all, estimate_prompt_tokens
from redistill.teacher.journal import TeacherJournal, request_key
from redistill.triples import clean_label

LABEL_COUNTS = ("triples", "malformed_lines", "prose_lines", "empty_answers", "truncated_answers")


def build_requests(texts: list[str], params: TeacherParams) -> list[Request]:
    requests = []
    for text in texts:
        messages = chat_messages(text, params.prompt)
        key = request_key(params.provider, params.model, messages, params.sampling)
        requests.append(Request(key, messages, estimate_prompt_tokens(messages), params.max_tokens))
    return requests


def ask(requests: list[Request], params: TeacherParams, teacher, journal: TeacherJournal, stats: AskStats) -> None:
    """Ask for every request the journal has no answer to; each answer is journalled as it arrives."""

    def on_answer(request: Request, completion: Completion) -> None:
        journal.write(
            {
                "key": request.key,
                "model": params.model,
                "answer": completion.text,
                "finish_reason": completion.finish_reason,
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
            }
        )

    with tqdm(total=len(requests), desc=f"teacher ({params.mode})", unit="request") as progress:
        if params.mode == "batch":
            job = ask_batch(
                requests, teacher, journal, on_answer, params.batch_window, params.batch_poll_seconds, progress, stats
            )
        else:
            policy, limiter = params.retry_policy, make_limiter(params)
            job = ask_all(requests, teacher, on_answer, policy, limiter, progress=progress, stats=stats)
        asyncio.run(job)
    for key, reason in stats.failures.items():
        journal.write({"key": key, "failed": reason})


def request_metrics(asked: AskStats, seconds: float) -> dict:
    """What the run's requests did: answers, retries by cause, 429s, failures, tokens and rates over ``seconds``."""
    tokens = asked.prompt_tokens + asked.completion_tokens
    return {
        "answers": asked.answered,
        "requests_sent": asked.sent,
        "retries": sum(asked.retries.values()),
        "retries_by_cause": dict(sorted(asked.retries.items())),
        "rate_limited": asked.rate_limited,
        "failures": len(asked.failures),
        "prompt_tokens": asked.prompt_tokens,
        "completion_tokens": asked.completion_tokens,
        "answers_per_minute": asked.answered / seconds * 60 if seconds else 0.0,
        "tokens_per_minute": tokens / seconds * 60 if seconds else 0.0,
    }


def summary_line(metrics: dict) -> str:
    return ", ".join(f"{name} {value}" for name, value in metrics.items())


def label_sentences(
    sentences: list[dict], params: TeacherParams, teacher_factory, journal: TeacherJournal
) -> tuple[list[dict], dict]:
    """Labelled records in the order of ``sentences``, and the stage's counts.

    ``teacher_factory`` is called, before any request, only when some answer is missing from the journal, so a
    fully journalled re-run needs no key and no network. If any request still fails after its
    retries, the run stops with a PipelineError after every other answer is journalled: the next run asks only
    for the missing ones.
    """
    started = time.monotonic()
    requests = build_requests([sentence["text"] for sentence in sentences], params)
    unique = {request.key: request for request in requests}  # one request per distinct prompt
    missing = [request for key, request in unique.items() if journal.get(key) is None]
    asked = ask_missing(missing, params, teacher_factory, journal, started)
    labeled, counts = labelled_records(sentences, requests, journal)
    seconds = time.monotonic() - started
    stats = {
        "sentences": len(sentences),
        "cache_hits": len(unique) - len(missing),
        **request_metrics(asked, seconds),
        **{name: counts[name] for name in LABEL_COUNTS},
        "wall_seconds": seconds,
    }
    return labeled, stats


def ask_missing(
    missing: list[Request], params: TeacherParams, teacher_factory, journal: TeacherJournal, started: float
) -> AskStats:
    """Ask for the ``missing`` answers; a PipelineError if any still fails, after a summary of what the run did."""
    asked = AskStats()
    try:
        if missing:
            ask(missing, params, teacher_factory(), journal, asked)
        if asked.failures:
            causes = Counter(reason.split(":")[0] for reason in asked.failures.values())
            raise PipelineError(
                f"{len(asked.failures)} of {len(missing)} teacher requests still failed after teacher.max_retries "
                f"retries ({', '.join(f'{cause} x{count}' for cause, count in causes.most_common())}); the "
                f"{asked.answered} answers received are journalled: re-run to ask only for the missing ones"
            )
    except PipelineError:
        # No metrics file is written for a run that stops: say what it did before the error line.
        if asked.sent:
            print(f"teacher: {summary_line(request_metrics(asked, time.monotonic() - started))}", file=sys.stderr)
        raise
    return asked


def labelled_records(
    sentences: list[dict], requests: list[Request], journal: TeacherJournal
) -> tuple[list[dict], Counter]:
    """Each sentence with the triples cleaned from its journalled answer, and what cleaning found (LABEL_COUNTS)."""
    labeled, counts = [], Counter()
    for sentence, request in zip(sentences, requests, strict=True):
        entry = journal.get(request.key)
        parsed = clean_label(entry["answer"])
        counts["triples"] += len(parsed.triples)
        counts["malformed_lines"] += len(parsed.malformed)
        counts["prose_lines"] += len(parsed.prose)
        counts["empty_answers"] += not parsed.triples
        counts["truncated_answers"] += entry["finish_reason"] == "length"
        labeled.append({**sentence, "triples": [list(triple) for triple in parsed.triples], "raw": entry["answer"]})
    return labeled, counts


def ask_teacher(texts: list[str], params: TeacherParams, teacher) -> tuple[list[Completion], float]:
    """Answers to ``texts`` from a teacher without a journal: the evaluate stage's teacher comparison."""
    requests = build_requests(texts, params)
    answers: dict[str, Completion] = {}
    started = time.monotonic()
    stats = asyncio.run(
        ask_all(
            requests, teacher, lambda r, c: answers.__setitem__(r.key, c), params.retry_policy, make_limiter(params)
        )
    )
    if stats.failures:
        raise PipelineError(f"{len(stats.failures)} teacher requests failed: {next(iter(stats.failures.values()))}")
    return [answers[request.key] for request in requests], time.monotonic() - started
