import asyncio
import json
import socket
import time
from collections import Counter

import pytest
import yaml
from conftest import ROOT
from fake_provider import HTML_PAGE, MALFORMED_BODIES, FakeProvider

from redistill.errors import PipelineError
from redistill.params import load_block
from redistill.prompts import DEFAULT_SYSTEM_PROMPT, chat_messages
from redistill.synthesis import build_requests, label_sentences, unusable_warning
from redistill.teacher import Completion, RetryableError, TeacherError, TeacherParams, make_teacher
from redistill.teacher.base import completion_from_body
from redistill.teacher.journal import TeacherJournal, request_key

SENTENCES = [{"id": str(i), "text": f"Company{i} was founded in City{i}."} for i in range(6)]


def teacher_params(**changes) -> TeacherParams:
    """The shipped teacher params, with ``changes`` and no retries unless asked for."""
    block = {**yaml.safe_load((ROOT / "params.yaml").read_text())["teacher"], "model": "teacher-model"}
    block.update(max_retries=0, timeout=10.0, cassette="cassette.jsonl", limits={"rpm": None, "tpm": None, "rpd": None})
    return load_block(TeacherParams, "teacher", {"teacher": {**block, **changes}})


def complete(teacher, text: str, prompt: str = DEFAULT_SYSTEM_PROMPT):
    return asyncio.run(teacher.complete(chat_messages(text, prompt)))


@pytest.fixture
def server():
    with FakeProvider() as provider:
        yield provider


@pytest.mark.parametrize(
    ("provider", "suffix", "variable"), [("groq", "", "GROQ_API_KEY"), ("openai", "/v1", "OPENAI_API_KEY")]
)
def test_both_sdks_speak_to_a_chat_completions_server(server, monkeypatch, provider, suffix, variable):
    monkeypatch.setenv(variable, "test-key")
    params = teacher_params(provider=provider, base_url=server.url + suffix, reasoning_effort="low")
    completion = complete(make_teacher(params), "Alice lives in Paris.", params.prompt)
    assert completion.text == "Alice|is followed by|Paris"
    assert completion.finish_reason == "stop"
    assert completion.prompt_tokens > 0 and completion.completion_tokens == 3
    body = server.requests[-1]
    assert server.paths == ["/openai/v1/chat/completions" if provider == "groq" else "/v1/chat/completions"]
    assert body["messages"] == [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": "Alice lives in Paris."},
    ]
    assert (body["temperature"], body["max_tokens"], body["top_p"]) == (0.5, 128, 1.0)
    assert body["reasoning_effort"] == "low"


def test_the_groq_sdk_honours_groq_base_url(server, monkeypatch):
    monkeypatch.setenv("GROQ_API_KEY", "test-key")
    monkeypatch.setenv("GROQ_BASE_URL", server.url)
    complete(make_teacher(teacher_params()), "A b.")
    assert len(server.requests) == 1


@pytest.mark.parametrize(("provider", "variable"), [("groq", "GROQ_API_KEY"), ("openai", "OPENAI_API_KEY")])
def test_missing_key_fails_before_any_request(provider, variable):
    with pytest.raises(TeacherError, match=f"{variable} is not set; export {variable}="):
        make_teacher(teacher_params(provider=provider))


def test_bad_key_names_the_variable(server, monkeypatch):
    monkeypatch.setenv("GROQ_API_KEY", "wrong")
    with pytest.raises(TeacherError, match=r"rejected the API key \(401: Invalid API Key\); check GROQ_API_KEY"):
        complete(make_teacher(teacher_params(base_url=server.url)), "x")


@pytest.mark.parametrize("model", ["llama3-70b-8192", "no-such-model"])
def test_retired_or_unknown_model_names_the_param(server, monkeypatch, model):
    monkeypatch.setenv("GROQ_API_KEY", "test-key")
    teacher = make_teacher(teacher_params(base_url=server.url, model=model))
    with pytest.raises(TeacherError, match=f"teacher model '{model}' is not available.*set teacher.model"):
        complete(teacher, "x")


def test_a_base_url_without_the_api_names_the_param(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    teacher = make_teacher(teacher_params(provider="openai", base_url=server.url + "/wrong"))
    with pytest.raises(TeacherError, match=r"has no chat-completions endpoint \(404: .*check teacher\.base_url"):
        complete(teacher, "x")


def test_unreachable_server_names_the_url(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    params = teacher_params(provider="openai", base_url="http://127.0.0.1:9/v1", timeout=2.0, max_retries=1)
    unreachable = r"could not reach the teacher at http://127.0.0.1:9/v1.*teacher.base_url"
    with pytest.raises(PipelineError, match=unreachable), TeacherJournal(tmp_path / "journal.jsonl") as journal:
        label_sentences(SENTENCES, params, lambda: make_teacher(params), journal)
    assert not (tmp_path / "journal.jsonl").exists()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("provider", ["groq", "openai"])
def test_a_refused_connection_fails_at_once_with_the_shipped_retries(monkeypatch, tmp_path, provider):
    monkeypatch.setenv("GROQ_API_KEY", "k")
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())["teacher"]
    url = f"http://127.0.0.1:{closed_port()}" + ("/v1" if provider == "openai" else "")
    params = teacher_params(
        provider=provider, base_url=url, **{key: shipped[key] for key in ("max_retries", "backoff_base", "timeout")}
    )
    started = time.monotonic()
    unreachable = f"could not reach the teacher at {url}.*teacher.base_url"
    with pytest.raises(PipelineError, match=unreachable), TeacherJournal(tmp_path / "journal.jsonl") as journal:
        label_sentences(SENTENCES, params, lambda: make_teacher(params), journal)
    assert time.monotonic() - started < 2


def test_replay_answers_from_the_cassette(tmp_path):
    cassette = tmp_path / "cassette.jsonl"
    cassette.write_text(json.dumps({"text": "Alice lives in Paris.", "answer": "Alice|lives in|Paris"}) + "\n")
    teacher = make_teacher(teacher_params(provider="replay", cassette=str(cassette)))
    assert complete(teacher, "alice lives  in Paris.").text == "Alice|lives in|Paris"
    with pytest.raises(TeacherError, match="has no answer for 'Bob"):
        complete(teacher, "Bob lives in Rome.")
    cassette.write_text('{"text": "x"}\n')
    with pytest.raises(TeacherError, match="entry 1 needs string fields 'text' and 'answer'"):
        make_teacher(teacher_params(provider="replay", cassette=str(cassette)))


class FlakyTeacher:
    """Answers ``limit`` requests, then dies as a killed process would."""

    def __init__(self, limit=None):
        self.limit = limit
        self.calls = []

    async def complete(self, messages):
        if self.limit is not None and len(self.calls) >= self.limit:
            raise KeyboardInterrupt
        self.calls.append(messages[-1]["content"])
        return Completion(text=f"{messages[-1]['content'].split()[0]}|was founded in|somewhere.", finish_reason="stop")


def test_interrupted_run_resumes_without_repeating_a_call(tmp_path):
    params = teacher_params()
    first = FlakyTeacher(limit=4)
    with pytest.raises(KeyboardInterrupt), TeacherJournal(tmp_path / "journal.jsonl") as journal:
        label_sentences(SENTENCES, params, lambda: first, journal)
    second = FlakyTeacher()
    with TeacherJournal(tmp_path / "journal.jsonl") as journal:
        labeled, stats = label_sentences(SENTENCES, params, lambda: second, journal)
    assert first.calls == [s["text"] for s in SENTENCES[:4]]
    assert second.calls == [s["text"] for s in SENTENCES[4:]]
    assert (stats["answers"], stats["cache_hits"], stats["triples"]) == (2, 4, 6)
    assert [r["id"] for r in labeled] == [s["id"] for s in SENTENCES]
    assert labeled[0]["triples"] == [["Company0", "was founded in", "somewhere"]]


def test_unchanged_rerun_makes_no_call_and_needs_no_teacher(tmp_path):
    params = teacher_params()
    with TeacherJournal(tmp_path / "journal.jsonl") as journal:
        first, _ = label_sentences(SENTENCES, params, FlakyTeacher, journal)

    def no_teacher():
        raise AssertionError("the teacher was built although every answer is journalled")

    with TeacherJournal(tmp_path / "journal.jsonl") as journal:
        again, stats = label_sentences(SENTENCES, params, no_teacher, journal)
    assert again == first and stats["answers"] == 0 and stats["cache_hits"] == len(SENTENCES)


def test_a_changed_sampling_param_asks_again(tmp_path):
    teacher = FlakyTeacher()
    with TeacherJournal(tmp_path / "journal.jsonl") as journal:
        label_sentences(SENTENCES, teacher_params(), lambda: teacher, journal)
        _, stats = label_sentences(SENTENCES, teacher_params(temperature=0.7), lambda: teacher, journal)
    assert stats["answers"] == len(SENTENCES) and len(teacher.calls) == 2 * len(SENTENCES)


def test_request_key_covers_provider_model_messages_and_sampling():
    messages = chat_messages("x", "p")
    sampling = teacher_params().sampling
    key = request_key("groq", "m", messages, sampling)
    assert key == request_key("groq", "m", chat_messages("x", "p"), dict(sampling))
    assert key != request_key("openai", "m", messages, sampling)
    assert key != request_key("groq", "m2", messages, sampling)
    assert key != request_key("groq", "m", chat_messages("x", "q"), sampling)
    assert key != request_key("groq", "m", messages, {**sampling, "top_p": 0.9})


def test_a_torn_last_line_from_a_crash_is_dropped(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text(json.dumps({"key": "a", "answer": "A|r|B"}) + "\n" + '{"key": "b", "ans')
    with TeacherJournal(path) as journal:
        assert journal.get("a") and journal.get("b") is None
        journal.write({"key": "c", "answer": "C|r|D"})
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "c"]
    path.write_text('{"broken\n' + json.dumps({"key": "a"}) + "\n")
    with pytest.raises(Exception, match=r"journal.jsonl:1: not valid JSON; the journal is damaged"):
        TeacherJournal(path)


def test_a_complete_last_line_without_its_newline_keeps_its_answer(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text(json.dumps({"key": "a", "answer": "A|r|B"}) + "\n" + json.dumps({"key": "b", "answer": "B|r|C"}))
    with TeacherJournal(path) as journal:
        assert journal.get("b")["answer"] == "B|r|C"
        journal.write({"key": "c", "answer": "C|r|D"})
    with TeacherJournal(path) as journal:
        assert [journal.get(key)["answer"] for key in "abc"] == ["A|r|B", "B|r|C", "C|r|D"]
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 3


def test_an_answer_holding_a_unicode_line_separator_survives_a_reload(tmp_path):
    path = tmp_path / "journal.jsonl"
    answer = "A|said|B\u2028C\x85D"  # written as is (ensure_ascii=False); str.splitlines() breaks at both
    with TeacherJournal(path) as journal:
        journal.write({"key": "a", "answer": answer})
        journal.write({"key": "b", "answer": "B|r|C"})
    with TeacherJournal(path) as journal:
        assert journal.get("a")["answer"] == answer and journal.get("b")["answer"] == "B|r|C"


# --- what a 200 can hold: one validator before the journal ---------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "cause", "says"),
    [
        (HTML_PAGE, "malformed_response", "the answer is not JSON: '<!DOCTYPE html>"),
        (b"[1, 2]", "malformed_response", "the answer is a list, not a JSON object"),
        ({"choices": "A|r|B"}, "malformed_response", "choices are a string, not a list"),
        ({"error": {"message": "upstream timed out"}}, "malformed_response", "null, not a list (error: 'upstream"),
        ({"choices": [{"index": 0, "text": "A|r|B"}]}, "malformed_response", "first choice has no message object"),
        ({"choices": ["A|r|B"]}, "malformed_response", "first choice has no message object"),
        ({"choices": [{"message": {"content": 42}}]}, "malformed_response", "content is a number, not text: '42'"),
        ({"choices": [{"message": {"content": ["A|r|B"]}}]}, "malformed_response", "content is a list"),
        ({"choices": [{"message": {"content": "A|r|B"}, "finish_reason": 1}]}, "malformed_response", "finish_reason"),
        ({"choices": []}, "empty_choices", "the answer had no choices"),
    ],
)
def test_a_body_that_is_no_chat_completion_is_a_fault_with_its_cause(body, cause, says):
    with pytest.raises(RetryableError) as caught:
        completion_from_body(body)
    assert caught.value.cause == cause and says in str(caught.value)


def test_malformed_answers_are_retried_and_named_when_their_retries_are_spent(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("GROQ_API_KEY", "test-key")
    with FakeProvider(faults={"choices_string": 0.5, "numeric_content": 0.5}) as server:
        params = teacher_params(base_url=server.url, max_retries=2, backoff_base=0.01, backoff_max=0.01)
        failed = r"6 of 6 teacher requests still failed after teacher.max_retries retries \(malformed_response x6\)"
        with pytest.raises(PipelineError, match=failed), TeacherJournal(tmp_path / "journal.jsonl") as journal:
            label_sentences(SENTENCES, params, lambda: make_teacher(params), journal)
    assert server.attempts == 18 and "retries_by_cause {'malformed_response': 12}" in capsys.readouterr().err
    assert all("failed" in line for line in journal_lines(tmp_path / "journal.jsonl"))  # no answer journalled


def test_a_chat_completion_becomes_a_completion_whatever_its_usage_says():
    body = {"choices": [{"message": {"content": None}, "finish_reason": "length"}], "usage": {"prompt_tokens": None}}
    assert completion_from_body(body) == Completion(text="", finish_reason="length")
    body = {"choices": [{"message": {"content": "A|r|B"}}], "usage": {"prompt_tokens": 7, "completion_tokens": True}}
    assert completion_from_body(json.dumps(body).encode()) == Completion("A|r|B", None, prompt_tokens=7)
    assert completion_from_body({**body, "usage": "lots"}).prompt_tokens == 0


@pytest.mark.parametrize("fault", MALFORMED_BODIES)
@pytest.mark.parametrize("provider", ["groq", "openai"])
def test_both_sdks_turn_a_malformed_200_into_a_retryable_fault(monkeypatch, provider, fault):
    monkeypatch.setenv("GROQ_API_KEY", "test-key")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with FakeProvider(faults={fault: 1.0}) as server:
        params = teacher_params(provider=provider, base_url=server.url + ("/v1" if provider == "openai" else ""))
        with pytest.raises(RetryableError) as caught:
            complete(make_teacher(params), "Alice lives in Paris.")
    assert caught.value.cause == "malformed_response"
    assert caught.value.headers is not None  # the limiter still learns from them


# --- re-asking unusable answers ------------------------------------------------------------------------------------

GOOD = {s["text"]: f"{s['text'].split()[0]}|was founded in|{s['text'].split()[-1].rstrip('.')}" for s in SENTENCES}


class ScriptedTeacher:
    """Answers each text with the next of its scripted completions (the last one again once they run out)."""

    def __init__(self, script: dict[str, list[Completion]], limit: int | None = None):
        self.script, self.limit, self.calls = script, limit, []

    async def complete(self, messages):
        if self.limit is not None and len(self.calls) >= self.limit:
            raise KeyboardInterrupt
        text = messages[-1]["content"]
        answers = self.script.get(text) or [Completion(GOOD[text], "stop")]
        self.calls.append(text)
        return answers[min(self.calls.count(text), len(answers)) - 1]


JUNK = [
    Completion("I could not find any relation in this text.", "stop"),  # prose, no triple
    Completion("", "length"),  # null content: a reasoning model spent max_tokens thinking
    Completion("Company2|was founded in|Ci", "length"),  # cut at max_tokens
    Completion("", "stop"),  # empty
    Completion("Let me think about this.\n" * 5000, "stop"),  # a 120 KB ramble
]


def junk_then_good() -> dict[str, list[Completion]]:
    """Sentences 0-4 answered with one kind of junk each, then well; sentence 5 well at once."""
    return {s["text"]: [junk, Completion(GOOD[s["text"]], "stop")] for s, junk in zip(SENTENCES, JUNK, strict=False)}


def journal_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def no_teacher():
    raise AssertionError("the teacher was built although the journal answers everything")


def test_an_unusable_answer_is_asked_again_and_the_usable_one_labels(tmp_path):
    teacher = ScriptedTeacher(junk_then_good())
    with TeacherJournal(tmp_path / "journal.jsonl") as journal:
        labeled, stats = label_sentences(SENTENCES, teacher_params(), lambda: teacher, journal)
    assert [row["triples"] for row in labeled] == [[GOOD[s["text"]].split("|")] for s in SENTENCES]
    assert not any("unusable" in row for row in labeled)
    assert sorted(Counter(teacher.calls).values()) == [1, 2, 2, 2, 2, 2]
    assert (stats["answers"], stats["reasked_answers"], stats["unusable_answers"]) == (11, 5, 0)
    lines = journal_lines(tmp_path / "journal.jsonl")
    assert len(lines) == 11 and all(isinstance(line["answer"], str) for line in lines)  # every answer kept
    first = {line["key"] for line in lines if "reask" not in line}
    assert {(line["reask"], line["reask_of"] in first) for line in lines if "reask" in line} == {(1, True)}
    with TeacherJournal(tmp_path / "journal.jsonl") as journal:
        again, stats = label_sentences(SENTENCES, teacher_params(), no_teacher, journal)
    assert again == labeled and stats["requests_sent"] == 0 and stats["cache_hits"] == len(SENTENCES)


def test_answers_still_unusable_after_their_reasks_are_counted_and_named(tmp_path):
    script = {s["text"]: [junk] for s, junk in zip(SENTENCES, JUNK[:3], strict=False)}  # junk however often asked
    teacher = ScriptedTeacher(script)
    params = teacher_params(reask=2)
    with TeacherJournal(tmp_path / "journal.jsonl") as journal:
        labeled, stats = label_sentences(SENTENCES, params, lambda: teacher, journal)
    assert sorted(Counter(teacher.calls).values()) == [1, 1, 1, 3, 3, 3]
    assert (stats["reasked_answers"], stats["unusable_answers"]) == (6, 3)
    assert stats["unusable_by_reason"] == {"cut_at_max_tokens": 2, "no_triple": 1}
    assert [row.get("unusable") for row in labeled] == ["no_triple", "cut_at_max_tokens", "cut_at_max_tokens"] + [
        None
    ] * 3
    warning = unusable_warning(stats, params)
    assert warning == (
        "warning: 3 of 6 sentences have no usable teacher answer after 2 re-asks (cut at teacher.max_tokens x2, "
        """no triple x1); see them with: grep '"unusable"' data/labeled.jsonl; 33% were cut at teacher.max_tokens """
        "(128): raise it"
    )
    assert unusable_warning({**stats, "truncated_answers": 0}, params).endswith("data/labeled.jsonl")
    with TeacherJournal(tmp_path / "journal.jsonl") as journal:  # their re-asks are spent: nothing to ask
        _, again = label_sentences(SENTENCES, params, no_teacher, journal)
    assert again["requests_sent"] == 0 and again["unusable_answers"] == 3


@pytest.mark.parametrize(
    ("changes", "off_because"),
    [
        ({"reask": 0}, "teacher.reask is 0"),
        ({"temperature": 0.0}, "teacher.temperature is 0, so the same request gets the same answer"),
    ],
)
def test_no_reask_when_turned_off_or_when_the_answer_would_be_the_same(tmp_path, changes, off_because):
    teacher = ScriptedTeacher(junk_then_good())
    params = teacher_params(**changes)
    with TeacherJournal(tmp_path / "journal.jsonl") as journal:
        _, stats = label_sentences(SENTENCES, params, lambda: teacher, journal)
    assert len(teacher.calls) == len(SENTENCES) and stats["reasked_answers"] == 0
    assert stats["unusable_answers"] == 5 and f"(re-asks are off: {off_because})" in unusable_warning(stats, params)


def test_replay_never_reasks(tmp_path):
    cassette = tmp_path / "cassette.jsonl"
    cassette.write_text(
        "".join(json.dumps({"text": s["text"], "answer": "no relation here"}) + "\n" for s in SENTENCES)
    )
    params = teacher_params(provider="replay", cassette=str(cassette))
    with TeacherJournal(tmp_path / "journal.jsonl") as journal:
        _, stats = label_sentences(SENTENCES, params, lambda: make_teacher(params), journal)
    assert (stats["answers"], stats["reasked_answers"], stats["unusable_answers"]) == (6, 0, 6)
    assert "re-asks are off: teacher.provider is replay" in unusable_warning(stats, params)


def test_a_run_stopped_before_its_reasks_asks_only_those_next_time(tmp_path):
    first = ScriptedTeacher(junk_then_good(), limit=len(SENTENCES))  # dies once the first answers are in
    with pytest.raises(KeyboardInterrupt), TeacherJournal(tmp_path / "journal.jsonl") as journal:
        label_sentences(SENTENCES, teacher_params(), lambda: first, journal)
    second = ScriptedTeacher({text: answers[1:] for text, answers in junk_then_good().items()})
    with TeacherJournal(tmp_path / "journal.jsonl") as journal:
        labeled, stats = label_sentences(SENTENCES, teacher_params(), lambda: second, journal)
    assert sorted(second.calls) == sorted(s["text"] for s in SENTENCES[:5])  # the usable sixth is not asked again
    assert (stats["cache_hits"], stats["reasked_answers"], stats["unusable_answers"]) == (1, 5, 0)
    assert all(row["triples"] for row in labeled)


def test_a_journalled_answer_that_is_not_text_is_asked_again(tmp_path):
    params = teacher_params()
    keys = [request.key for request in build_requests([s["text"] for s in SENTENCES], params)]
    path = tmp_path / "journal.jsonl"
    old = [42, None, ["A", "r", "B"], {"text": "A|r|B"}]  # what an older version could write
    old_lines = [{"key": key, "answer": answer} for key, answer in zip(keys, old, strict=False)]
    path.write_text("".join(json.dumps(line) + "\n" for line in old_lines))
    teacher = ScriptedTeacher({})
    with TeacherJournal(path) as journal:
        labeled, stats = label_sentences(SENTENCES, params, lambda: teacher, journal)
    assert stats["answers"] == 6 and all(row["triples"] for row in labeled)
    with TeacherJournal(path) as journal:
        assert all(isinstance(journal.get(key)["answer"], str) for key in keys)
    path.write_text(path.read_text() + "[1, 2]\n")
    with pytest.raises(PipelineError, match=r"journal.jsonl:11: not a journal entry; the journal is damaged"):
        TeacherJournal(path)


# --- errors stay one line ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setup", ["key", "model"])
def test_what_retrying_cant_fix_is_learnt_from_one_request(monkeypatch, tmp_path, setup):
    monkeypatch.setenv("GROQ_API_KEY", "wrong" if setup == "key" else "test-key")
    with FakeProvider(latency=(0.2, 0.2)) as server:
        params = teacher_params(base_url=server.url, concurrency=16, **({"model": "gone"} if setup == "model" else {}))
        with pytest.raises(TeacherError), TeacherJournal(tmp_path / "journal.jsonl") as journal:
            label_sentences(SENTENCES * 3, params, lambda: make_teacher(params), journal)
    assert server.attempts == 1
