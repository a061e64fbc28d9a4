"""Teachers behind one small interface: ``complete(messages) -> Completion``; pick one with teacher.provider."""

import os
from dataclasses import dataclass

from redistill.params import require
from redistill.prompts import DEFAULT_SYSTEM_PROMPT
from redistill.teacher.base import Completion, TeacherError
from redistill.teacher.replay import ReplayTeacher
from redistill.teacher.sdk import SdkTeacher

PROVIDERS = ("groq", "openai", "replay")
API_KEY_VARIABLES = {"groq": "GROQ_API_KEY", "openai": "OPENAI_API_KEY"}

__all__ = ["Completion", "TeacherError", "TeacherParams", "make_teacher"]


@dataclass(frozen=True)
class TeacherParams:
    provider: str
    model: str
    base_url: str | None
    system_prompt: str | None
    temperature: float
    max_tokens: int
    top_p: float
    reasoning_effort: str | None
    timeout: float
    max_retries: int
    cassette: str

    def validate(self) -> None:
        require(
            self.provider in PROVIDERS,
            "teacher.provider",
            f"must be one of {', '.join(PROVIDERS)}, got {self.provider!r}",
        )
        require(bool(self.model), "teacher.model", "must name a model")
        require(0 <= self.temperature <= 2, "teacher.temperature", f"must be in [0, 2], got {self.temperature}")
        require(0 < self.top_p <= 1, "teacher.top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.max_tokens > 0, "teacher.max_tokens", f"must be positive, got {self.max_tokens}")
        require(self.timeout > 0, "teacher.timeout", f"must be positive, got {self.timeout}")
        require(self.max_retries >= 0, "teacher.max_retries", f"must be >= 0, got {self.max_retries}")

    @property
    def prompt(self) -> str:
        return self.system_prompt or DEFAULT_SYSTEM_PROMPT

    @property
    def sampling(self) -> dict:
        """What shapes an answer besides model and messages: part of every request's journal key."""
        return {
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "reasoning_effort": self.reasoning_effort,
        }


def make_teacher(params: TeacherParams) -> ReplayTeacher | SdkTeacher:
    """The configured teacher; a missing API key fails here, before any work."""
    if params.provider == "replay":
        return ReplayTeacher(params.cassette)
    variable = API_KEY_VARIABLES[params.provider]
    api_key = os.environ.get(variable)
    if not api_key:
        raise TeacherError(f"{variable} is not set; export {variable}=... (teacher.provider is {params.provider!r})")
    options = {
        "api_key": api_key,
        "base_url": params.base_url,
        "timeout": params.timeout,
        "max_retries": params.max_retries,
    }
    if params.provider == "groq":
        import groq

        client = groq.Groq(**options)
    else:
        import openai

        client = openai.OpenAI(**options)
    return SdkTeacher(client, params.model, params.sampling, variable)
