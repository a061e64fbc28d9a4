"""What every teacher returns, and the two ways a request can fail."""

from collections.abc import Mapping
from dataclasses import dataclass

from redistill.errors import PipelineError


@dataclass(frozen=True)
class Completion:
    text: str
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
