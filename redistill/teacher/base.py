"""What every teacher returns, and the error it raises when retrying can't help."""

from dataclasses import dataclass

from redistill.errors import PipelineError


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class TeacherError(PipelineError):
    """The teacher refused or failed in a way the user must fix (key, model name, URL, request shape)."""
