"""Teachers behind one small interface: ``await complete(messages) -> Completion``; pick one with teacher.provider."""

import os
from dataclasses import dataclass

from redistill.params import require
from redistill.prompts import DEFAULT_SYSTEM_PROMPT
from redistill.teacher.base import Completion, RetryableError, TeacherError
from redistill.teacher.engine import RetryPolicy
from redistill.teacher.limiter import Limits, RateLimiter
from redistill.teacher.replay import ReplayTeacher
from redistill.teacher.sdk import SdkTeacher

PROVIDERS = ("groq", "openai", "replay")
MODES = ("online", "batch")
API_KEY_VARIABLES = {"groq": "GROQ_API_KEY", "openai": "OPENAI_API_KEY"}

__all__ = ["Completion", "RetryableError", "TeacherError", "TeacherParams", "make_limiter", "make_teacher"]


@dataclass(frozen=True)
class LimitParams:
    rpm: int | None
    tpm: int | None
    rpd: int | None

    def validate(self) -> None:
        for name in ("rpm", "tpm", "rpd"):
            value = getattr(self, name)
            require(value is None or value > 0, f"teacher.limits.{name}", f"must be positive or null, got {value}")


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
    mode: str
    concurrency: int
    limits: LimitParams
    timeout: float
    max_retries: int
    backoff_base: float
    backoff_max: float
    batch_window: str
    batch_poll_seconds: float
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
        require(self.mode in MODES, "teacher.mode", f"must be online or batch, got {self.mode!r}")
        require(
            self.mode == "online" or self.provider != "replay",
            "teacher.mode",
            "batch needs teacher.provider groq or openai (replay answers at once)",
        )
        require(self.concurrency > 0, "teacher.concurrency", f"must be positive, got {self.concurrency}")
        require(self.timeout > 0, "teacher.timeout", f"must be positive, got {self.timeout}")
        require(self.max_retries >= 0, "teacher.max_retries", f"must be >= 0, got {self.max_retries}")
        require(self.backoff_base > 0, "teacher.backoff_base", f"must be positive, got {self.backoff_base}")
        require(self.backoff_max >= self.backoff_base, "teacher.backoff_max", "must be >= teacher.backoff_base")
        require(self.batch_poll_seconds > 0, "teacher.batch_poll_seconds", "must be positive")

    @property
    def prompt(self) -> str:
        return self.system_prompt or DEFAULT_SYSTEM_PROMPT

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_retries, self.backoff_base, self.backoff_max, self.concurrency)

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
    # The SDK's own retries are off: the engine retries, so that it can count causes and pace them.
    options = {"api_key": api_key, "base_url": params.base_url, "timeout": params.timeout, "max_retries": 0}
    if params.provider == "groq":
        import groq

        client = groq.AsyncGroq(**options)
    else:
        import openai

        client = openai.AsyncOpenAI(**options)
    return SdkTeacher(client, params.model, params.sampling, variable)


def make_limiter(params: TeacherParams) -> RateLimiter | None:
    """Pacing for a live provider; a cassette needs none."""
    if params.provider == "replay":
        return None
    limits = Limits(params.limits.rpm, params.limits.tpm, params.limits.rpd)
    return RateLimiter(limits, requests_header_is_daily=params.provider == "groq")
