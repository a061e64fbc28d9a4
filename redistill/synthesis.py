"""The synthesize stage's logic: ask the teacher about each sentence (journal first), re-ask the answers that can't
be labels, clean answers to triples.

A sentence's answers live in the journal, one per request: the first ask under the request's key, re-ask n under
``reask_key(key, n)``. What a run asks follows from the journal alone, so a resumed run neither asks again what
has a usable answer nor loses an answer, and a run after a complete one asks nothing.
"""

import asyncio
import sys
import time
from collections import Counter
from dataclasses import replace

from tqdm import tqdm

from redistill.errors import PipelineError
from redistill.prompts import chat_messages
from redistill.teacher import TeacherError, TeacherParams, make_limiter
from redistill.teacher.base import Completion
from redistill.teacher.batch import ask_batch
from redistill.teacher.engine import AskStats, Request, ask_all, estimate_prompt_tokens
from redistill.teacher.journal import TeacherJournal, reask_key, request_key
from redistill.teacher.limiter import RateLimiter
from redistill.triples import ParsedAnswer, clean_label

LABEL_COUNTS = (
    "triples",
    "malformed_lines",
    "prose_lines",
    "stripped_lines",
    "empty_answers",
    "truncated_answers",
    "unusable_answers",
)
UNUSABLE = {"cut_at_max_tokens": "cut at teacher.max_tokens", "empty": "no content", "no_triple": "no triple"}
# More final answers than this share of the sentences cut at max_tokens: the warning says to raise it.
CUT_SHARE_TO_WARN = 0.02
# The progress bar shows after this many seconds: a run that stops at once prints its error line alone.
PROGRESS_DELAY = 2.0

Judged = tuple[dict, ParsedAnswer, str | None]  # a journal entry, its cleaned triples, why it is unusable (or None)


def build_requests(texts: list[str], params: TeacherParams) -> list[Request]:
    requests = []
    for text in texts:
        messages = chat_messages(text, params.prompt)
        key = request_key(params.provider, params.model, messages, params.sampling)
        requests.append(Request(key, messages, estimate_prompt_tokens(messages), params.max_tokens))
    return requests


def unusable_reason(entry: dict, parsed: ParsedAnswer) -> str | None:
    """Why a journalled answer can't label its sentence (a key of UNUSABLE), or None when it can: the one place
    that decides."""
    if entry.get("finish_reason") == "length":
        return "cut_at_max_tokens"
    if not entry["answer"].strip():
        return "empty"  # null content (a reasoning model that spent max_tokens thinking) is journalled as ""
    if not parsed.triples:
        return "no_triple"
    return None


def journalled(request: Request, journal: TeacherJournal, reasks: int) -> list[Judged]:
    """The journalled answers to ``request`` and to its re-asks 1..``reasks``, in order, up to the first missing."""
    answers = []
    for reask in range(reasks + 1):
        entry = journal.get(reask_key(request.key, reask))
        if entry is None:
            break
        parsed = clean_label(entry["answer"])
        answers.append((entry, parsed, unusable_reason(entry, parsed)))
    return answers


def label_of(answers: list[Judged]) -> Judged:
    """The answer that labels a sentence: its last usable one, else its last."""
    return next((answer for answer in reversed(answers) if answer[2] is None), answers[-1])


def pending(requests: list[Request], journal: TeacherJournal, reasks: int) -> list[tuple[Request, int]]:
    """Each request that still needs asking, with the re-ask it needs (0: the first ask): those with no answer,
    and those whose answers are all unusable with re-asks left."""
    todo = []
    for request in requests:
        answers = journalled(request, journal, reasks)
        if not answers or (label_of(answers)[2] is not None and len(answers) <= reasks):
            todo.append((request, len(answers)))
    return todo


def label_sentences(
    sentences: list[dict], params: TeacherParams, teacher_factory, journal: TeacherJournal
) -> tuple[list[dict], dict]:
    """Labelled records in the order of ``sentences``, and the stage's counts.

    ``teacher_factory`` is called, before any request, only when some answer is missing from the journal (or
    re-asks are due), so a fully journalled re-run needs no key and no network. If any request still fails after
    its retries, the run stops with a PipelineError after every other answer is journalled: the next run asks
    only for the missing ones.
    """
    started = time.monotonic()
    requests = build_requests([sentence["text"] for sentence in sentences], params)
    unique = list({request.key: request for request in requests}.values())  # one request per distinct prompt
    todo = pending(unique, journal, params.reasks)
    asked = AskStats()
    reasked = ask_until_usable(todo, unique, params, teacher_factory, journal, asked, started) if todo else 0
    labeled, counts, unusable = labelled_records(sentences, requests, journal, params.reasks)
    seconds = time.monotonic() - started
    stats = {
        "sentences": len(sentences),
        "cache_hits": len(unique) - len(todo),
        **request_metrics(asked, seconds),
        "reasked_answers": reasked,
        **{name: counts[name] for name in LABEL_COUNTS},
        "unusable_by_reason": dict(sorted(unusable.items())),
        "wall_seconds": seconds,
    }
    return labeled, stats


def ask_until_usable(
    todo: list[tuple[Request, int]],
    unique: list[Request],
    params: TeacherParams,
    teacher_factory,
    journal: TeacherJournal,
    asked: AskStats,
    started: float,
) -> int:
    """Ask ``todo``, then re-ask what came back unusable, round after round, until every request has a usable
    answer or has spent ``teacher.reask``; the number of re-asks sent.

    A PipelineError if requests still fail after their retries (or the day's requests are spent), after a summary
    of what the run did; an error that stops the run before any answer (a wrong key, model or URL) is its one line.
    """
    try:
        teacher = teacher_factory()
        return asyncio.run(_closing(teacher, _ask_rounds(todo, unique, params, teacher, journal, asked)))
    except PipelineError as error:
        # No metrics file is written for a run that stops: say what it did before the error line.
        if asked.answered or not isinstance(error, TeacherError):
            print(f"teacher: {summary_line(request_metrics(asked, time.monotonic() - started))}", file=sys.stderr)
        raise


async def _ask_rounds(
    todo: list[tuple[Request, int]],
    unique: list[Request],
    params: TeacherParams,
    teacher,
    journal: TeacherJournal,
    asked: AskStats,
) -> int:
    """The rounds of ask_until_usable, in one event loop, paced by one limiter: each round asks what the journal
    says is still needed."""
    limiter = make_limiter(params) if params.mode == "online" else None
    reasked, total = 0, 0
    for round_number in range(params.reasks + 1):
        reasked += sum(reask > 0 for _, reask in todo)
        total += len(todo)
        await _ask_round(todo, params, teacher, limiter, journal, asked, first=round_number == 0)
        if asked.failures:
            causes = Counter(reason.split(":")[0] for reason in asked.failures.values())
            raise PipelineError(
                f"{len(asked.failures)} of {total} teacher requests still failed after teacher.max_retries "
                f"retries ({', '.join(f'{cause} x{count}' for cause, count in causes.most_common())}); the "
                f"{asked.answered} answers received are journalled: re-run to ask only for the missing ones"
            )
        todo = pending(unique, journal, params.reasks)
        if not todo:
            break
    return reasked


async def _ask_round(
    todo: list[tuple[Request, int]],
    params: TeacherParams,
    teacher,
    limiter: RateLimiter | None,
    journal: TeacherJournal,
    asked: AskStats,
    first: bool,
) -> None:
    """Ask each request of ``todo`` (its re-ask, where one is due); each answer is journalled as it arrives, and
    each request that still failed after its retries once the round is over."""
    origin: dict[str, tuple[str, int]] = {}  # key asked -> (the request's own key, which re-ask)
    requests = []
    for request, reask in todo:
        key = reask_key(request.key, reask)
        origin[key] = (request.key, reask)
        requests.append(replace(request, key=key))

    def on_answer(request: Request, completion: Completion) -> None:
        first_key, reask = origin[request.key]
        journal.write(
            {
                "key": request.key,
                **({"reask": reask, "reask_of": first_key} if reask else {}),
                "model": params.model,
                "answer": completion.text,
                "finish_reason": completion.finish_reason,
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
            }
        )

    label = f"teacher ({params.mode})" if first else f"teacher ({params.mode}), re-asking unusable answers"
    with tqdm(total=len(requests), desc=label, unit="request", delay=PROGRESS_DELAY) as progress:
        if params.mode == "batch":
            window, poll = params.batch_window, params.batch_poll_seconds
            await ask_batch(requests, teacher, journal, on_answer, window, poll, progress, asked)
        else:
            await ask_all(requests, teacher, on_answer, params.retry_policy, limiter, progress=progress, stats=asked)
    for key, reason in asked.failures.items():
        journal.write({"key": key, "failed": reason})


async def _closing(teacher, job):
    """Await ``job``, then close the teacher's connections in the event loop that opened them."""
    try:
        return await job
    finally:
        close = getattr(teacher, "aclose", None)
        if close is not None:
            await close()


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


def labelled_records(
    sentences: list[dict], requests: list[Request], journal: TeacherJournal, reasks: int
) -> tuple[list[dict], Counter, Counter]:
    """Each sentence with the triples cleaned from the answer that labels it (label_of), what cleaning found
    (LABEL_COUNTS), and the sentences still without a usable answer, by reason. Those records say why, in
    ``"unusable"``."""
    labeled, counts, unusable = [], Counter(), Counter()
    for sentence, request in zip(sentences, requests, strict=True):
        entry, parsed, reason = label_of(journalled(request, journal, reasks))
        counts["triples"] += len(parsed.triples)
        counts["malformed_lines"] += len(parsed.malformed)
        counts["prose_lines"] += len(parsed.prose)
        counts["stripped_lines"] += parsed.stripped
        counts["empty_answers"] += not parsed.triples
        counts["truncated_answers"] += entry.get("finish_reason") == "length"
        counts["unusable_answers"] += reason is not None
        record = {**sentence, "triples": [list(triple) for triple in parsed.triples], "raw": entry["answer"]}
        if reason is not None:
            unusable[reason] += 1
            record["unusable"] = reason
        labeled.append(record)
    return labeled, counts, unusable


def unusable_warning(stats: dict, params: TeacherParams) -> str | None:
    """One warning line when some sentences still have no usable answer: how many, why, how to see them, and
    whether teacher.max_tokens is too small; None when every sentence has one."""
    count, sentences = stats["unusable_answers"], stats["sentences"]
    if not count:
        return None
    reasons = Counter(stats["unusable_by_reason"])
    why = ", ".join(f"{UNUSABLE[reason]} x{number}" for reason, number in reasons.most_common())
    if params.reasks:
        after = f"after {params.reasks} re-ask{'s' if params.reasks > 1 else ''}"
    else:
        after = f"(re-asks are off: {params.reask_off_because or 'teacher.reask is 0'})"
    line = (
        f"warning: {count} of {sentences} sentences have no usable teacher answer {after} ({why}); "
        """see them with: grep '"unusable"' data/labeled.jsonl"""
    )
    cut = stats["truncated_answers"]
    if cut > CUT_SHARE_TO_WARN * sentences:
        line += f"; {cut / sentences:.0%} were cut at teacher.max_tokens ({params.max_tokens}): raise it"
    return line


def ask_teacher(texts: list[str], params: TeacherParams, teacher) -> tuple[list[Completion], float]:
    """Answers to ``texts`` from a teacher without a journal: the evaluate stage's teacher comparison (no re-asks:
    the teacher is scored on its answers as they come)."""
    requests = build_requests(texts, params)
    answers: dict[str, Completion] = {}
    started = time.monotonic()
    job = ask_all(
        requests, teacher, lambda r, c: answers.__setitem__(r.key, c), params.retry_policy, make_limiter(params)
    )
    stats = asyncio.run(_closing(teacher, job))
    if stats.failures:
        raise PipelineError(f"{len(stats.failures)} teacher requests failed: {next(iter(stats.failures.values()))}")
    return [answers[request.key] for request in requests], time.monotonic() - started
