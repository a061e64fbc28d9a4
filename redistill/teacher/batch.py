"""Large jobs through the provider's Batch API (Groq's, or OpenAI's): upload, create, poll, download, merge.

The batch id is written to the journal as soon as it exists, so an interrupted run collects the same batch
instead of paying for a second one.
"""

import asyncio
import inspect
import json

from tqdm import tqdm

from redistill.io import jsonl_values
from redistill.teacher.base import Completion
from redistill.teacher.engine import AskStats, Request
from redistill.teacher.journal import TeacherJournal

TERMINAL = {"completed", "failed", "expired", "cancelled"}


async def ask_batch(
    requests: list[Request],
    teacher,
    journal: TeacherJournal,
    on_answer,
    window: str,
    poll_seconds: float,
    progress: tqdm | None = None,
    stats: AskStats | None = None,
) -> AskStats:
    """Answer ``requests`` with one batch job (or collect the one an interrupted run submitted)."""
    client, stats = teacher.client, AskStats() if stats is None else stats
    by_key = {request.key: request for request in requests}
    batch_id = next((bid for bid, keys in journal.batches.items() if set(by_key) <= set(keys)), None)
    if batch_id is None:
        lines = [
            {
                "custom_id": r.key,
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": teacher.request_body(r.messages),
            }
            for r in requests
        ]
        data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")
        try:
            uploaded = await client.files.create(file=("redistill-batch.jsonl", data), purpose="batch")
            batch = await client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window=window
            )
        except Exception as error:
            raise teacher.explain(error) from None
        batch_id = batch.id
        journal.write({"batch": batch_id, "keys": list(by_key)})
        stats.sent = len(requests)

    while True:
        try:
            batch = await client.batches.retrieve(batch_id)
        except Exception as error:
            raise teacher.explain(error) from None
        counts = batch.request_counts
        if progress is not None and counts is not None:
            progress.n = counts.completed + counts.failed
            progress.set_postfix(batch=batch.status, failed=counts.failed, refresh=True)
        if batch.status in TERMINAL:
            break
        await asyncio.sleep(poll_seconds)

    for line in await _lines(client, batch.output_file_id):
        request = by_key.get(line["custom_id"])
        response = line.get("response") or {}
        if request is None:
            continue
        if response.get("status_code") == 200:
            body = response["body"]
            if body.get("choices"):
                choice, usage = body["choices"][0], body.get("usage") or {}
                completion = Completion(
                    text=choice["message"].get("content") or "",
                    finish_reason=choice.get("finish_reason"),
                    prompt_tokens=usage.get("prompt_tokens", 0),
                    completion_tokens=usage.get("completion_tokens", 0),
                )
                stats.answered += 1
                stats.prompt_tokens += completion.prompt_tokens
                stats.completion_tokens += completion.completion_tokens
                on_answer(request, completion)
                continue
        stats.failures[request.key] = f"batch: status {response.get('status_code')}"
    for line in await _lines(client, batch.error_file_id):
        response = line.get("response") or {}
        error = line.get("error") or (response.get("body") or {}).get("error") or {}
        reason = f"batch {response.get('status_code', 'error')}: {error.get('message', error)}"
        stats.failures[line["custom_id"]] = " ".join(str(reason).split())
    for key in by_key:
        if journal.get(key) is None and key not in stats.failures:
            stats.failures[key] = f"batch {batch.status}: no result for this request"
    journal.write({"batch": batch_id, "done": True})
    return stats


async def _lines(client, file_id: str | None) -> list[dict]:
    if not file_id:
        return []
    content = await client.files.content(file_id)
    # openai's SDK gives the text as a property, groq's async one as a coroutine method.
    text = content.text() if callable(content.text) else content.text
    if inspect.isawaitable(text):
        text = await text
    return [line for _, line in jsonl_values(text, f"batch output file {file_id}")]
