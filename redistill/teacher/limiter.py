"""Client-side pacing: stay under the provider's requests/minute, tokens/minute and requests/day.

Each request reserves its tokens in a sliding 60-second window before it is sent: its prompt as estimated
(characters / 4) times a scale learnt from the provider, plus ``max_tokens``. The scale is the largest ratio of the
provider's ``usage.prompt_tokens`` to the estimate among the recent answers, so whatever the provider's tokenizer
(and its chat-template overhead), requests in flight are counted as the provider counts them. When the answer
arrives the reservation is corrected to what the provider counts (``settle``), and a request waiting for room looks
again; the reservation leaves the window a window after the answer came back, if that is later than a window after
it was sent (the provider admitted it in between). The limiter also learns from the provider: a lower limit in
the ``x-ratelimit-limit-*`` headers replaces the configured one, an exhausted ``remaining`` holds every request
until its ``reset``, and a ``retry-after`` on a 429 holds them all for that long.
"""

import asyncio
import contextlib
import re
import time
from collections import deque
from dataclasses import dataclass

from redistill.errors import PipelineError

# A quarter second more than the provider's minute: send and arrival times differ by the network's delay.
WINDOW = 60.25
# The scale of the prompt estimate is the largest ratio among this many recent answers: over-counting a request in
# flight costs a little speed, under-counting it a 429.
CALIBRATION_ANSWERS = 50
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str | None) -> float | None:
    """Seconds in a provider's duration: "7.66s", "2m59.56s", "120ms", "1h2m", or a bare number of seconds."""
    if not text:
        return None
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = _DURATION_PART.findall(text)
    return sum(float(value) * units[unit] for value, unit in parts) if parts else None


def retry_after_seconds(headers) -> float | None:
    """The wait a 429 or 503 asks for: ``retry-after-ms`` (OpenAI) or ``retry-after`` (seconds)."""
    if headers is None:
        return None
    if headers.get("retry-after-ms"):
        try:
            return float(headers["retry-after-ms"]) / 1000
        except ValueError:
            pass
    return parse_duration(headers.get("retry-after"))


class DailyLimitReached(PipelineError):
    """The requests-per-day budget is spent: waiting would take hours, so the run stops and says so."""


@dataclass
class Limits:
    rpm: int | None
    tpm: int | None
    rpd: int | None


@dataclass(slots=True)
class Reservation:
    """One request's place in the window: estimated until its answer says what the provider counted.

    It leaves the window a window after it was sent, or after its answer (or fault) came back if that is later:
    the provider admitted it somewhere in between, and a request whose connection took long to open (the burst
    after the first request opens a connection each) must not leave the limiter's window before the provider's.
    """

    expires: float
    prompt: int  # the prompt's estimated tokens (characters / 4), before calibration
    budget: int  # max_tokens: what the provider reserves for the answer
    counted: float | None = None  # what the provider counts against the token limit, once known
    freed: float = 0.0  # how much less than its estimate that is


class RateLimiter:
    def __init__(self, limits: Limits, requests_header_is_daily: bool, window: float = WINDOW) -> None:
        self.limits = Limits(limits.rpm, limits.tpm, limits.rpd)
        self.window = window  # a minute (and a little), shorter only in tests
        # Groq's x-ratelimit-*-requests headers count requests per day; OpenAI's count them per minute.
        self.requests_header_is_daily = requests_header_is_daily
        self.recent: list[Reservation] = []  # those still in the window
        self.sent_today = 0
        self.hold_until = 0.0
        self.keeps_reservations = False  # learnt in settle(): the provider counts max_tokens, not the usage
        self.suspicions = 0  # answers in a row whose headers say the provider did not free what settle() freed
        self.ratios: deque[float] = deque(maxlen=CALIBRATION_ANSWERS)  # provider's prompt tokens / our estimate
        self.lock = asyncio.Lock()
        self.freed = asyncio.Event()  # set when an answer or a 429 frees tokens: a waiting request looks again

    @property
    def scale(self) -> float:
        """How many tokens the provider counts for each estimated prompt token: 1 until an answer says."""
        return max(self.ratios, default=1.0)

    def tokens(self, reservation: Reservation) -> float:
        """A reservation's tokens against the limit: what the provider counted, or the calibrated estimate."""
        if reservation.counted is not None:
            return reservation.counted
        return reservation.prompt * self.scale + reservation.budget

    def _expire(self, now: float) -> None:
        self.recent = [entry for entry in self.recent if entry.expires > now]

    def _wait_needed(self, tokens: float, now: float) -> float:
        self._expire(now)
        waits = [self.hold_until - now]
        leaving = sorted(self.recent, key=lambda entry: entry.expires)  # first to leave the window first
        if self.limits.rpm is not None and len(leaving) >= self.limits.rpm:
            waits.append(leaving[len(leaving) - self.limits.rpm].expires - now)
        if self.limits.tpm is not None and leaving:
            used = sum(self.tokens(entry) for entry in leaving)
            if used + tokens > self.limits.tpm:
                # The first entries to leave must be gone until this request fits.
                freed, need = 0.0, used + tokens - self.limits.tpm
                for entry in leaving:
                    freed += self.tokens(entry)
                    if freed >= need:
                        waits.append(entry.expires - now)
                        break
        return max(waits)

    async def acquire(self, prompt: int, budget: int = 0) -> Reservation:
        """Wait until a request of ``prompt`` estimated tokens and a ``budget`` of answer tokens fits every limit,
        then reserve it."""
        async with self.lock:  # one waiter at a time keeps requests in order and the window exact
            if self.limits.rpd is not None and self.sent_today >= self.limits.rpd:
                raise DailyLimitReached(
                    f"teacher.limits.rpd ({self.limits.rpd}) requests sent; the provider allows no more today. "
                    "Re-run after its daily reset: answers so far are kept"
                )
            while (wait := self._wait_needed(prompt * self.scale + budget, time.monotonic())) > 0:
                # Until the oldest requests leave the window, or an answer in flight frees what it did not use.
                self.freed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self.freed.wait()
            reservation = Reservation(time.monotonic() + self.window, prompt, budget)
            self.recent.append(reservation)
            self.sent_today += 1
            return reservation

    def settle(self, reservation: Reservation, prompt_tokens: int, completion_tokens: int, headers) -> None:
        """Correct a reservation, when its answer arrives, to what the provider counts against the token limit, and
        calibrate the prompt estimate from the provider's ``prompt_tokens``.

        Groq counts the tokens an answer used, so the reservation shrinks to those. Others (Azure OpenAI) keep the
        prompt + max_tokens counted whatever was used: the provider's ``x-ratelimit-remaining-tokens`` then shows
        more tokens spent in its window than the limiter's, by about what settling the window's answers freed. Once
        two answers in a row say so, the limiter keeps every reservation whole, and adds what it under-counted so
        far to this one. (One answer alone can say so by chance: answers racing each other arrive in another order
        than the provider counted them.) An answer without ``usage`` keeps its whole reservation: nothing says it
        used less.
        """
        self._came_back(reservation)
        if prompt_tokens > 0 and reservation.prompt > 0:
            self.ratios.append(prompt_tokens / reservation.prompt)
        if prompt_tokens <= 0:
            reservation.counted = self.tokens(reservation)
            return
        estimated = self.tokens(reservation)
        if self.keeps_reservations:
            reservation.counted = float(prompt_tokens + reservation.budget)
            return
        reservation.counted = float(prompt_tokens + completion_tokens)
        reservation.freed = max(0.0, estimated - reservation.counted)
        remaining = _int(headers.get("x-ratelimit-remaining-tokens")) if headers is not None else None
        limit = (_int(headers.get("x-ratelimit-limit-tokens")) if headers is not None else None) or self.limits.tpm
        if remaining is None or limit is None:
            return
        self._expire(time.monotonic())
        under_counted = limit - remaining - sum(self.tokens(entry) for entry in self.recent)
        freed = sum(entry.freed for entry in self.recent)
        self.suspicions = self.suspicions + 1 if under_counted > max(freed / 2, 0.01 * limit) else 0
        if self.suspicions >= 2:
            self.keeps_reservations = True
            reservation.counted += under_counted

    def failed(self, reservation: Reservation, refused: bool) -> None:
        """An attempt that got no answer. A 429 (``refused``): the provider admitted nothing, so it holds no tokens
        (it still counts as a request). Any other fault keeps its tokens whole: the provider may have counted them,
        and over-counting only slows the run where under-counting gets 429s."""
        if refused:
            reservation.counted = 0.0
        self._came_back(reservation)

    def _came_back(self, reservation: Reservation) -> None:
        reservation.expires = max(reservation.expires, time.monotonic() + self.window)
        self.freed.set()  # a request waiting for room looks again

    def hold(self, seconds: float) -> None:
        """Send nothing for ``seconds`` (a retry-after, or a limit the headers say is exhausted)."""
        self.hold_until = max(self.hold_until, time.monotonic() + seconds)

    def observe(self, headers) -> None:
        """Learn from the provider's ``x-ratelimit-*`` headers."""
        if headers is None:
            return
        limit_tokens = _int(headers.get("x-ratelimit-limit-tokens"))
        if limit_tokens and (self.limits.tpm is None or limit_tokens < self.limits.tpm):
            self.limits.tpm = limit_tokens
        limit_requests = _int(headers.get("x-ratelimit-limit-requests"))
        if limit_requests:
            current = self.limits.rpd if self.requests_header_is_daily else self.limits.rpm
            if current is None or limit_requests < current:
                if self.requests_header_is_daily:
                    self.limits.rpd = limit_requests
                else:
                    self.limits.rpm = limit_requests
        if _int(headers.get("x-ratelimit-remaining-tokens")) == 0:
            self.hold(parse_duration(headers.get("x-ratelimit-reset-tokens")) or 1.0)
        remaining_requests = _int(headers.get("x-ratelimit-remaining-requests"))
        if remaining_requests == 0:
            if self.requests_header_is_daily:  # today's budget is spent: the next acquire stops the run
                self.limits.rpd = min(self.limits.rpd or self.sent_today, self.sent_today)
            else:
                self.hold(parse_duration(headers.get("x-ratelimit-reset-requests")) or 1.0)


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except ValueError:
        return None
