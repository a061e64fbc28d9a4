"""Ask the teacher many questions at once: concurrent, paced by the limiter, retried with jittered backoff.

Every answer is handed to ``on_answer`` as it arrives (the journal writes and fsyncs it), so a crash loses only
what was in flight. A request that still fails after its retries is reported with its last reason, not dropped.
The first request goes alone: a wrong key, model or URL stops the run after one request, not ``concurrency``
of them, and its answer calibrates the limiter before the others are sent.
"""

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from redistill.teacher.base import Completion, RetryableError, TeacherError
from redistill.teacher.limiter import DailyLimitReached, RateLimiter, Reservation

_CHECK_THE_NETWORK = "check teacher.base_url and the network, then re-run: nothing answered is lost"


@dataclass(frozen=True)
class Request:
    key: str
    messages: list[dict]
    prompt_tokens: int  # estimated (estimate_prompt_tokens); the limiter scales it to what the provider counts
    max_tokens: int = 0  # the answer budget, which the provider reserves whole until the answer is in


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int
    backoff_base: float
    backoff_max: float
    concurrency: int

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Exponential backoff with equal jitter; never shorter than the provider's retry-after."""
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        return max(ceiling / 2 + rng.uniform(0, ceiling / 2), retry_after or 0.0)


@dataclass
class AskStats:
    sent: int = 0
    answered: int = 0
    retries: Counter = field(default_factory=Counter)
    rate_limited: int = 0  # 429s received, retried or not
    failures: dict[str, str] = field(default_factory=dict)  # request key -> last reason
    prompt_tokens: int = 0
    completion_tokens: int = 0


def estimate_prompt_tokens(messages: list[dict]) -> int:
    """About four characters a token for English; the limiter learns how far the provider's count differs."""
    return sum(len(message["content"]) for message in messages) // 4


def record_answer(
    request: Request, completion: Completion, on_answer: Callable[[Request, Completion], None], stats: AskStats
) -> None:
    """Count an answer and hand it on: every answer, online or from a batch, passes here on its way to the journal."""
    stats.answered += 1
    stats.prompt_tokens += completion.prompt_tokens
    stats.completion_tokens += completion.completion_tokens
    on_answer(request, completion)


async def ask_all(
    requests: list[Request],
    teacher,
    on_answer: Callable[[Request, Completion], None],
    policy: RetryPolicy,
    limiter: RateLimiter | None,
    seed: int = 0,
    progress: tqdm | None = None,
    stats: AskStats | None = None,
) -> AskStats:
    """Ask every request; raise TeacherError at once on what retrying can't fix.

    Counts go into ``stats`` (a new AskStats if None), so a caller still has them when the run stops with an error.
    """
    stats = AskStats() if stats is None else stats
    asker = _Asker(teacher, on_answer, policy, limiter, random.Random(seed), stats, progress)
    queue: asyncio.Queue[Request] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    try:
        async with asyncio.TaskGroup() as group:
            for index in range(min(policy.concurrency, len(requests))):
                group.create_task(asker.work(queue, first=index == 0))
    except* TeacherError as errors:
        raise errors.exceptions[0] from None
    if asker.stopped:
        raise asker.stopped[0]
    return stats


@dataclass
class _Asker:
    """One ask_all run: what its workers share (teacher, limiter, counts) and the steps of one request's attempts."""

    teacher: Any  # no shared base class: anything with an async complete(messages) -> Completion
    on_answer: Callable[[Request, Completion], None]
    policy: RetryPolicy
    limiter: RateLimiter | None
    rng: random.Random
    stats: AskStats
    progress: tqdm | None
    started: float = field(default_factory=time.monotonic)
    stopped: list[DailyLimitReached] = field(default_factory=list)  # the budget ran out: let those in flight finish
    first_done: asyncio.Event = field(default_factory=asyncio.Event)  # the first request went alone, and is done

    async def work(self, queue: asyncio.Queue[Request], first: bool = False) -> None:
        if not first:
            await self.first_done.wait()
        while not queue.empty() and not self.stopped:
            await self.ask(queue.get_nowait())
            self.first_done.set()  # not when the first raised: what retrying can't fix stops every worker
            self.show_progress()

    async def ask(self, request: Request) -> None:
        """Attempt ``request`` until it is answered or its retries are spent, then record its last reason."""
        for attempt in range(self.policy.max_retries + 1):
            try:
                reservation = await self.reserve(request)
            except DailyLimitReached as error:
                self.stopped.append(error)
                return
            outcome = await self.send(request)
            if not isinstance(outcome, RetryableError):
                self.settle(reservation, outcome)
                record_answer(request, outcome, self.on_answer, self.stats)
                return
            reason = self.learn_from_fault(outcome, reservation)
            if attempt == self.policy.max_retries:
                break
            self.stats.retries[outcome.cause] += 1
            await asyncio.sleep(self.policy.delay(attempt + 1, outcome.retry_after, self.rng))
        self.give_up(request, reason)

    async def reserve(self, request: Request) -> Reservation | None:
        """Wait for room under the limits and take it: the one place a request's tokens are reserved."""
        return await self.limiter.acquire(request.prompt_tokens, request.max_tokens) if self.limiter else None

    async def send(self, request: Request) -> Completion | RetryableError:
        """One attempt: the teacher's answer, or the fault worth retrying. What retrying can't fix raises."""
        self.stats.sent += 1
        try:
            return await self.teacher.complete(request.messages)
        except RetryableError as error:
            return error

    def settle(self, reservation: Reservation | None, completion: Completion) -> None:
        """Correct the reservation to what the answer used, and learn the provider's limits from its headers."""
        if self.limiter:
            self.limiter.settle(reservation, completion.prompt_tokens, completion.completion_tokens, completion.headers)
            self.limiter.observe(completion.headers)

    def learn_from_fault(self, error: RetryableError, reservation: Reservation | None) -> str:
        """Count a failed attempt and pace every request by it; the reason to report if it stays the last.

        A 429 frees its reservation's tokens (the provider admitted nothing); any other fault keeps them whole.
        """
        self.stats.rate_limited += error.cause == "429"
        if self.limiter:
            self.limiter.failed(reservation, refused=error.cause == "429")
            self.limiter.observe(error.headers)
            if error.retry_after:
                self.limiter.hold(error.retry_after)
        if error.cause == "unreachable" and self.stats.answered == 0:
            # Nothing has ever answered and nothing listens there: retrying would only delay the news.
            raise TeacherError(f"{error} (no request has succeeded); {_CHECK_THE_NETWORK}")
        return f"{error.cause}: {error}"

    def give_up(self, request: Request, reason: str) -> None:
        """Record a request whose retries are spent; stop the run if the network has never worked at all."""
        if self.stats.answered == 0 and reason.startswith(("unreachable", "connection", "timeout")):
            raise TeacherError(
                f"{reason} (after {self.policy.max_retries} retries, and no request has succeeded); "
                f"{_CHECK_THE_NETWORK}"
            )
        self.stats.failures[request.key] = reason

    def show_progress(self) -> None:
        if self.progress is None:
            return
        minutes = max(time.monotonic() - self.started, 1e-9) / 60
        self.progress.set_postfix(
            rpm=f"{self.stats.answered / minutes:.0f}",
            tpm=f"{(self.stats.prompt_tokens + self.stats.completion_tokens) / minutes:.0f}",
            retries=sum(self.stats.retries.values()),
            failed=len(self.stats.failures),
            refresh=False,
        )
        self.progress.update(1)
