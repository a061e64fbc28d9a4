"""A loopback HTTP server that speaks the Groq and OpenAI APIs, for tests and benchmarks.

Groq's SDK calls paths under /openai/v1, OpenAI's under /v1; both are served:

- chat completions, answered by ``answer_for(text)``: a wrong key gets a real 401, a retired model Groq's 400
  ``model_decommissioned``, an unknown model a 404;
- optional load behaviour, all off by default: latency, Groq-style rate limits (real 429s with ``retry-after`` and
  ``x-ratelimit-*`` headers) counted by a tokenizer of the provider's own (words, or characters as real tokenizers
  count them, with a chat template's overhead per message), and injected faults: 5xx, hangs, dropped connections,
  broken JSON; status-200 bodies that are no chat completion (``MALFORMED_BODIES``); well-formed but unusable
  answers (``JUNK_ANSWERS``);
- files and batches, enough for both SDKs to upload a JSONL batch, poll it and download its output and errors;
- the list of models.

The server answers each connection on its own thread, so everything a test may assert on (attempts, status counts,
admitted requests, answered texts) is updated under a lock.
"""

import bisect
import email.policy
import itertools
import json
import math
import random
import re
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

CHAT_PATHS = ("/openai/v1/chat/completions", "/v1/chat/completions")  # for importers; routing uses API_ROOT
API_ROOT = r"(?:/openai)?/v1"  # Groq's SDK puts every path under /openai/v1, OpenAI's under /v1
BATCH_ENDPOINT = "/v1/chat/completions"
# Status-200 bodies a proxy or a broken provider sends instead of a chat completion.
MALFORMED_BODIES = ("malformed_json", "html_200", "choices_string", "no_message", "numeric_content")
# Well-formed completions whose answer can't label the sentence ("control_chars" can, once cleaned).
JUNK_ANSWERS = ("no_triples", "empty_answer", "null_content", "cut", "ramble", "control_chars")
# Faults in the body of a 200: drawn for batch lines too (the others are about the connection).
BODY_FAULTS = (*MALFORMED_BODIES, "empty_choices", *JUNK_ANSWERS)
FAULTS = ("500", "503", "timeout", "drop", *BODY_FAULTS)
NO_TRIPLES_ANSWER = "I could not find any relations in this text."
MALFORMED_JSON = b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [{"index": 0, "mess'
HTML_PAGE = b"<!DOCTYPE html><html><head><title>Sign in to the network</title></head><body>Log in</body></html>"
RAMBLE = "\n".join(["Let me think about the relations in this sentence, one entity at a time, carefully."] * 1450)
REASONING = "The user wants triples. The sentence names a company and a city, so"
MINUTE = 60.0
DAY = 86400.0


def default_answer(text: str) -> str:
    words = text.rstrip(".").split()
    return f"{words[0]}|is followed by|{words[-1]}"


def count_words(text: object) -> int:
    """The fake's token count by default: whitespace-separated words, as reported in ``usage``."""
    return len(text.split()) if isinstance(text, str) else 0


def count_characters(scale: float = 1.0) -> Callable[[object], int]:
    """A tokenizer that counts ``scale`` times a token per four characters: the client's estimate when 1, a
    provider that counts 10% more when 1.1."""

    def count(text: object) -> int:
        return round(len(text) / 4 * scale) if isinstance(text, str) else 0

    return count


def go_duration(seconds: float) -> str:
    """Format a wait the way Groq's reset headers do ("2m59.56s", "7.66s", "120ms"): Go durations, to 10 ms."""
    if seconds <= 0:
        return "0s"
    if round(seconds * 1000) < 1000:
        return f"{round(seconds * 1000)}ms"
    minutes, secs = divmod(round(seconds, 2), 60)
    hours, minutes = divmod(int(minutes), 60)
    text = f"{secs:.2f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    return f"{minutes}m{text}" if minutes else text


def error_body(message: str, code: str | None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Form fields of a multipart/form-data body by name, as (filename, bytes); the stdlib does the MIME work."""
    message = BytesParser(policy=email.policy.HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    if not message.is_multipart():
        return {}
    return {
        part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
        for part in message.iter_parts()
    }


@dataclass
class Request:
    method: str
    path: str  # without the query string
    headers: Message
    body: bytes
    params: dict[str, str] = field(default_factory=dict)  # ids captured from the path

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Reply:
    """What the handler sends back. ``drop`` closes the connection without sending anything at all."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    fault: str | None = None  # the injected fault, which status_counts records instead of the status
    drop: bool = False

    @classmethod
    def json(cls, status: int, payload: object, **options: object) -> "Reply":
        return cls(status, json.dumps(payload).encode(), **options)

    @classmethod
    def error(
        cls, status: int, message: str, code: str | None, kind: str = "invalid_request_error", **options: object
    ) -> "Reply":
        return cls.json(status, error_body(message, code, kind), **options)


# ---------------------------------------------------------------------------------------------------------------------
# Rate limits


@dataclass(frozen=True)
class Limit:
    label: str  # as Groq names it in a 429: "requests per minute (RPM)"
    kind: str  # "requests" or "tokens": the 429's error type and the x-ratelimit-* header family
    limit: int
    window: float  # seconds

    def cost(self, tokens: int) -> int:
        return tokens if self.kind == "tokens" else 1


@dataclass(frozen=True)
class Refusal:
    status: int  # 429, or 413 for a request that alone exceeds the tokens-per-minute limit: waiting won't help it
    message: str
    kind: str
    retry_after: float | None


class SlidingWindowLimits:
    """Groq-style limits over the requests admitted in the last minute (and, for requests per day, the last day).

    A request is admitted or refused when it arrives. Like Groq, it reserves its prompt plus ``max_tokens`` against
    the tokens-per-minute limit, since its real length is not known yet; ``settle`` swaps in the real total later.
    """

    def __init__(self, rpm: int | None, tpm: int | None, rpd: int | None, minute: float = MINUTE) -> None:
        # The day limit comes first: Groq reports it, not the minute one, in x-ratelimit-*-requests.
        # ``minute`` can be shortened so that tests of pacing take seconds, not minutes.
        candidates = [
            Limit("requests per day (RPD)", "requests", rpd, DAY) if rpd is not None else None,
            Limit("requests per minute (RPM)", "requests", rpm, minute) if rpm is not None else None,
            Limit("tokens per minute (TPM)", "tokens", tpm, minute) if tpm is not None else None,
        ]
        self.limits = [limit for limit in candidates if limit is not None]
        self.accepted: list[tuple[float, int]] = []  # (time.monotonic() at admission, tokens), oldest first
        self.lock = threading.Lock()

    def admit(self, model: str, reservation: int) -> int | Refusal:
        """Admit a request, returning its index in ``accepted`` (for ``settle``), or say why not."""
        with self.lock:
            now = time.monotonic()
            for limit in self.limits:
                refusal = self._check(limit, model, reservation, now)
                if refusal is not None:
                    return refusal
            self.accepted.append((now, reservation))
            return len(self.accepted) - 1

    def settle(self, index: int, tokens: int) -> None:
        """Replace an admitted request's reservation with the tokens it really used."""
        with self.lock:
            self.accepted[index] = (self.accepted[index][0], tokens)

    def headers(self, daily_requests: bool = True) -> dict[str, str]:
        """The x-ratelimit-* headers, for the limits that are set. Groq's requests headers count the day's
        requests (``daily_requests``); OpenAI's count the minute's."""
        with self.lock:
            now = time.monotonic()
            headers: dict[str, str] = {}
            for kind in ("requests", "tokens"):
                candidates = [limit for limit in self.limits if limit.kind == kind]
                if kind == "requests":
                    candidates = [limit for limit in candidates if (limit.window == DAY) == daily_requests]
                if candidates:
                    headers.update(self._family_headers(candidates[0], now))
            return headers

    def _family_headers(self, limit: Limit, now: float) -> dict[str, str]:
        start = self._window_start(limit, now)
        used = self._used(limit, start)
        # "Reset" is when the limit is back to its initial state: when the newest request leaves the window.
        reset = self.accepted[-1][0] + limit.window - now if used else 0.0
        return {
            f"x-ratelimit-limit-{limit.kind}": str(limit.limit),
            f"x-ratelimit-remaining-{limit.kind}": str(max(0, limit.limit - used)),
            f"x-ratelimit-reset-{limit.kind}": go_duration(reset),
        }

    def _check(self, limit: Limit, model: str, reservation: int, now: float) -> Refusal | None:
        requested = limit.cost(reservation)
        start = self._window_start(limit, now)
        used = self._used(limit, start)
        if used + requested <= limit.limit:
            return None
        if requested > limit.limit:
            message = (
                f"Request too large for model `{model}` on {limit.label}: Limit {limit.limit}, "
                f"Requested {requested}, please reduce your message size and try again."
            )
            return Refusal(413, message, limit.kind, None)
        wait = self._wait(limit, start, used + requested - limit.limit, now)
        message = (
            f"Rate limit reached for model `{model}` on {limit.label}: Limit {limit.limit}, Used {used}, "
            f"Requested {requested}. Please try again in {go_duration(wait)}."
        )
        return Refusal(429, message, limit.kind, wait)

    def _window_start(self, limit: Limit, now: float) -> int:
        """Index in ``accepted`` of the oldest request still inside the limit's window."""
        return bisect.bisect_right(self.accepted, now - limit.window, key=lambda entry: entry[0])

    def _used(self, limit: Limit, start: int) -> int:
        if limit.kind == "requests":
            return len(self.accepted) - start
        return sum(tokens for _, tokens in self.accepted[start:])

    def _wait(self, limit: Limit, start: int, excess: int, now: float) -> float:
        """Seconds until enough of the window's oldest requests have left it to make room for ``excess`` more."""
        freed = 0
        for admitted_at, tokens in self.accepted[start:]:
            freed += limit.cost(tokens)
            if freed >= excess:
                return admitted_at + limit.window - now
        return limit.window  # unreachable: a request within the limit always fits once the window is empty


# ---------------------------------------------------------------------------------------------------------------------
# Files and batches


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int = field(default_factory=lambda: int(time.time()))

    def describe(self) -> dict:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


@dataclass
class BatchJob:
    """A batch's state. It has no thread of its own: its status follows from the time since it was created."""

    id: str
    input_file_id: str
    completion_window: str
    metadata: dict | None
    lines: list[dict]  # the parsed input lines
    errors: list[dict]  # validation errors: any one fails the whole batch, as with the real APIs
    created_at: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    output_file_id: str | None = None
    error_file_id: str | None = None
    request_counts: dict[str, int] | None = None  # set when the lines have been answered

    def status(self, duration: float) -> str:
        """Validating for the first half of ``duration``, in progress for the second, then completed (or failed)."""
        elapsed = time.monotonic() - self.started
        if elapsed < duration / 2:
            return "validating"
        if self.errors:
            return "failed"
        return "in_progress" if elapsed < duration else "completed"

    def describe(self, status: str, duration: float) -> dict:
        def at(fraction: float) -> int:
            return self.created_at + round(duration * fraction)

        return {
            "id": self.id,
            "object": "batch",
            "endpoint": BATCH_ENDPOINT,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": status,
            "created_at": self.created_at,
            "expires_at": self.created_at + round(DAY),
            "in_progress_at": at(0.5) if status in ("in_progress", "completed") else None,
            "finalizing_at": at(1) if status == "completed" else None,
            "completed_at": at(1) if status == "completed" else None,
            "failed_at": at(0.5) if status == "failed" else None,
            "cancelling_at": None,
            "cancelled_at": None,
            "expired_at": None,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "request_counts": self.request_counts or {"total": len(self.lines), "completed": 0, "failed": 0},
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "metadata": self.metadata,
        }


def parse_batch_lines(content: bytes) -> tuple[list[dict], list[dict]]:
    """The requests in a batch input file, and an error for each line the real APIs would reject."""
    lines: list[dict] = []
    errors: list[dict] = []
    custom_ids: set[str] = set()
    for number, text in enumerate(content.decode(errors="replace").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            line = None
        problem = _batch_line_problem(line, custom_ids)
        if problem:
            errors.append({"code": "invalid_request", "line": number, "message": problem, "param": None})
        else:
            lines.append(line)
            custom_ids.add(line["custom_id"])
    return lines, errors


def _batch_line_problem(line: object, custom_ids: set[str]) -> str | None:
    if not isinstance(line, dict) or "custom_id" not in line or not isinstance(line.get("body"), dict):
        return "Each line must be a JSON object with a custom_id and a body."
    if line["custom_id"] in custom_ids:
        return f"The custom_id {line['custom_id']!r} is used more than once."
    if line.get("method") != "POST" or line.get("url") != BATCH_ENDPOINT:
        return f"Each line must POST to {BATCH_ENDPOINT}."
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The provider


class FakeProvider:
    """Use as a context manager; ``url`` is the base URL for Groq's SDK, ``url + "/v1"`` the one for OpenAI's."""

    def __init__(
        self,
        api_key: str = "test-key",
        models: tuple[str, ...] = ("teacher-model",),
        retired: tuple[str, ...] = ("llama3-70b-8192",),
        answer_for: Callable[[str], str] = default_answer,
        *,
        latency: tuple[float, float] = (0.0, 0.0),
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        rpd_limit: int | None = None,
        faults: dict[str, float] | None = None,
        hang_seconds: float = 30.0,
        batch_seconds: float = 0.5,
        batch_error_rate: float = 0.0,
        seed: int = 0,
        minute_seconds: float = MINUTE,
        counts_max_tokens: bool = False,
        tokenizer: Callable[[object], int] = count_words,
        message_tokens: int = 0,
    ) -> None:
        _check_rates(latency, faults or {}, batch_error_rate)
        self.api_key = api_key
        self.models = models
        self.retired = retired
        self.answer_for = answer_for
        self.latency = latency
        self.rpm_limit, self.tpm_limit, self.rpd_limit = rpm_limit, tpm_limit, rpd_limit
        self.faults = dict(faults or {})
        self.hang_seconds = hang_seconds
        self.batch_seconds = batch_seconds
        self.batch_error_rate = batch_error_rate
        self.limits = SlidingWindowLimits(rpm_limit, tpm_limit, rpd_limit, minute_seconds)
        # Like Azure OpenAI: a request's prompt + max_tokens stays counted against the token limit, whatever it used.
        self.counts_max_tokens = counts_max_tokens
        # How the provider counts tokens, in usage and against its limits: each content by ``tokenizer``, plus
        # ``message_tokens`` a message for its chat template (real providers add about 4).
        self.tokenizer = tokenizer
        self.message_tokens = message_tokens

        # Bookkeeping for tests, guarded by self.lock (accepted by the limits' own lock).
        self.lock = threading.Lock()
        self.requests: list[dict] = []  # bodies of chat requests answered 200 with a genuine answer, in order
        self.paths: list[str] = []  # the path each of those came on
        self.attempts = 0  # chat requests received, whatever became of them
        self.status_counts: Counter[int | str] = Counter()  # per attempt: the HTTP status, or the injected fault
        self.accepted = self.limits.accepted  # (admission time, tokens) of every chat request past the limits
        self.completed_texts: Counter[str] = Counter()  # user-message texts answered genuinely, online or in a batch

        # Reentrant: finishing a batch stores its output files while holding it.
        self.batch_lock = threading.RLock()
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, BatchJob] = {}

        self._random = random.Random(seed)
        self._random_lock = threading.Lock()
        self._closing = threading.Event()  # wakes requests sleeping through latency or a hang when the server stops
        self._completion_ids = itertools.count(1)
        self._routes: list[tuple[str, re.Pattern[str], Callable[[Request], Reply]]] = [
            ("POST", re.compile(API_ROOT + "/chat/completions"), self._chat),
            ("GET", re.compile(API_ROOT + "/models"), self._list_models),
            ("POST", re.compile(API_ROOT + "/files"), self._upload_file),
            ("GET", re.compile(API_ROOT + "/files/(?P<file_id>[^/]+)"), self._retrieve_file),
            ("GET", re.compile(API_ROOT + "/files/(?P<file_id>[^/]+)/content"), self._file_content),
            ("POST", re.compile(API_ROOT + "/batches"), self._create_batch),
            ("GET", re.compile(API_ROOT + "/batches/(?P<batch_id>[^/]+)"), self._retrieve_batch),
        ]
        self.server = _Server(self)
        # A short poll interval: shutdown() waits for the next poll, half a second by default, in every test.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeProvider":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()

    def handle(self, request: Request) -> Reply:
        """Route a request to its endpoint; a handler thread calls this and sends back what it returns."""
        for method, pattern, endpoint in self._routes:
            match = pattern.fullmatch(request.path)
            if match and method == request.method:
                request.params = match.groupdict()
                try:
                    reply = self._key_rejected(request) or endpoint(request)
                except json.JSONDecodeError:
                    reply = Reply.error(400, "The request body is not valid JSON.", "invalid_request_body")
                if endpoint == self._chat:
                    self._count_attempt(reply)
                return reply
        return Reply.error(404, f"Unknown request URL: {request.method} {request.path}", "unknown_url")

    # --- chat completions ------------------------------------------------------------------------------------------

    def _chat(self, request: Request) -> Reply:
        body = request.json()
        if not body.get("messages"):
            return Reply.error(400, "'messages' must be a non-empty list.", "invalid_request_body")
        problem = self._model_problem(body.get("model"))
        if problem:
            return Reply.json(*problem)
        prompt = self.prompt_tokens(body["messages"])
        reservation = prompt + int(body.get("max_completion_tokens") or body.get("max_tokens") or 0)
        admission = self.limits.admit(body["model"], reservation)
        daily = request.path.startswith("/openai/")  # Groq's SDK; OpenAI's semantics are per minute
        if isinstance(admission, Refusal):
            return self._refused(admission, daily)
        fault, delay = self._draw_fault_and_delay()
        self._closing.wait(delay)
        reply, completion = self._answer(request, body, fault)
        if not self.counts_max_tokens:
            self.limits.settle(admission, prompt + completion)
        reply.headers.update(self.limits.headers(daily))
        return reply

    def prompt_tokens(self, messages: list[dict]) -> int:
        return sum(self.tokenizer(message.get("content")) + self.message_tokens for message in messages)

    def _answer(self, request: Request, body: dict, fault: str | None) -> tuple[Reply, int]:
        """The reply to an admitted chat request, and the completion tokens it carries."""
        if fault == "500":
            return Reply.error(500, "Internal Server Error", None, "internal_server_error", fault=fault), 0
        if fault == "503":
            return Reply.error(503, "Service Unavailable", None, "service_unavailable", fault=fault), 0
        if fault == "timeout":
            self._closing.wait(self.hang_seconds)  # then hang up, like a gateway that gave up on the model
            return Reply(drop=True, fault=fault), 0
        if fault == "drop":
            return Reply(drop=True, fault=fault), 0
        reply, completion = self._body(body, fault)
        if reply.fault is None or reply.fault == "control_chars":
            with self.lock:
                self.requests.append(body)
                self.paths.append(request.path)
        return reply, completion

    def _body(self, body: dict, fault: str | None) -> tuple[Reply, int]:
        """A status-200 reply: the answer, or the body fault drawn; and the completion tokens it carries. Genuine
        answers (and "control_chars", which cleaning makes genuine) count in ``completed_texts``."""
        model, messages = body["model"], body["messages"]
        if fault == "malformed_json":
            return Reply(200, MALFORMED_JSON, fault=fault), 0
        if fault == "html_200":
            return Reply(200, HTML_PAGE, content_type="text/html", fault=fault), 0
        if fault == "empty_choices":
            return Reply.json(200, {**self._completion(model, messages, ""), "choices": []}, fault=fault), 0
        text = messages[-1]["content"]
        answer = self.answer_for(text)
        if fault in MALFORMED_BODIES:
            completion = self._completion(model, messages, answer)
            choice = completion["choices"][0]
            if fault == "choices_string":
                completion["choices"] = answer
            elif fault == "no_message":
                choice["text"] = choice.pop("message")["content"]  # the legacy completions shape
            else:
                choice["message"]["content"] = 42
            return Reply.json(200, completion, fault=fault), 0
        content, finish_reason = self._junk(fault, answer)
        if fault in (None, "control_chars"):
            with self.lock:
                self.completed_texts[text] += 1
        completion = self._completion(model, messages, content, finish_reason)
        if fault == "null_content":
            completion["choices"][0]["message"]["reasoning"] = REASONING  # where a reasoning model spent its budget
        return Reply.json(200, completion, fault=fault), self.tokenizer(content)

    @staticmethod
    def _junk(fault: str | None, answer: str) -> tuple[str | None, str]:
        """The content and finish_reason of a well-formed answer: the genuine one, or the junk ``fault`` names."""
        if fault == "no_triples":
            return NO_TRIPLES_ANSWER, "stop"
        if fault == "empty_answer":
            return "", "stop"
        if fault == "null_content":
            return None, "length"
        if fault == "cut":
            return answer[: len(answer) // 2], "length"
        if fault == "ramble":
            return RAMBLE, "stop"  # 120 KB: a proxy that ignores max_tokens
        if fault == "control_chars":  # bold parts, a NUL inside the head, a bell at the end
            head, rest = answer.split("|", 1)
            parts = [f"{head[:1]}\x00{head[1:]}", *rest.split("|")]
            return "|".join(f"\x1b[1m{part}\x1b[0m" for part in parts) + "\x07", "stop"
        return answer, "stop"

    def _completion(self, model: str, messages: list[dict], content: str | None, finish_reason: str = "stop") -> dict:
        """A chat completion with one choice."""
        prompt, completion = self.prompt_tokens(messages), self.tokenizer(content)
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}
        return {
            "id": f"chatcmpl-{next(self._completion_ids)}",  # itertools.count is atomic under the GIL
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }

    def _model_problem(self, model: object) -> tuple[int, dict] | None:
        """The status and error body for a model this provider will not run, as Groq words them."""
        if model in self.retired:
            message = f"The model `{model}` has been decommissioned and is no longer supported."
            return 400, error_body(message, "model_decommissioned")
        if model not in self.models:
            return 404, error_body(f"The model `{model}` does not exist.", "model_not_found")
        return None

    def _refused(self, refusal: Refusal, daily_requests: bool) -> Reply:
        reply = Reply.error(refusal.status, refusal.message, "rate_limit_exceeded", refusal.kind)
        if refusal.retry_after is not None:
            reply.headers["retry-after"] = str(math.ceil(refusal.retry_after))
        reply.headers.update(self.limits.headers(daily_requests))
        return reply

    def _draw_fault_and_delay(self) -> tuple[str | None, float]:
        with self._random_lock:
            roll = self._random.random()
            delay = self._random.uniform(*self.latency)
        for name, rate in self.faults.items():
            if roll < rate:
                return name, delay
            roll -= rate
        return None, delay

    def _count_attempt(self, reply: Reply) -> None:
        with self.lock:
            self.attempts += 1
            self.status_counts[reply.fault or reply.status] += 1

    def _key_rejected(self, request: Request) -> Reply | None:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return Reply.error(401, "Invalid API Key", "invalid_api_key")
        return None

    def _list_models(self, request: Request) -> Reply:
        data = [{"id": model, "object": "model", "created": 0, "owned_by": "fake-provider"} for model in self.models]
        return Reply.json(200, {"object": "list", "data": data})

    # --- files -----------------------------------------------------------------------------------------------------

    def _upload_file(self, request: Request) -> Reply:
        fields = parse_multipart(request.headers.get("Content-Type", ""), request.body)
        if "file" not in fields:
            return Reply.error(400, "Upload a file as multipart/form-data field 'file'.", "missing_file")
        filename, content = fields["file"]
        purpose = fields.get("purpose", (None, b"batch"))[1].decode()
        return Reply.json(200, self._store(filename or "upload.jsonl", purpose, content).describe())

    def _store(self, filename: str, purpose: str, content: bytes) -> StoredFile:
        stored = StoredFile(new_id("file"), filename, purpose, content)
        with self.batch_lock:
            self.files[stored.id] = stored
        return stored

    def _find_file(self, file_id: str) -> StoredFile | Reply:
        with self.batch_lock:
            stored = self.files.get(file_id)
        return stored or Reply.error(404, f"No such File object: {file_id}", "file_not_found")

    def _retrieve_file(self, request: Request) -> Reply:
        stored = self._find_file(request.params["file_id"])
        return stored if isinstance(stored, Reply) else Reply.json(200, stored.describe())

    def _file_content(self, request: Request) -> Reply:
        stored = self._find_file(request.params["file_id"])
        if isinstance(stored, Reply):
            return stored
        return Reply(200, stored.content, content_type="application/octet-stream")

    # --- batches ---------------------------------------------------------------------------------------------------

    def _create_batch(self, request: Request) -> Reply:
        body = request.json()
        if body.get("endpoint") != BATCH_ENDPOINT:
            return Reply.error(400, f"The only supported endpoint is {BATCH_ENDPOINT}.", "invalid_endpoint")
        source = self._find_file(str(body.get("input_file_id")))
        if isinstance(source, Reply):
            return source
        lines, errors = parse_batch_lines(source.content)
        window = body.get("completion_window", "24h")
        job = BatchJob(new_id("batch"), source.id, window, body.get("metadata"), lines, errors)
        with self.batch_lock:
            self.batches[job.id] = job
            return self._batch_reply(job)

    def _retrieve_batch(self, request: Request) -> Reply:
        batch_id = request.params["batch_id"]
        with self.batch_lock:
            job = self.batches.get(batch_id)
            if job is None:
                return Reply.error(404, f"No batch found with id {batch_id}", "batch_not_found")
            return self._batch_reply(job)

    def _batch_reply(self, job: BatchJob) -> Reply:
        """The batch as it stands now, answering its lines the first time it is seen completed."""
        status = job.status(self.batch_seconds)
        if status == "completed" and job.request_counts is None:
            self._finish_batch(job)
        return Reply.json(200, job.describe(status, self.batch_seconds))

    def _finish_batch(self, job: BatchJob) -> None:
        answered: list[dict] = []
        failed: list[dict] = []
        for line in job.lines:
            status, body = self._batch_answer(line["body"])
            response = {"status_code": status, "request_id": new_id("req"), "body": body}
            record = {"id": new_id("batch_req"), "custom_id": line["custom_id"], "response": response, "error": None}
            (answered if status == 200 else failed).append(record)
        job.output_file_id = self._store(f"{job.id}_output.jsonl", "batch_output", jsonl(answered)).id
        if failed:
            job.error_file_id = self._store(f"{job.id}_error.jsonl", "batch_output", jsonl(failed)).id
        job.request_counts = {"total": len(job.lines), "completed": len(answered), "failed": len(failed)}

    def _batch_answer(self, body: dict) -> tuple[int, object]:
        """One batch line's status and response body; the body faults apply (a body that is not JSON comes as a
        string). Batch lines do not count against the rate limits."""
        problem = self._model_problem(body.get("model"))
        if problem:
            return problem
        with self._random_lock:
            failed = self._random.random() < self.batch_error_rate
        if failed:
            return 500, error_body("Internal Server Error", None, "internal_server_error")
        fault, _ = self._draw_fault_and_delay()
        reply, _ = self._body(body, fault if fault in BODY_FAULTS else None)
        try:
            return 200, json.loads(reply.body)
        except ValueError:
            return 200, reply.body.decode()


def _check_rates(latency: tuple[float, float], faults: dict[str, float], batch_error_rate: float) -> None:
    if not 0 <= latency[0] <= latency[1]:
        raise ValueError(f"latency must be (min, max) with 0 <= min <= max, got {latency}")
    unknown = set(faults) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
    if any(rate < 0 for rate in faults.values()) or sum(faults.values()) > 1:
        raise ValueError(f"fault rates must be >= 0 and sum to at most 1, got {faults}")
    if not 0 <= batch_error_rate <= 1:
        raise ValueError(f"batch_error_rate must be in [0, 1], got {batch_error_rate}")


# ---------------------------------------------------------------------------------------------------------------------
# HTTP plumbing


class _Server(ThreadingHTTPServer):
    def __init__(self, provider: FakeProvider) -> None:
        self.provider = provider
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that gave up (its own timeout) leaves a broken pipe behind: expected here, not worth a traceback.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as clients get from a real provider
    disable_nagle_algorithm = True  # headers and body go out in two writes: without this each answer waits ~40 ms
    server: _Server

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        request = Request(method, urlsplit(self.path).path, self.headers, body)
        self._send(self.server.provider.handle(request))

    def _send(self, reply: Reply) -> None:
        if reply.drop:
            self.close_connection = True  # the server closes the socket without a byte of response
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(reply.body)
