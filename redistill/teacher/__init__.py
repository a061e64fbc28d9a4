"""Teachers behind one small interface: ``await complete(messages) -> Completion``; pick one with teacher.provider."""

import os
from dataclasses import dataclass

from redistill.params import at_least, in_range, naming, one_of, or_null, param, positive, require
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
    rpm: int | None = param(
        "your plan's requests per minute (console.groq.com/settings/limits; Groq's free tier shown); `null`, here "
        "and in `tpm`, `rpd`: no client-side limit, learnt from the provider's rate-limit headers",
        or_null(positive),
    )
    tpm: int | None = param(
        "your plan's tokens per minute: a request's prompt (as the provider counts it, learnt from its answers) + "
        "`max_tokens` are reserved before it is sent",
        or_null(positive),
    )
    rpd: int | None = param(
        "your plan's requests per day: the run stops (resumably) when they are spent", or_null(positive)
    )


@dataclass(frozen=True)
class TeacherParams:
    provider: str = param(
        "`groq` (official groq SDK, key in `GROQ_API_KEY`), `openai` (official openai SDK against any "
        "OpenAI-compatible server: vLLM, Ollama, llama.cpp; key in `OPENAI_API_KEY`), `replay` (answers from "
        "`teacher.cassette`, no network)",
        one_of(*PROVIDERS),
    )
    model: str = param("the teacher model; see [real-run.md](real-run.md#choosing-a-teacher-model)", naming("a model"))
    base_url: str | None = param(
        "server URL; `null` uses the SDK's default, or `GROQ_BASE_URL` / `OPENAI_BASE_URL` if set. For `openai` "
        "include `/v1`"
    )
    system_prompt: str | None = param(
        "`null`: the post's prompt with its typos fixed (`redistill/prompts.py`); or your own text"
    )
    temperature: float = param("sampling temperature, as in the post", in_range(0, 2, "[]"))
    max_tokens: int = param(
        "answer budget, as in the post; reasoning models spend part of it on hidden reasoning (see README if "
        "answers are cut)",
        positive,
    )
    top_p: float = param("nucleus sampling, as in the post", in_range(0, 1, "(]"))
    reasoning_effort: str | None = param(
        "sent to reasoning models (gpt-oss, qwen3: `low`/`medium`/`high`); `null` sends nothing"
    )
    mode: str = param(
        "`online`: concurrent requests, paced by the limiter; `batch`: the provider's Batch API (50% cheaper, slower)",
        one_of(*MODES),
    )
    concurrency: int = param("requests in flight at once (online)", positive)
    limits: LimitParams
    timeout: float = param("seconds per request", positive)
    max_retries: int = param(
        "retries per request on connection errors, timeouts, 408, 409, 429, 5xx, malformed responses and empty "
        "choices (a well-formed but unusable answer is re-asked instead: `teacher.reask`)",
        at_least(0),
    )
    reask: int = param(
        "times an unusable answer (no content, cut at `max_tokens`, or no well-formed triple) is asked again, at "
        "`teacher.temperature`; `0`: never. Off at temperature 0 and with `replay`, whose second answer would be "
        "the first (docs/teacher.md)",
        at_least(0),
    )
    backoff_base: float = param(
        "retry n waits about `backoff_base * 2^(n-1)` seconds (jittered, capped at `teacher.backoff_max`, never less "
        "than the provider's `retry-after`)",
        positive,
    )
    backoff_max: float = param("the cap on one retry's wait, in seconds; at least `teacher.backoff_base`")
    batch_window: str = param("batch mode: the completion window asked of the provider")
    batch_poll_seconds: float = param("batch mode: how often the batch's status is checked, in seconds", positive)
    cassette: str = param('for `replay`: a JSONL of `{"text", "answer"}` (matched on normalised text)')

    def validate(self) -> None:
        require(
            self.mode == "online" or self.provider != "replay",
            "teacher.mode",
            "batch needs teacher.provider groq or openai (replay answers at once)",
        )
        require(self.backoff_max >= self.backoff_base, "teacher.backoff_max", "must be >= teacher.backoff_base")

    @property
    def prompt(self) -> str:
        return self.system_prompt or DEFAULT_SYSTEM_PROMPT

    @property
    def reasks(self) -> int:
        """The re-asks an unusable answer gets: ``reask``, unless the same request would get the same answer."""
        return 0 if self.reask_off_because else self.reask

    @property
    def reask_off_because(self) -> str | None:
        """Why re-asks are off although ``reask`` asks for some: a deterministic teacher answers the same again."""
        if not self.reask:
            return None
        if self.provider == "replay":
            return "teacher.provider is replay, which has one answer a sentence"
        if self.temperature == 0:
            return "teacher.temperature is 0, so the same request gets the same answer"
        return None

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
