"""An append-only journal of teacher answers keyed by a hash of the request: resume and re-run for free.

Three kinds of line: an answer ``{"key", "answer", ...}``; a failure ``{"key", "failed": reason}`` (retried by the
next run); a batch ``{"batch": id, "keys": [...]}`` submitted, then ``{"batch": id, "done": true}``. A re-ask of an
unusable answer is a request of its own, keyed by ``reask_key``, so every answer stays in the journal. An answer
line whose answer is not a string (written by an older version) is ignored: that request is asked again.
"""

import hashlib
import json
import os
from pathlib import Path

from redistill.errors import PipelineError


def request_key(provider: str, model: str, messages: list[dict], sampling: dict) -> str:
    """SHA-256 of everything that shapes the answer; the same request always gets the same key."""
    request = {"provider": provider, "model": model, "messages": messages, "sampling": sampling}
    return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def reask_key(key: str, reask: int) -> str:
    """The key of re-ask number ``reask`` of the request keyed ``key``; re-ask 0 is the request itself."""
    return key if reask == 0 else hashlib.sha256(f"{key} reask {reask}".encode()).hexdigest()


class TeacherJournal:
    """Answers by request key. Each line is flushed and fsynced as it is written, so a crash loses none."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        self.failures: dict[str, str] = {}
        self.batches: dict[str, list[str]] = {}  # submitted and not yet collected: id -> request keys
        self._file = None  # opened on the first write, so a run that fails early leaves no file behind
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        text = self.path.read_text(encoding="utf-8")
        # split on "\n" only: answers may hold U+2028 and other characters str.splitlines() breaks at
        lines = text.removesuffix("\n").split("\n") if text else []
        for number, line in enumerate(lines, start=1):
            unended = number == len(lines) and not text.endswith("\n")  # the last line, missing its newline
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if unended:
                    self._drop_torn_tail(len(line.encode("utf-8")))
                    break
                raise PipelineError(
                    f"{self.path}:{number}: not valid JSON; the journal is damaged: fix or delete that line"
                ) from None
            if not isinstance(entry, dict) or not isinstance(entry.get("key", entry.get("batch")), str):
                raise PipelineError(
                    f"{self.path}:{number}: not a journal entry; the journal is damaged: fix or delete that line"
                )
            self._apply(entry)
            if unended:
                self._end_last_line()

    def _apply(self, entry: dict) -> None:
        if "batch" in entry:
            if entry.get("done"):
                self.batches.pop(entry["batch"], None)
            else:
                self.batches[entry["batch"]] = entry["keys"]
        elif "failed" in entry:
            self.failures[entry["key"]] = entry["failed"]
        elif isinstance(entry.get("answer"), str):
            self.entries[entry["key"]] = entry
            self.failures.pop(entry["key"], None)

    def _drop_torn_tail(self, size: int) -> None:
        # A crash mid-write leaves a partial last line; cut it so new entries start on a line of their own.
        with self.path.open("r+b") as handle:
            handle.truncate(os.path.getsize(self.path) - size)

    def _end_last_line(self) -> None:
        # A complete answer written without its newline (a crash between the two, an editor): end it, so the next
        # entry is not glued onto it, and the answer is kept.
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def write(self, entry: dict) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._apply(entry)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "TeacherJournal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
