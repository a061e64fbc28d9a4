"""The synthesize engine under load and faults, against the loopback provider: nothing lost, nothing twice."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, write_jsonl
from fake_provider import JUNK_ANSWERS, MALFORMED_BODIES, FakeProvider, count_characters, default_answer

from redistill.errors import PipelineError
from redistill.io import read_jsonl
from redistill.params import load_block
from redistill.sentences import sentence_id
from redistill.synthesis import build_requests, label_sentences
from redistill.teacher import TeacherParams, make_teacher
from redistill.teacher.engine import Request, RetryPolicy, ask_all, estimate_prompt_tokens
from redistill.teacher.journal import TeacherJournal
from redistill.teacher.limiter import Limits, RateLimiter, Reservation, parse_duration, retry_after_seconds

MODEL = "teacher-model"
FAULT_MIX = {"500": 0.06, "503": 0.06, "timeout": 0.05, "drop": 0.05, "malformed_json": 0.04, "empty_choices": 0.04}


def rows(count: int) -> list[dict]:
    texts = [f"Company {i} was founded in City {i % 7} by Person {i}." for i in range(count)]
    return [{"id": sentence_id(text), "text": text} for text in texts]


def params_for(server: FakeProvider, provider: str = "groq", **changes) -> TeacherParams:
    block = yaml.safe_load((ROOT / "params.yaml").read_text())["teacher"]
    block.update(
        provider=provider, model=MODEL, base_url=server.url + ("/v1" if provider == "openai" else ""),
        limits={"rpm": None, "tpm": None, "rpd": None}, backoff_base=0.01, backoff_max=0.05, timeout=5.0,
    )  # fmt: skip
    block.update(changes)
    return load_block(TeacherParams, "teacher", {"teacher": block})


@pytest.fixture
def keys(monkeypatch):
    monkeypatch.setenv("GROQ_API_KEY", "test-key")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")


def answers_in(journal_path: Path) -> Counter:
    lines = [json.loads(line) for line in journal_path.read_text().splitlines()]
    return Counter(line["key"] for line in lines if "answer" in line)


@pytest.mark.parametrize("provider", ["groq", "openai"])
def test_under_a_30_percent_fault_mix_every_sentence_is_labelled_exactly_once(tmp_path, keys, provider):
    sentences = rows(80)
    with FakeProvider(faults=FAULT_MIX, hang_seconds=3.0, latency=(0.0, 0.02), seed=3) as server:
        params = params_for(server, provider, timeout=0.5, max_retries=12, concurrency=8)
        with TeacherJournal(tmp_path / "journal.jsonl") as journal:
            labeled, stats = label_sentences(sentences, params, lambda: make_teacher(params), journal)
    faults = sum(count for status, count in server.status_counts.items() if status != 200)
    assert faults >= 10  # the mix really happened
    assert [row["id"] for row in labeled] == [s["id"] for s in sentences]
    assert all(row["triples"] for row in labeled)
    assert set(answers_in(tmp_path / "journal.jsonl").values()) == {1}  # each answer journalled once
    assert stats["answers"] == 80 and stats["failures"] == 0 and stats["retries"] == stats["requests_sent"] - 80
    assert set(stats["retries_by_cause"]) <= {
        "500",
        "503",
        "timeout",
        "connection",
        "malformed_response",
        "empty_choices",
    }


def test_a_request_that_keeps_failing_is_recorded_and_retried_by_the_next_run(tmp_path, keys):
    sentences = rows(6)
    with FakeProvider(faults={"503": 1.0}) as server:
        params = params_for(server, max_retries=2)
        failed = r"6 of 6 teacher requests still failed.*503 x6.*re-run"
        with pytest.raises(PipelineError, match=failed), TeacherJournal(tmp_path / "journal.jsonl") as journal:
            label_sentences(sentences, params, lambda: make_teacher(params), journal)
        assert server.attempts == 18  # 1 + 2 retries each
    failures = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert len(failures) == 6 and all(line["failed"].startswith("503") for line in failures)
    with FakeProvider() as server, TeacherJournal(tmp_path / "journal.jsonl") as journal:
        params = params_for(server, max_retries=2)
        labeled, stats = label_sentences(sentences, params, lambda: make_teacher(params), journal)
        assert journal.failures == {} and stats["answers"] == 6 and len(labeled) == 6


class RecordingTeacher:
    """Wraps a teacher and notes when each request left."""

    def __init__(self, teacher):
        self.teacher, self.sent = teacher, []

    async def complete(self, messages):
        self.sent.append(time.monotonic())
        return await self.teacher.complete(messages)


def most_in_any_window(times: list[float], window: float) -> int:
    times = sorted(times)
    return max(sum(1 for t in times[i:] if t - start < window) for i, start in enumerate(times))


def test_the_limiter_keeps_under_the_servers_request_limit(keys):
    window, limit = 1.0, 8
    with FakeProvider(rpm_limit=limit, minute_seconds=window, latency=(0.05, 0.1)) as server:
        params = params_for(server, concurrency=6)
        teacher = RecordingTeacher(make_teacher(params))
        requests = [Request(f"k{i}", [{"role": "user", "content": f"A{i} is b."}], 10) for i in range(30)]
        # As in production, the client's window is a little longer than the server's (60.25 s for 60).
        limiter = RateLimiter(Limits(limit, None, None), requests_header_is_daily=False, window=window + 0.1)
        policy = RetryPolicy(max_retries=5, backoff_base=0.01, backoff_max=0.05, concurrency=6)
        stats = asyncio.run(ask_all(requests, teacher, lambda r, c: None, policy, limiter))
    assert stats.answered == 30
    assert most_in_any_window(teacher.sent, window) <= limit + 1  # at most one request's worth over
    assert server.status_counts.get(429, 0) <= 30 // limit  # at worst a refusal as a window turns over
    elapsed = teacher.sent[-1] - teacher.sent[0]
    assert elapsed >= (30 // limit - 1) * window  # it did wait for the windows to pass


def test_the_limiter_keeps_under_the_servers_token_limit(keys):
    window, tpm = 1.0, 400
    with FakeProvider(tpm_limit=tpm, minute_seconds=window) as server:
        params = params_for(server, concurrency=6, max_tokens=20)
        teacher = make_teacher(params)
        text = "word " * 60  # about 60 prompt tokens + 20 reserved for the answer
        requests = [Request(f"k{i}", [{"role": "user", "content": f"{i} {text}"}], 61, 20) for i in range(20)]
        limiter = RateLimiter(Limits(None, tpm, None), requests_header_is_daily=False, window=window + 0.1)
        policy = RetryPolicy(max_retries=5, backoff_base=0.01, backoff_max=0.05, concurrency=6)
        stats = asyncio.run(ask_all(requests, teacher, lambda r, c: None, policy, limiter))
    assert stats.answered == 20
    assert server.status_counts.get(429, 0) <= 2


@pytest.mark.parametrize("counts_max_tokens", [True, False])
def test_pacing_follows_what_the_provider_counts(keys, counts_max_tokens):
    # Azure OpenAI counts prompt + max_tokens whatever an answer used; Groq counts the tokens used. Following the
    # usage field against the first sends more than its window holds (5 to 16% 429s): the limiter must follow the
    # provider's x-ratelimit-remaining-tokens, and against the second keep shrinking reservations to the usage.
    window, tpm, count = 1.0, 1600, 80
    provider = FakeProvider(
        tpm_limit=tpm, minute_seconds=window, latency=(0.02, 0.05), counts_max_tokens=counts_max_tokens
    )
    with provider as server:
        params = params_for(server, "openai", concurrency=6, max_tokens=60)
        teacher = make_teacher(params)
        messages = [[{"role": "user", "content": f"{i} " + "word " * 20}] for i in range(count)]
        requests = [Request(f"k{i}", m, estimate_prompt_tokens(m), params.max_tokens) for i, m in enumerate(messages)]
        limiter = RateLimiter(Limits(None, tpm, None), requests_header_is_daily=False, window=window + 0.1)
        policy = RetryPolicy(max_retries=8, backoff_base=0.01, backoff_max=0.05, concurrency=6)
        stats = asyncio.run(ask_all(requests, teacher, lambda r, c: None, policy, limiter))
    assert stats.answered == count
    assert server.status_counts.get(429, 0) <= 0.02 * server.attempts
    assert limiter.keeps_reservations == counts_max_tokens


SYSTEM = "Extract every relation in the text as one triple head|relation|tail per line. " * 20  # ~400 tokens


@pytest.mark.parametrize("scale", [1.1, 0.9])
def test_pacing_calibrates_to_a_provider_that_counts_its_own_way(keys, scale):
    # The provider counts 10% more (or less) than characters / 4, plus 4 tokens a message: 12% more (8% less) than
    # the estimate. Uncalibrated, the in-flight requests it under-counts get 429s (2 of 40 here), and the headers'
    # under-count passes for a provider that keeps max_tokens counted, which halves the pace for the rest of the run.
    window, tpm, count = 1.0, 6000, 40
    counting = {"tokenizer": count_characters(scale), "message_tokens": 4}
    with FakeProvider(tpm_limit=tpm, minute_seconds=window, latency=(0.02, 0.05), **counting) as server:
        params = params_for(server, concurrency=8, max_tokens=60)
        messages = [
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": s["text"]}] for s in rows(count)
        ]
        requests = [Request(f"k{i}", m, estimate_prompt_tokens(m), 60) for i, m in enumerate(messages)]
        limiter = RateLimiter(Limits(None, tpm, None), requests_header_is_daily=True, window=window + 0.1)
        policy = RetryPolicy(max_retries=8, backoff_base=0.01, backoff_max=0.05, concurrency=8)
        stats = asyncio.run(ask_all(requests, make_teacher(params), lambda r, c: None, policy, limiter))
        counted = max(server.prompt_tokens(m) / estimate_prompt_tokens(m) for m in messages)
    assert stats.answered == count and server.status_counts.get(429, 0) == 0
    assert limiter.scale == pytest.approx(counted, rel=0.01) and not limiter.keeps_reservations


def test_the_limiter_reserves_what_the_provider_will_count():
    limiter = RateLimiter(Limits(None, 1000, None), requests_header_is_daily=True, window=60)
    first = Reservation(time.monotonic() + 60, prompt=100, budget=50)
    assert limiter.tokens(first) == 150  # nothing answered yet: the estimate as is
    limiter.settle(first, prompt_tokens=120, completion_tokens=9, headers=None)
    assert (limiter.scale, first.counted) == (1.2, 129)
    assert limiter.tokens(Reservation(0, prompt=200, budget=50)) == 290  # 200 * 1.2 + 50
    limiter.settle(Reservation(0, prompt=100, budget=50), prompt_tokens=105, completion_tokens=9, headers=None)
    assert limiter.scale == 1.2  # the largest recent ratio: under-counting a request costs a 429
    silent, refused, failed = (Reservation(0, prompt=100, budget=50) for _ in range(3))
    limiter.settle(silent, prompt_tokens=0, completion_tokens=0, headers=None)
    limiter.failed(refused, refused=True)
    limiter.failed(failed, refused=False)
    # No usage: nothing says it used less. A 429: nothing was admitted. A 503: the provider may have counted it.
    assert [limiter.tokens(reservation) for reservation in (silent, refused, failed)] == [170, 0, 170]
    # Each stays a window after it came back, however long ago it was sent: the provider admitted it in between.
    assert all(reservation.expires > time.monotonic() + 59 for reservation in (first, silent, refused, failed))


def test_retry_after_is_obeyed_by_every_request(keys):
    with FakeProvider(rpm_limit=2, minute_seconds=1.0) as server:
        params = params_for(server)
        started = time.monotonic()
        teacher = make_teacher(params)
        requests = [Request(f"k{i}", [{"role": "user", "content": f"A{i} is b."}], 10) for i in range(6)]
        policy = RetryPolicy(max_retries=10, backoff_base=0.01, backoff_max=0.02, concurrency=4)
        stats = asyncio.run(ask_all(requests, teacher, lambda r, c: None, policy, limiter=None))
    # No client-side limits: the provider's 429s and their retry-after (1 s) pace the run instead.
    assert stats.answered == 6 and stats.retries["429"] >= 1
    assert time.monotonic() - started >= 2.0


def test_metrics_count_answers_per_minute_and_429s_apart(tmp_path, keys):
    with FakeProvider(rpm_limit=3, minute_seconds=1.0) as server:
        params = params_for(server, concurrency=6, max_retries=10)
        with TeacherJournal(tmp_path / "journal.jsonl") as journal:
            _, stats = label_sentences(rows(9), params, lambda: make_teacher(params), journal)
    assert stats["rate_limited"] == server.status_counts[429] >= 3
    assert stats["requests_sent"] == 9 + stats["rate_limited"]
    # 9 answers over about 3 s: the provider's 3 a second, 180/min, not the requests sent (429s included).
    assert stats["answers_per_minute"] == pytest.approx(9 / stats["wall_seconds"] * 60)
    assert stats["answers_per_minute"] <= 3 * 60 * 1.5


@pytest.mark.parametrize("stop", ["failures", "daily_budget"])
def test_a_run_that_stops_prints_its_summary_first(tmp_path, keys, capsys, stop):
    limits = {"rpm": None, "tpm": None, "rpd": 4 if stop == "daily_budget" else None}
    with FakeProvider(faults={"503": 1.0} if stop == "failures" else {}) as server:
        params = params_for(server, max_retries=2, concurrency=2, limits=limits)
        with pytest.raises(PipelineError), TeacherJournal(tmp_path / "journal.jsonl") as journal:
            label_sentences(rows(6), params, lambda: make_teacher(params), journal)
    summary = capsys.readouterr().err.splitlines()[-1]
    if stop == "failures":
        assert (
            "answers 0, requests_sent 18, retries 12, retries_by_cause {'503': 12}, rate_limited 0, failures 6"
            in summary
        )
    else:
        assert "answers 4, requests_sent 4, retries 0" in summary and "failures 0" in summary


def test_rate_limit_headers_teach_the_limiter():
    limiter = RateLimiter(Limits(rpm=None, tpm=None, rpd=None), requests_header_is_daily=True)
    limiter.observe({"x-ratelimit-limit-tokens": "6000", "x-ratelimit-limit-requests": "1000"})
    assert (limiter.limits.tpm, limiter.limits.rpd, limiter.limits.rpm) == (6000, 1000, None)
    limiter.observe({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "7.5s"})
    assert limiter.hold_until - time.monotonic() > 7.0
    assert parse_duration("2m59.56s") == pytest.approx(179.56) and parse_duration("120ms") == pytest.approx(0.12)
    assert retry_after_seconds({"retry-after-ms": "1500"}) == 1.5 and retry_after_seconds({"retry-after": "3"}) == 3


def test_the_daily_limit_stops_the_run_resumably(tmp_path, keys):
    sentences = rows(10)
    with FakeProvider() as server:
        params = params_for(server, limits={"rpm": None, "tpm": None, "rpd": 4}, concurrency=2)
        spent = r"teacher.limits.rpd \(4\) requests sent"
        with pytest.raises(PipelineError, match=spent), TeacherJournal(tmp_path / "journal.jsonl") as journal:
            label_sentences(sentences, params, lambda: make_teacher(params), journal)
    assert sum(answers_in(tmp_path / "journal.jsonl").values()) == 4


def stage(workdir: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "stages/synthesize.py")], cwd=workdir, env=env, capture_output=True, text=True
    )


def write_project(workdir: Path, server: FakeProvider, sentences: list[dict], **teacher) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["teacher"].update(
        provider="groq", model=MODEL, base_url=server.url, limits={"rpm": None, "tpm": None, "rpd": None},
        backoff_base=0.01, backoff_max=0.05,
    )  # fmt: skip
    params["teacher"].update(teacher)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_jsonl(workdir / "data/sentences.jsonl", sentences)
    return {**os.environ, "GROQ_API_KEY": "test-key", "HF_HUB_OFFLINE": "1"}


def test_kill_9_mid_run_loses_nothing_and_reasks_nothing(tmp_path):
    sentences = rows(60)
    with FakeProvider(latency=(0.05, 0.15)) as server:
        env = write_project(tmp_path, server, sentences, concurrency=4)
        process = subprocess.Popen([sys.executable, str(ROOT / "stages/synthesize.py")], cwd=tmp_path, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        journal = tmp_path / "data/teacher_journal.jsonl"
        deadline = time.monotonic() + 60
        while (not journal.exists() or len(journal.read_text().splitlines()) < 20) and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
        time.sleep(0.3)  # requests in flight at the kill finish at the provider; their answers are lost
        assert not (tmp_path / "data/labeled.jsonl").exists()
        before = answers_in(journal)
        asked_before = Counter(server.completed_texts)
        result = stage(tmp_path, env)
        assert result.returncode == 0, result.stderr[-2000:]
        asked_after = server.completed_texts - asked_before
    params = load_block(TeacherParams, "teacher", yaml.safe_load((tmp_path / "params.yaml").read_text()))
    texts = [s["text"] for s in sentences]
    text_of = {request.key: text for request, text in zip(build_requests(texts, params), texts, strict=True)}
    journalled_before = {text_of[key] for key in before}
    assert 20 <= len(before) < 60
    assert set(answers_in(journal).values()) == {1} and len(answers_in(journal)) == 60
    assert not journalled_before & set(asked_after)  # nothing answered and journalled was asked again
    assert sum(asked_after.values()) == 60 - len(before)  # and everything else was asked once
    labeled = read_jsonl(tmp_path / "data/labeled.jsonl")
    assert sorted(row["text"] for row in labeled) == sorted(texts) and len(labeled) == 60


def journal_answers(path: Path) -> list:
    return [line["answer"] for line in map(json.loads, path.read_text().splitlines()) if "answer" in line]


def test_junk_and_malformed_answers_end_with_every_sentence_labelled_by_a_usable_one(tmp_path):
    sentences = rows(40)
    faults = {fault: 0.035 for fault in (*MALFORMED_BODIES, *JUNK_ANSWERS)}  # 38.5% of answers, 11 kinds
    with FakeProvider(faults=faults, seed=7) as server:
        env = write_project(tmp_path, server, sentences, concurrency=4, reask=5, max_retries=8)
        first = stage(tmp_path, env)
        assert first.returncode == 0, first.stderr[-2000:]
        metrics = json.loads((tmp_path / "metrics/synthesize.json").read_text())
        attempts, labeled = server.attempts, (tmp_path / "data/labeled.jsonl").read_text()
        second = stage(tmp_path, env)  # as a second `dvc repro` runs it
        assert second.returncode == 0 and server.attempts == attempts  # it sent nothing
    assert (tmp_path / "data/labeled.jsonl").read_text() == labeled
    rows_out = read_jsonl(tmp_path / "data/labeled.jsonl")
    assert [row["triples"] for row in rows_out] == [[default_answer(s["text"]).split("|")] for s in sentences]
    assert not any("unusable" in row for row in rows_out) and "warning" not in first.stderr
    assert metrics["reasked_answers"] >= 5 and metrics["unusable_answers"] == 0
    assert metrics["retries_by_cause"]["malformed_response"] >= 5 and metrics["stripped_lines"] >= 1
    answers = journal_answers(tmp_path / "data/teacher_journal.jsonl")
    assert all(isinstance(answer, str) for answer in answers)
    assert len(answers) == 40 + metrics["reasked_answers"]  # every answer kept, the unusable ones too


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ({"key": "wrong"}, "error: teacher rejected the API key (401: Invalid API Key); check GROQ_API_KEY"),
        ({"model": "llama3-70b-8192"}, "teacher model 'llama3-70b-8192' is not available (400: The model"),
        ({"base_url": "http://127.0.0.1:9"}, "could not reach the teacher at http://127.0.0.1:9"),
        ({"provider": "openai", "base_url": "http://127.0.0.1:9/v1"}, "could not reach the teacher at http://127"),
    ],
)
def test_what_retrying_cant_fix_fails_fast_with_one_line(tmp_path, setup, message):
    with FakeProvider(latency=(0.3, 0.3)) as server:
        params = {key: value for key, value in setup.items() if key != "key"}
        env = write_project(tmp_path, server, rows(40), max_retries=2, timeout=2.0, **params)
        env |= {"GROQ_API_KEY": setup.get("key", "test-key"), "OPENAI_API_KEY": "test-key"}
        started = time.monotonic()
        result = stage(tmp_path, env)
    assert result.returncode == 1 and time.monotonic() - started < 20
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line: no bar, no summary, no traceback
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert server.attempts <= 1  # the first request went alone
    assert not (tmp_path / "data/labeled.jsonl").exists()


def test_batch_mode_reasks_unusable_answers_in_batches_of_their_own(tmp_path):
    sentences = rows(12)
    junk = {"no_triples": 0.2, "cut": 0.1, "null_content": 0.1}
    with FakeProvider(batch_seconds=0.2, faults={**junk, "numeric_content": 0.1, "html_200": 0.1}, seed=5) as server:
        env = write_project(tmp_path, server, sentences, mode="batch", batch_poll_seconds=0.05, reask=4)
        first = stage(tmp_path, env)  # a malformed line is a failure: asked again by the next run
        assert first.returncode == 1 and "malformed_response x" in first.stderr, first.stderr[-2000:]
        server.faults = junk
        second = stage(tmp_path, env)
        assert second.returncode == 0, second.stderr[-2000:]
        batches = len(server.batches)
        third = stage(tmp_path, env)
        assert third.returncode == 0 and len(server.batches) == batches  # nothing left to ask
    metrics = json.loads((tmp_path / "metrics/synthesize.json").read_text())
    assert batches >= 3 and metrics["requests_sent"] == 0
    labeled = read_jsonl(tmp_path / "data/labeled.jsonl")
    assert [row["triples"] for row in labeled] == [[default_answer(s["text"]).split("|")] for s in sentences]
    assert all(isinstance(answer, str) for answer in journal_answers(tmp_path / "data/teacher_journal.jsonl"))


@pytest.mark.parametrize("error_rate", [0.0, 0.3])
def test_batch_mode_end_to_end(tmp_path, error_rate):
    sentences = rows(12)
    with FakeProvider(batch_seconds=0.3, batch_error_rate=error_rate, seed=5) as server:
        env = write_project(tmp_path, server, sentences, mode="batch", batch_poll_seconds=0.05)
        first = stage(tmp_path, env)
        if error_rate:
            assert first.returncode == 1 and "teacher requests still failed" in first.stderr
            lines = (tmp_path / "data/teacher_journal.jsonl").read_text().splitlines()
            failed = [json.loads(line) for line in lines]
            assert any("failed" in line for line in failed) and any("batch" in line for line in failed)
            server.batch_error_rate = 0.0
            second = stage(tmp_path, env)  # a new batch with only the failed requests
            assert second.returncode == 0, second.stderr[-2000:]
            assert len(server.batches) == 2
        else:
            assert first.returncode == 0, first.stderr[-2000:]
            assert len(server.batches) == 1 and server.attempts == 0  # no online request at all
    labeled = read_jsonl(tmp_path / "data/labeled.jsonl")
    assert [row["id"] for row in labeled] == [s["id"] for s in sentences] and all(row["triples"] for row in labeled)
    assert set(answers_in(tmp_path / "data/teacher_journal.jsonl").values()) == {1}
