"""What every teacher returns, the two ways a request can fail, and the one check a response passes to become an
answer."""

import json
from collections.abc import Mapping
from dataclasses import dataclass

from redistill.errors import PipelineError


@dataclass(frozen=True)
class Completion:
    text: str  # the answer's content; "" when the provider sent null (a reasoning model that spent max_tokens)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    headers: Mapping[str, str] | None = None  # the provider's response headers, for the rate limiter


class TeacherError(PipelineError):
    """The teacher refused in a way retrying can't fix (key, model name, URL, request shape)."""


class RetryableError(Exception):
    """A failure worth retrying: connection error, timeout, 408, 409, 429, 5xx, a malformed or empty answer."""

    def __init__(self, cause: str, message: str, retry_after: float | None = None, headers=None) -> None:
        super().__init__(message)
        self.cause = (
            cause  # a short label counted in metrics: "429", "503", "timeout", "connection", "unreachable", ...
        )
        self.retry_after = retry_after
        self.headers = headers


def completion_from_body(body: object, headers: Mapping[str, str] | None = None) -> Completion:
    """A chat-completions response body (bytes, text or parsed JSON) as a Completion, or a RetryableError.

    Every answer, online or from a batch, passes here before it can reach the journal. Anything that is not a
    list of choices whose first has a ``message`` with a string (or null) ``content`` is ``malformed_response``:
    not JSON (an HTML page sent with status 200), not an object, ``choices`` of another type, a choice without a
    ``message``, numeric content. An empty list of choices is ``empty_choices``. A missing or null ``usage`` counts
    as zero tokens.
    """
    if isinstance(body, bytes | str):
        try:
            body = json.loads(body)
        except ValueError:
            raise _malformed(f"the answer is not JSON: {_preview(body)}", headers) from None
    if not isinstance(body, dict):
        raise _malformed(f"the answer is {_kind(body)}, not a JSON object", headers)
    choices = body.get("choices")
    if isinstance(choices, list) and not choices:
        raise RetryableError("empty_choices", "the answer had no choices", headers=headers)
    if not isinstance(choices, list):
        error = body.get("error")
        detail = f" (error: {_preview(error.get('message', error) if isinstance(error, dict) else error)})"
        raise _malformed(f"the answer's choices are {_kind(choices)}, not a list{detail if error else ''}", headers)
    choice = choices[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise _malformed(f"the answer's first choice has no message object ({_preview(choice)})", headers)
    content, finish_reason = message.get("content"), choice.get("finish_reason")
    if content is not None and not isinstance(content, str):
        raise _malformed(f"the answer's content is {_kind(content)}, not text: {_preview(content)}", headers)
    if finish_reason is not None and not isinstance(finish_reason, str):
        raise _malformed(f"the answer's finish_reason is {_kind(finish_reason)}, not text", headers)
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    return Completion(
        text=content or "",
        finish_reason=finish_reason,
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
        headers=headers,
    )


def _malformed(message: str, headers) -> RetryableError:
    return RetryableError("malformed_response", message, headers=headers)


def _count(value: object) -> int:
    """A usage count as reported, or 0 for one that is missing, null or not a count."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _kind(value: object) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    return names.get(type(value), {list: "a list", dict: "an object"}.get(type(value), type(value).__name__))


def _preview(value: object, size: int = 60) -> str:
    """The start of ``value`` on one line, for an error message."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    text = " ".join(str(value if isinstance(value, str) else json.dumps(value, default=str)).split())
    return repr(text if len(text) <= size else text[:size] + "...")
