"""Client-side pacing: stay under the provider's requests/minute, tokens/minute and requests/day.

Each request reserves its estimated tokens (prompt + max_tokens) in a sliding 60-second window before it is
sent; when the answer arrives the reservation is corrected to what the provider counts (``settle``). The limiter
also learns from the provider: a lower limit in the ``x-ratelimit-limit-*`` headers replaces the configured one, an
exhausted ``remaining`` holds every request until its ``reset``, and a ``retry-after`` on a 429 holds them all for
that long.
"""

import asyncio
import re
import time
from collections import deque
from dataclasses import dataclass

from redistill.errors import PipelineError

# A quarter second more than the provider's minute: send and arrival times differ by the network's delay.
WINDOW = 60.25
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


class RateLimiter:
    def __init__(self, limits: Limits, requests_header_is_daily: bool, window: float = WINDOW) -> None:
        self.limits = Limits(limits.rpm, limits.tpm, limits.rpd)
        self.window = window  # a minute (and a little), shorter only in tests
        # Groq's x-ratelimit-*-requests headers count requests per day; OpenAI's count them per minute.
        self.requests_header_is_daily = requests_header_is_daily
        self.recent: deque[list[float]] = deque()  # [sent_at, tokens] within the last minute
        self.sent_today = 0
        self.hold_until = 0.0
        self.keeps_reservations = False  # learnt in settle(): the provider counts max_tokens, not the usage
        self.lock = asyncio.Lock()

    def _expire(self, now: float) -> None:
        while self.recent and now - self.recent[0][0] >= self.window:
            self.recent.popleft()

    def _wait_needed(self, tokens: int, now: float) -> float:
        self._expire(now)
        waits = [self.hold_until - now]
        if self.limits.rpm is not None and len(self.recent) >= self.limits.rpm:
            waits.append(self.recent[-self.limits.rpm][0] + self.window - now)
        if self.limits.tpm is not None and self.recent:
            used = sum(entry[1] for entry in self.recent)
            if used + tokens > self.limits.tpm:
                # The oldest entries must leave the window until this request fits.
                freed, need = 0.0, used + tokens - self.limits.tpm
                for sent_at, spent in self.recent:
                    freed += spent
                    if freed >= need:
                        waits.append(sent_at + self.window - now)
                        break
        return max(waits)

    async def acquire(self, tokens: int) -> list[float]:
        """Wait until a request of ``tokens`` fits every limit, then reserve it; returns the reservation."""
        async with self.lock:  # one waiter at a time keeps requests in order and the window exact
            if self.limits.rpd is not None and self.sent_today >= self.limits.rpd:
                raise DailyLimitReached(
                    f"teacher.limits.rpd ({self.limits.rpd}) requests sent; the provider allows no more today. "
                    "Re-run after its daily reset: answers so far are kept"
                )
            while (wait := self._wait_needed(tokens, time.monotonic())) > 0:
                await asyncio.sleep(wait)
            reservation = [time.monotonic(), float(tokens)]
            self.recent.append(reservation)
            self.sent_today += 1
            return reservation

    def settle(self, reservation: list[float], used: int, headers) -> None:
        """Correct a reservation, when its answer arrives, to what the provider counts against the token limit.

        Groq counts the tokens an answer used, so the reservation shrinks to those. Others (Azure OpenAI) keep the
        prompt + max_tokens counted whatever was used: the provider's ``x-ratelimit-remaining-tokens`` then shows
        more tokens spent in its window than the limiter's, and from that answer on the limiter keeps every
        reservation whole, and adds what it under-counted so far to this one.
        """
        if self.keeps_reservations:
            return
        reservation[1] = float(used)
        remaining = _int(headers.get("x-ratelimit-remaining-tokens")) if headers is not None else None
        limit = (_int(headers.get("x-ratelimit-limit-tokens")) if headers is not None else None) or self.limits.tpm
        if remaining is None or limit is None:
            return
        self._expire(time.monotonic())
        under_counted = limit - remaining - sum(entry[1] for entry in self.recent)
        if under_counted > 0:
            self.keeps_reservations = True
            reservation[1] += under_counted

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
