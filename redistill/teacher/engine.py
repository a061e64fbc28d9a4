"""Ask the teacher many questions at once: concurrent, paced by the limiter, retried with jittered backoff.

Every answer is handed to ``on_answer`` as it arrives (the journal writes and fsyncs it), so a crash loses only
what was in flight. A request that still fails after its retries is reported with its last reason, not dropped.
"""

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm import tqdm

from redistill.teacher.base import Completion, RetryableError, TeacherError
from redistill.teacher.limiter import DailyLimitReached, RateLimiter


@dataclass(frozen=True)
class Request:
    key: str
    messages: list[dict]
    tokens: int  # estimated prompt tokens + max_tokens: what the limiter reserves before sending


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


def estimate_tokens(messages: list[dict], max_tokens: int) -> int:
    """About four characters a token for English, plus the whole answer budget."""
    return sum(len(message["content"]) for message in messages) // 4 + max_tokens


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
    queue: asyncio.Queue[Request] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    rng = random.Random(seed)
    started = time.monotonic()

    stopped: list[DailyLimitReached] = []  # the day's budget ran out: requests in flight may still finish

    async def ask(request: Request) -> None:
        for attempt in range(policy.max_retries + 1):
            try:
                reservation = await limiter.acquire(request.tokens) if limiter else None
            except DailyLimitReached as error:
                stopped.append(error)
                return
            stats.sent += 1
            try:
                completion = await teacher.complete(request.messages)
            except RetryableError as error:
                stats.rate_limited += error.cause == "429"
                if limiter:
                    limiter.observe(error.headers)
                    if error.retry_after:
                        limiter.hold(error.retry_after)
                reason = f"{error.cause}: {error}"
                if error.cause == "unreachable" and stats.answered == 0:
                    # Nothing has ever answered and nothing listens there: retrying would only delay the news.
                    raise TeacherError(
                        f"{error} (no request has succeeded); "
                        "check teacher.base_url and the network, then re-run: nothing answered is lost"
                    ) from None
                if attempt == policy.max_retries:
                    break
                stats.retries[error.cause] += 1
                await asyncio.sleep(policy.delay(attempt + 1, error.retry_after, rng))
                continue
            if limiter:
                limiter.settle(reservation, completion.prompt_tokens + completion.completion_tokens, completion.headers)
                limiter.observe(completion.headers)
            stats.answered += 1
            stats.prompt_tokens += completion.prompt_tokens
            stats.completion_tokens += completion.completion_tokens
            on_answer(request, completion)
            return
        if stats.answered == 0 and reason.startswith(("unreachable", "connection", "timeout")):
            raise TeacherError(
                f"{reason} (after {policy.max_retries} retries, and no request has succeeded); "
                "check teacher.base_url and the network, then re-run: nothing answered is lost"
            )
        stats.failures[request.key] = reason

    async def worker() -> None:
        while not queue.empty() and not stopped:
            request = queue.get_nowait()
            await ask(request)
            if progress is not None:
                minutes = max(time.monotonic() - started, 1e-9) / 60
                progress.set_postfix(
                    rpm=f"{stats.answered / minutes:.0f}",
                    tpm=f"{(stats.prompt_tokens + stats.completion_tokens) / minutes:.0f}",
                    retries=sum(stats.retries.values()),
                    failed=len(stats.failures),
                    refresh=False,
                )
                progress.update(1)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(policy.concurrency, len(requests))):
                group.create_task(worker())
    except* TeacherError as errors:
        raise errors.exceptions[0] from None
    if stopped:
        raise stopped[0]
    return stats
