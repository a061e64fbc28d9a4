"""One JSONL reader (errors name file and line) and atomic writers (temp file, then rename)."""

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from redistill.errors import PipelineError


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; anything else (a binary file, another encoding) is a PipelineError."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise PipelineError(
            f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
            "expected UTF-8 JSON"
        ) from None


def jsonl_values(text: str, name: str, hint: str = "fix or remove that line") -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of JSONL ``text``; ``name`` and ``hint`` go into the error
    for a line that is not JSON."""
    # split on "\n" only: JSON strings may hold U+2028 and other characters str.splitlines() breaks at
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise PipelineError(f"{name}:{number}: not valid JSON ({error.msg}); {hint}") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """Every line of ``path`` as a JSON object; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    records = []
    for number, record in jsonl_values(read_text(path), str(path)):
        if not isinstance(record, dict):
            raise PipelineError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def read_records(path: str | Path) -> list[dict]:
    """Records from a .jsonl file, a .json file holding a list of objects, or a .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".json":
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as error:
            raise PipelineError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise PipelineError(f"{path}: expected a JSON list of objects (or use .jsonl for one object per line)")
        return data
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet

        try:
            return pyarrow.parquet.read_table(path).to_pylist()
        except pyarrow.ArrowInvalid as error:
            raise PipelineError(f"{path}: not a Parquet file ({str(error).splitlines()[0]})") from None
    raise PipelineError(f"{path}: unsupported file type {path.suffix!r}; use .json, .jsonl or .parquet")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes it private; the output should be like any other file
    try:
        yield Path(temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    temp.chmod(0o777 & ~_umask())
    try:
        yield temp
        if path.exists():
            shutil.rmtree(path)
        os.replace(temp, path)
    finally:
        if temp.exists():
            shutil.rmtree(temp)


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    with atomic_path(path) as temp, temp.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_json(path: str | Path, data: object) -> None:
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
