"""The fake provider behaves like Groq and OpenAI as their own SDKs see it: limits, faults, latency and batches."""

import json
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import groq
import httpx
import openai
import pytest
from fake_provider import (
    HTML_PAGE,
    JUNK_ANSWERS,
    NO_TRIPLES_ANSWER,
    REASONING,
    FakeProvider,
    count_characters,
    default_answer,
    go_duration,
)

from redistill.triples import clean_label

MODEL = "teacher-model"
KEY = "test-key"
DURATION = r"^(\d+h)?(\d+m)?\d+(\.\d+)?(ms|s)$"  # Groq's reset headers: "2m59.56s", "7.66s", "120ms"


def openai_client(server: FakeProvider, **options) -> openai.OpenAI:
    return openai.OpenAI(**{"api_key": KEY, "base_url": server.url + "/v1", "max_retries": 0, **options})


def groq_client(server: FakeProvider, **options) -> groq.Groq:
    return groq.Groq(**{"api_key": KEY, "base_url": server.url, "max_retries": 0, **options})


def ask(client, text: str = "Alice lives in Paris.", model: str = MODEL, **body):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **body)


def refusal(call) -> openai.APIStatusError | None:
    """The status error a call raised, or None if it succeeded."""
    try:
        call()
    except openai.APIStatusError as error:
        return error
    return None


# --- rate limits ---------------------------------------------------------------------------------------------------


def test_a_burst_over_the_rpm_limit_gets_exactly_the_excess_refused():
    with FakeProvider(rpm_limit=30) as server:
        client = openai_client(server)
        with ThreadPoolExecutor(max_workers=8) as pool:
            errors = list(pool.map(lambda i: refusal(lambda: ask(client, f"Company{i} is in City{i}.")), range(40)))
    refused = [error for error in errors if error is not None]
    assert len(refused) == 10
    for error in refused:
        assert isinstance(error, openai.RateLimitError)
        assert 1 <= int(error.response.headers["retry-after"]) <= 60
        assert int(error.response.headers["x-ratelimit-remaining-requests"]) == 0
        assert error.body["code"] == "rate_limit_exceeded"
        assert "on requests per minute (RPM): Limit 30, Used 30, Requested 1." in error.body["message"]
    assert server.status_counts == {200: 30, 429: 10}
    assert server.attempts == 40 and len(server.accepted) == 30 and len(server.requests) == 30


def test_tpm_reserves_prompt_plus_max_tokens_then_counts_the_real_total():
    prompt = " ".join(["word"] * 200)  # 200 prompt tokens; the answer "word|is followed by|word" is 3 more
    with FakeProvider(tpm_limit=1000) as server:
        client = openai_client(server)
        # Each request reserves 200 + 100 and settles at 203: after four (812 used) a fifth's 300 no longer fits.
        for _ in range(4):
            ask(client, prompt, max_tokens=100)
        error = refusal(lambda: ask(client, prompt, max_tokens=100))
        too_large = refusal(lambda: ask(client, prompt, max_tokens=2000))
    assert isinstance(error, openai.RateLimitError)
    assert error.body["type"] == "tokens"
    assert "on tokens per minute (TPM): Limit 1000, Used 812, Requested 300." in error.body["message"]
    assert error.response.headers["x-ratelimit-remaining-tokens"] == "188"
    assert int(error.response.headers["retry-after"]) >= 1
    assert too_large.status_code == 413  # a request bigger than the whole limit could never be admitted
    assert [tokens for _, tokens in server.accepted] == [203] * 4


def test_requests_headers_count_the_day_on_groqs_path_and_the_minute_on_openais():
    with FakeProvider(rpm_limit=100, rpd_limit=2) as server:
        per_minute = openai_client(server).chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "A b."}]
        )
        assert per_minute.headers["x-ratelimit-limit-requests"] == "100"
    with FakeProvider(rpm_limit=100, rpd_limit=2) as server:
        client = openai_client(server)
        first = groq_client(server).chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "A b."}]
        )
        ask(client)
        error = refusal(lambda: ask(client))
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert "on requests per day (RPD): Limit 2, Used 2" in error.body["message"]
    assert 86_000 < int(error.response.headers["retry-after"]) <= 86_400


def test_successful_answers_carry_groqs_rate_limit_headers():
    with FakeProvider(rpm_limit=30, tpm_limit=10_000) as server:
        raw = openai_client(server).chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Alice lives in Paris."}], max_tokens=50
        )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Alice|is followed by|Paris"
    assert raw.headers["x-ratelimit-limit-requests"] == "30"
    assert raw.headers["x-ratelimit-remaining-requests"] == "29"
    assert raw.headers["x-ratelimit-limit-tokens"] == "10000"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) == 10_000 - completion.usage.total_tokens
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        assert raw.headers[name] and pytest.approx(60, abs=1) == _seconds(raw.headers[name])


def test_without_limits_there_are_no_rate_limit_headers():
    with FakeProvider() as server:
        raw = openai_client(server).chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "A b."}]
        )
    assert not [name for name in raw.headers if name.startswith("x-ratelimit")]
    assert len(server.accepted) == 1  # admissions are recorded all the same


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.12, "120ms"), (7.66, "7.66s"), (60, "1m0s"), (179.56, "2m59.56s"), (86_399.5, "23h59m59.5s")],
)
def test_durations_are_written_the_way_groq_writes_them(seconds, text):
    assert go_duration(seconds) == text
    assert _seconds(text) == pytest.approx(seconds)


def _seconds(duration: str) -> float:
    assert re.match(DURATION, duration), duration
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(value) * units[unit] for value, unit in re.findall(r"([\d.]+)(ms|h|m|s)", duration))


# --- faults and latency --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("500", openai.InternalServerError),
        ("503", openai.InternalServerError),
        ("timeout", openai.APITimeoutError),
        ("drop", openai.APIConnectionError),
        ("malformed_json", (json.JSONDecodeError, openai.APIResponseValidationError)),
    ],
)
def test_failing_faults_reach_the_client_as_errors(fault, expected):
    with FakeProvider(faults={fault: 1.0}, hang_seconds=5.0) as server:
        started = time.monotonic()
        with pytest.raises(expected) as caught:
            ask(openai_client(server, timeout=0.5))
        elapsed = time.monotonic() - started
    # A hung request is counted when its handler thread wakes, as the server stops: wait for that thread.
    while server.attempts == 0 and time.monotonic() - started < 10:
        time.sleep(0.01)
    if fault in ("500", "503"):
        assert caught.value.status_code == int(fault)
    if fault == "drop":
        assert not isinstance(caught.value, openai.APITimeoutError) and elapsed < 0.5
    assert server.attempts == 1 and server.status_counts == {fault: 1}
    assert len(server.accepted) == 1  # a faulted attempt still counts against the limits
    assert server.requests == [] and not server.completed_texts


def raw_chat(server: FakeProvider, text: str = "Alice lives in Paris.") -> httpx.Response:
    """A chat request as bytes on the wire, for bodies no SDK would parse."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 64}
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})


@pytest.mark.parametrize("fault", ["html_200", "choices_string", "no_message", "numeric_content"])
def test_malformed_bodies_come_with_status_200(fault):
    with FakeProvider(faults={fault: 1.0}) as server:
        response = raw_chat(server)
    assert response.status_code == 200
    if fault == "html_200":
        assert response.headers["content-type"] == "text/html" and response.content == HTML_PAGE
    else:
        choices = response.json()["choices"]
        assert {
            "choices_string": lambda: choices == "Alice|is followed by|Paris",
            "no_message": lambda: "message" not in choices[0] and choices[0]["text"] == "Alice|is followed by|Paris",
            "numeric_content": lambda: choices[0]["message"]["content"] == 42,
        }[fault]()
    assert server.status_counts == {fault: 1} and server.requests == [] and not server.completed_texts


@pytest.mark.parametrize("fault", ["empty_choices", *JUNK_ANSWERS])
def test_junk_answers_are_well_formed_but_useless(fault):
    with FakeProvider(faults={fault: 1.0}) as server:
        completion = ask(openai_client(server))
    genuine = default_answer("Alice lives in Paris.")
    if fault == "empty_choices":
        assert completion.choices == []
        return
    choice = completion.choices[0]
    content, finish_reason = choice.message.content, choice.finish_reason
    expected = {
        "no_triples": (NO_TRIPLES_ANSWER, "stop"),
        "empty_answer": ("", "stop"),
        "null_content": (None, "length"),
        "cut": (genuine[: len(genuine) // 2], "length"),
    }
    if fault in expected:
        assert (content, finish_reason) == expected[fault]
    elif fault == "ramble":
        assert len(content) > 120_000 and "|" not in content and finish_reason == "stop"
    else:  # control characters and terminal escapes inside a genuine triple
        assert "\x1b[" in content and "\x00" in content and clean_label(content).triples == [tuple(genuine.split("|"))]
    if fault == "null_content":
        assert choice.message.model_extra["reasoning"] == REASONING
    assert completion.usage.completion_tokens == len((content or "").split())
    assert server.status_counts == {fault: 1}
    assert server.completed_texts == (Counter(["Alice lives in Paris."]) if fault == "control_chars" else Counter())


def test_a_provider_counts_tokens_its_own_way():
    system, user = "You extract triples.", "Alice lives in Paris, France."
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    counted = round(len(system) / 4 * 1.1) + round(len(user) / 4 * 1.1) + 2 * 4
    with FakeProvider(tpm_limit=1000, tokenizer=count_characters(1.1), message_tokens=4) as server:
        completion = openai_client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=50)
    answer_tokens = round(len(default_answer(user)) / 4 * 1.1)
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (counted, answer_tokens)
    assert [tokens for _, tokens in server.accepted] == [counted + answer_tokens]  # the limits count the same way


def test_faults_are_drawn_per_request_and_repeat_with_the_seed():
    def statuses(seed: int) -> list[int]:
        with FakeProvider(faults={"500": 0.3, "503": 0.2}, seed=seed) as server, httpx.Client() as client:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "A b."}]}
            headers = {"Authorization": f"Bearer {KEY}"}
            return [
                client.post(server.url + "/v1/chat/completions", json=body, headers=headers).status_code
                for _ in range(40)
            ]

    first = statuses(seed=1)
    assert set(first) == {200, 500, 503}
    assert statuses(seed=1) == first
    assert statuses(seed=2) != first


@pytest.mark.parametrize(
    "options",
    [
        {"faults": {"hang": 0.5}},
        {"faults": {"500": 0.6, "drop": 0.6}},
        {"latency": (0.3, 0.1)},
        {"batch_error_rate": 2},
    ],
)
def test_impossible_settings_are_refused(options):
    with pytest.raises(ValueError):
        FakeProvider(**options)


def test_latency_delays_each_answer():
    with FakeProvider(latency=(0.2, 0.2)) as server:
        client = openai_client(server)
        started = time.monotonic()
        ask(client)
        assert time.monotonic() - started >= 0.2


# --- behaviour the teacher tests rely on ---------------------------------------------------------------------------


def test_bad_key_retired_and_unknown_models_get_the_providers_errors():
    with FakeProvider() as server:
        with pytest.raises(openai.AuthenticationError):
            ask(openai_client(server, api_key="wrong"))
        with pytest.raises(openai.BadRequestError) as retired:
            ask(openai_client(server), model="llama3-70b-8192")
        with pytest.raises(openai.NotFoundError) as unknown:
            ask(openai_client(server), model="no-such-model")
        assert [model.id for model in groq_client(server).models.list().data] == [MODEL]
        assert httpx.post(server.url + "/v2/chat/completions", json={}).status_code == 404
    assert retired.value.body["code"] == "model_decommissioned"
    assert unknown.value.body["code"] == "model_not_found"
    assert server.status_counts == {401: 1, 400: 1, 404: 1} and server.requests == []


# --- batches -------------------------------------------------------------------------------------------------------

TEXTS = [
    "Alice lives in Paris.",
    "Bob works at Acme.",
    "Zoë was born in Köln.",
    "Carol founded Initech.",
    "Dan met Eve.",
]


def batch_file(texts: list[str], models: list[str] | None = None) -> bytes:
    lines = [
        {
            "custom_id": f"sentence-{index}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 64},
        }
        for index, (text, model) in enumerate(zip(texts, models or [MODEL] * len(texts), strict=True))
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def run_batch(client, content: bytes):
    """Upload, create and poll a batch to its end; returns the final batch and every status seen."""
    uploaded = client.files.create(file=("batch.jsonl", content), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    statuses = [batch.status]
    deadline = time.monotonic() + 5
    while batch.status not in ("completed", "failed"):
        assert time.monotonic() < deadline, statuses
        time.sleep(0.05)
        batch = client.batches.retrieve(batch.id)
        statuses.append(batch.status)
    return batch, statuses


def download(client, file_id: str) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).read().decode().splitlines()]


SDKS = {"groq": groq_client, "openai": openai_client}


@pytest.mark.parametrize("sdk", SDKS)
def test_a_batch_runs_end_to_end(sdk):
    with FakeProvider(rpm_limit=1, batch_seconds=0.2) as server:
        client = SDKS[sdk](server)
        batch, statuses = run_batch(client, batch_file(TEXTS))
        output = download(client, batch.output_file_id)
    assert statuses[0] == "validating" and "in_progress" in statuses and statuses[-1] == "completed"
    assert batch.error_file_id is None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (5, 5, 0)
    assert [line["custom_id"] for line in output] == [f"sentence-{index}" for index in range(5)]
    for line, text in zip(output, TEXTS, strict=True):
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["choices"][0]["message"]["content"] == default_answer(text)
    assert server.completed_texts == Counter(TEXTS)
    assert server.attempts == 0 and server.accepted == []  # batch lines bypass the rate limits (rpm_limit=1 here)


@pytest.mark.parametrize("sdk", SDKS)
def test_failed_batch_lines_go_to_the_error_file(sdk):
    models = [MODEL] * 4 + ["no-such-model"]
    with FakeProvider(batch_seconds=0.2, batch_error_rate=1.0) as server:
        client = SDKS[sdk](server)
        batch, _ = run_batch(client, batch_file(TEXTS, models))
        output = download(client, batch.output_file_id)
        errors = download(client, batch.error_file_id)
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (5, 0, 5)
    assert output == []
    statuses = {line["custom_id"]: line["response"]["status_code"] for line in errors}
    assert statuses == {"sentence-0": 500, "sentence-1": 500, "sentence-2": 500, "sentence-3": 500, "sentence-4": 404}
    assert all("error" in line["response"]["body"] for line in errors)
    assert not server.completed_texts


def test_batch_lines_get_the_body_faults():
    faults = {"html_200": 0.25, "numeric_content": 0.25, "empty_choices": 0.25, "500": 0.25}
    with FakeProvider(batch_seconds=0.2, faults=faults, seed=4) as server:
        client = openai_client(server)
        batch, _ = run_batch(client, batch_file(TEXTS * 4))
        bodies = [line["response"]["body"] for line in download(client, batch.output_file_id)]
    assert len(bodies) == 20  # a "500" is about the connection: a batch line does not get it
    kinds = Counter(
        "html"
        if isinstance(body, str)
        else "empty"
        if not body["choices"]
        else type(body["choices"][0]["message"]["content"]).__name__
        for body in bodies
    )
    assert set(kinds) == {"html", "empty", "int", "str"} and kinds["str"] == sum(server.completed_texts.values())
    assert all(body == HTML_PAGE.decode() for body in bodies if isinstance(body, str))


def test_a_batch_file_with_a_bad_line_fails_validation():
    content = batch_file(TEXTS[:2]) + b"not json\n"
    with FakeProvider(batch_seconds=0.2) as server:
        batch, statuses = run_batch(openai_client(server), content)
    assert statuses[-1] == "failed" and batch.output_file_id is None
    assert [error.line for error in batch.errors.data] == [3]


@pytest.mark.parametrize("sdk", SDKS)
def test_files_and_batches_need_the_key(sdk):
    with FakeProvider() as server:
        client = SDKS[sdk](server, api_key="wrong")
        error = groq.AuthenticationError if sdk == "groq" else openai.AuthenticationError
        with pytest.raises(error):
            client.files.create(file=("batch.jsonl", batch_file(TEXTS)), purpose="batch")
        with pytest.raises(error):
            client.batches.retrieve("batch_123")
    assert server.files == {} and server.attempts == 0
