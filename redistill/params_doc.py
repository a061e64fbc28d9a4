"""docs/params.md's tables, generated from the params' declarations (``param(help, *checks)`` on each block's fields)
and the shipped params.yaml's values: run `python -m redistill.params_doc` (or `make docs`) from the project root.

Only the regions between the generated markers are rewritten; the prose around them is the file's own.
tests/test_params.py fails when the file differs from what this would write.
"""

import dataclasses
import typing
from collections.abc import Iterator
from pathlib import Path

from redistill.evaluation import EvalParams, TeacherComparisonParams
from redistill.params import checks_of, describe, read_params_file
from redistill.paths import PARAMS
from redistill.sampling import SampleParams
from redistill.splitting import SplitParams
from redistill.student import ImportParams, StudentParams
from redistill.teacher import TeacherParams
from redistill.train_params import PRESETS, TrainParams

COMMAND = "python -m redistill.params_doc"
DOC = Path("docs/params.md")

# Each block of params.yaml and the dataclass that declares its keys, in the file's order.
BLOCKS = {
    "sample": SampleParams,
    "teacher": TeacherParams,
    "split": SplitParams,
    "import_model": ImportParams,
    "student": StudentParams,
    "train": TrainParams,
    "evaluate": EvalParams,
    "evaluate_teacher": TeacherComparisonParams,
}
PRESET_KEYS = [
    field.name for field in dataclasses.fields(TrainParams) if any(field.name in values for values in PRESETS.values())
]


def render(doc: str, shipped: dict) -> str:
    """``doc`` with its generated regions rewritten: every key (default from ``shipped``), and the presets."""
    doc = _replace_region(doc, "keys", _key_table(shipped))
    return _replace_region(doc, "presets", _preset_table())


def _replace_region(doc: str, name: str, table: list[str]) -> str:
    begin = f"<!-- generated: {name}, by `{COMMAND}` from the declarations; edit those, not this table -->"
    end = f"<!-- end generated: {name} -->"
    before, found_begin, rest = doc.partition(begin)
    _, found_end, after = rest.partition(end)
    if not (found_begin and found_end):
        raise ValueError(f"{DOC}: no region from {begin!r} to {end!r}")
    return "\n".join([before + begin, "", *table, "", end + after])


def _key_table(shipped: dict) -> list[str]:
    if list(shipped) != list(BLOCKS):
        raise ValueError(f"{PARAMS}'s blocks {list(shipped)} are not the declared {list(BLOCKS)} (BLOCKS)")
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for section, cls in BLOCKS.items():
        for key, field, hint, default in _leaves(cls, section, shipped[section]):
            rows.append(_cells(f"`{key}`", f"`{_yaml(default)}`", _allowed(field, hint), _meaning(key, field)))
    return rows


def _leaves(cls: type, prefix: str, block: dict) -> Iterator[tuple[str, dataclasses.Field, object, object]]:
    """Each key of ``cls`` with its field, type and value in ``block``; a nested block's keys in its place."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key, hint = f"{prefix}.{field.name}", hints[field.name]
        if dataclasses.is_dataclass(hint):
            yield from _leaves(hint, key, block[field.name])
        else:
            yield key, field, hint, block[field.name]


def _allowed(field: dataclasses.Field, hint: object) -> str:
    checks = checks_of(field)
    if not checks:
        return describe(hint)
    allowed = "; ".join(check.rule for check in checks)
    words_null = any(check.null for check in checks)
    return allowed if words_null or type(None) not in typing.get_args(hint) else f"{allowed}, or null"


def _meaning(key: str, field: dataclasses.Field) -> str:
    if "help" not in field.metadata:
        raise ValueError(f"{key} has no help text: declare it as param(help, ...)")
    help_text = field.metadata["help"]
    filled_by_presets = key in {f"train.{name}" for name in PRESET_KEYS}
    return f"{help_text}; `null`: the preset's value ([presets](#presets))" if filled_by_presets else help_text


def _preset_table() -> list[str]:
    rows = ["| key | " + " | ".join(f"`{name}`" for name in PRESETS) + " |", "|---|" + "---|" * len(PRESETS)]
    for name in PRESET_KEYS:
        rows.append(_cells(f"`train.{name}`", *(f"`{_yaml(values[name])}`" for values in PRESETS.values())))
    return rows


def _cells(*cells: str) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _yaml(value: object) -> str:
    """A value as params.yaml writes it inline."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(map(_yaml, value)) + "]"
    return str(value)


def main() -> None:
    DOC.write_text(render(DOC.read_text(encoding="utf-8"), read_params_file(PARAMS)), encoding="utf-8")


if __name__ == "__main__":
    main()
