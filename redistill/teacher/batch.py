"""Large jobs through the provider's Batch API (Groq's, or OpenAI's): upload, create, poll, download, merge.

The batch id is written to the journal as soon as it exists, so an interrupted run collects the same batch
instead of paying for a second one.
"""

import asyncio
import inspect
import json
from collections.abc import Callable

from tqdm import tqdm

from redistill.io import jsonl_values
from redistill.teacher.base import Completion
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
        stats.sent = len(requests)
    batch = await _finished(batch_id, teacher, poll_seconds, progress)
    for line in await _lines(teacher.client, batch.output_file_id):
        request = by_key.get(line["custom_id"])
        if request is None:
            continue
        outcome = _answer_or_reason(line.get("response") or {})
        if isinstance(outcome, Completion):
            record_answer(request, outcome, on_answer, stats)
        else:
            stats.failures[request.key] = outcome
    for line in await _lines(teacher.client, batch.error_file_id):
        stats.failures[line["custom_id"]] = _error_reason(line)
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


def _answer_or_reason(response: dict) -> Completion | str:
    """An output line's response as an answer, or the reason it is none."""
    if response.get("status_code") == 200:
        body = response["body"]
        if body.get("choices"):
            choice, usage = body["choices"][0], body.get("usage") or {}
            return Completion(
                text=choice["message"].get("content") or "",
                finish_reason=choice.get("finish_reason"),
                prompt_tokens=usage.get("prompt_tokens", 0),
                completion_tokens=usage.get("completion_tokens", 0),
            )
    return f"batch: status {response.get('status_code')}"


def _error_reason(line: dict) -> str:
    """An error file line's reason, on one line."""
    response = line.get("response") or {}
    error = line.get("error") or (response.get("body") or {}).get("error") or {}
    reason = f"batch {response.get('status_code', 'error')}: {error.get('message', error)}"
    return " ".join(str(reason).split())


async def _lines(client, file_id: str | None) -> list[dict]:
    if not file_id:
        return []
    content = await client.files.content(file_id)
    # openai's SDK gives the text as a property, groq's async one as a coroutine method.
    text = content.text() if callable(content.text) else content.text
    if inspect.isawaitable(text):
        text = await text
    return [line for _, line in jsonl_values(text, f"batch output file {file_id}")]
