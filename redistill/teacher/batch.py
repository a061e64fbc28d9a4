"""Large jobs through the provider's Batch API (Groq's, or OpenAI's): upload, create, poll, download, merge.

The batch id is written to the journal as soon as it exists, so an interrupted run collects the same batch
instead of paying for a second one.
"""

import asyncio
import inspect
import json
from collections.abc import Callable

from tqdm import tqdm

from redistill.teacher.base import Completion, RetryableError, completion_from_body
from redistill.teacher.engine import AskStats, Request, record_answer
from redistill.teacher.journal import TeacherJournal

TERMINAL = {"completed", "failed", "expired", "cancelled"}


async def ask_batch(
    requests: list[Request],
    teacher,
    journal: TeacherJournal,
    on_answer: Callable[[Request, Completion], None],
    window: str,
    poll_seconds: float,
    progress: tqdm | None = None,
    stats: AskStats | None = None,
) -> AskStats:
    """Answer ``requests`` with one batch job (or collect the one an interrupted run submitted)."""
    stats = AskStats() if stats is None else stats
    by_key = {request.key: request for request in requests}
    batch_id = next((bid for bid, keys in journal.batches.items() if set(by_key) <= set(keys)), None)
    if batch_id is None:
        batch_id = await _submit(requests, teacher, window)
        journal.write({"batch": batch_id, "keys": list(by_key)})  # before polling: a re-run collects, not resubmits
        stats.sent += len(requests)
    batch = await _finished(batch_id, teacher, poll_seconds, progress)
    for line in await _lines(teacher.client, batch.output_file_id):
        request = _request_of(line, by_key)
        if request is None:  # a line without a custom_id of ours: that request has "no result", below
            continue
        outcome = _answer_or_reason(line.get("response"))
        if isinstance(outcome, Completion):
            record_answer(request, outcome, on_answer, stats)
        else:
            stats.failures[request.key] = outcome
    for line in await _lines(teacher.client, batch.error_file_id):
        request = _request_of(line, by_key)
        if request is not None:
            stats.failures[request.key] = _error_reason(line)
    for key in by_key:
        if journal.get(key) is None and key not in stats.failures:
            stats.failures[key] = f"batch {batch.status}: no result for this request"
    journal.write({"batch": batch_id, "done": True})
    return stats


async def _submit(requests: list[Request], teacher, window: str) -> str:
    """Upload the requests as a batch input file and start the job; its id."""
    lines = [
        {"custom_id": r.key, "method": "POST", "url": "/v1/chat/completions", "body": teacher.request_body(r.messages)}
        for r in requests
    ]
    data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")
    try:
        uploaded = await teacher.client.files.create(file=("redistill-batch.jsonl", data), purpose="batch")
        batch = await teacher.client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window=window
        )
    except Exception as error:
        raise teacher.explain(error) from None
    return batch.id


async def _finished(batch_id: str, teacher, poll_seconds: float, progress: tqdm | None):
    """The batch once it has stopped (completed, failed, expired or cancelled), polled every ``poll_seconds``."""
    while True:
        try:
            batch = await teacher.client.batches.retrieve(batch_id)
        except Exception as error:
            raise teacher.explain(error) from None
        counts = batch.request_counts
        if progress is not None and counts is not None:
            progress.n = counts.completed + counts.failed
            progress.set_postfix(batch=batch.status, failed=counts.failed, refresh=True)
        if batch.status in TERMINAL:
            return batch
        await asyncio.sleep(poll_seconds)


def _request_of(line: dict, by_key: dict[str, Request]) -> Request | None:
    custom_id = line.get("custom_id")
    return by_key.get(custom_id) if isinstance(custom_id, str) else None


def _answer_or_reason(response: object) -> Completion | str:
    """An output line's response as an answer (checked as an online one is), or the reason it is none."""
    status = response.get("status_code") if isinstance(response, dict) else None
    if status != 200:
        return f"batch: status {status}"
    try:
        return completion_from_body(response.get("body"))
    except RetryableError as error:
        return f"{error.cause}: {error}"


def _error_reason(line: dict) -> str:
    """An error file line's reason, on one line."""
    response = line.get("response") if isinstance(line.get("response"), dict) else {}
    body = response.get("body") if isinstance(response.get("body"), dict) else {}
    error = line.get("error") or body.get("error") or {}
    message = error.get("message", error) if isinstance(error, dict) else error
    reason = f"batch {response.get('status_code', 'error')}: {message}"
    return " ".join(str(reason).split())


async def _lines(client, file_id: str | None) -> list[dict]:
    """The JSON objects of a batch output or error file. A line that is not one is skipped: its request then has
    "no result" and is asked again by the next run (a line that stopped the run would stop every later run too)."""
    if not file_id:
        return []
    content = await client.files.content(file_id)
    # openai's SDK gives the text as a property, groq's async one as a coroutine method.
    text = content.text() if callable(content.text) else content.text
    if inspect.isawaitable(text):
        text = await text
    lines = []
    for line in text.split("\n"):  # "\n" only: answers may hold U+2028, which str.splitlines() breaks at
        try:
            value = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            lines.append(value)
    return lines
