"""A teacher that answers from a cassette of recorded answers: offline runs and the demo."""

from pathlib import Path

from redistill.io import read_jsonl
from redistill.sentences import sentence_id
from redistill.teacher.base import Completion, TeacherError


class ReplayTeacher:
    def __init__(self, cassette: str | Path) -> None:
        self.cassette = Path(cassette)
        self.answers: dict[str, str] = {}
        for number, record in enumerate(read_jsonl(self.cassette), start=1):
            if not isinstance(record.get("text"), str) or not isinstance(record.get("answer"), str):
                raise TeacherError(f"{self.cassette}: entry {number} needs string fields 'text' and 'answer'")
            self.answers[sentence_id(record["text"])] = record["answer"]

    async def complete(self, messages: list[dict]) -> Completion:
        text = messages[-1]["content"]
        answer = self.answers.get(sentence_id(text))
        if answer is None:
            raise TeacherError(
                f"{self.cassette} has no answer for {text[:60]!r}; add it, or use a live teacher.provider"
            )
        return Completion(text=answer, finish_reason="stop")
