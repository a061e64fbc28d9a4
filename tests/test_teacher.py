import asyncio
import json
import socket
import time

import pytest
import yaml
from conftest import ROOT
from fake_provider import FakeProvider

from redistill.errors import PipelineError
from redistill.params import load_block
from redistill.prompts import DEFAULT_SYSTEM_PROMPT, chat_messages
from redistill.synthesis import label_sentences
from redistill.teacher import TeacherError, TeacherParams, make_teacher
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
    assert time.monotonic() - started < 3


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
        from redistill.teacher import Completion

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
