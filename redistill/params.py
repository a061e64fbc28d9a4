"""Load a block of params.yaml into a typed dataclass; every wrong, missing or unknown key is a ParamError.

Each key is declared once, as a field of its block's dataclass: ``name: type = param(help, *checks)``. The loader
checks the type and runs the field's checks; docs/params.md's tables are generated from the same declarations
(redistill/params_doc.py). A block's ``validate()`` keeps only the rules that span several keys.
"""

import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from redistill.errors import PipelineError
from redistill.paths import PARAMS


class ParamError(PipelineError):
    """A param is missing, unknown, of the wrong type or out of range; the message names the key."""


T = TypeVar("T")


def read_params_file(path: str | Path = PARAMS) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path}: file not found; run from the project root")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ParamError(f"{path}: not valid YAML ({error})".replace("\n", " ")) from None
    if not isinstance(params, dict):
        raise ParamError(f"{path}: expected a mapping of stage blocks at the top level")
    return params


def load_block(cls: type[T], section: str, params: dict) -> T:
    """Build ``cls`` from ``params[section]``, checking keys, types and each field's checks, then its ``validate()``
    (the rules that span several keys) where it has one."""
    block = params.get(section)
    if not isinstance(block, dict):
        raise ParamError(f"params.yaml: missing block {section!r}")
    return _build(cls, section, block)


def _build(cls: type[T], prefix: str, block: dict) -> T:
    hints = typing.get_type_hints(cls)
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(block) - names)
    if unknown:
        raise ParamError(f"params.yaml: unknown key {prefix}.{unknown[0]}; known keys: {', '.join(sorted(names))}")
    values = {}
    for field in dataclasses.fields(cls):
        key = f"{prefix}.{field.name}"
        if field.name not in block:
            raise ParamError(f"params.yaml: missing key {key}")
        values[field.name] = _typed(hints[field.name], block[field.name], key)
    instance = cls(**values)
    # Checked after construction, so that the values a block fills in itself (a train preset's) are checked too.
    for field in dataclasses.fields(cls):
        check_param(instance, field.name, f"{prefix}.{field.name}")
    validate = getattr(instance, "validate", None)
    if validate is not None:
        validate()
    return instance


def _typed(hint: object, value: object, key: str) -> object:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _typed(option, value, key)
            except ParamError as error:
                errors.append(error)
        raise (
            errors[0] if len(errors) == 1 else ParamError(f"params.yaml: {key} must be {describe(hint)}, got {value!r}")
        )
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list) or not value:
            raise ParamError(f"params.yaml: {key} must be a non-empty list, got {value!r}")
        return [_typed(item, element, f"{key}[{index}]") for index, element in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ParamError(f"params.yaml: {key} must be a mapping, got {value!r}")
        return _build(hint, key, value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (hint in (int, float) and isinstance(value, bool)) or not isinstance(value, hint):
        raise ParamError(f"params.yaml: {key} must be {describe(hint)}, got {value!r}")
    return value


def describe(hint: object) -> str:
    """The values a type hint admits, in the words of the loader's errors: "an integer or null"."""
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return f"a non-empty list, each {describe(item)}"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def require(condition: bool, key: str, message: str) -> None:
    """Raise a ParamError naming ``key`` unless ``condition`` holds."""
    if not condition:
        raise ParamError(f"params.yaml: {key} {message}")


@dataclasses.dataclass(frozen=True)
class Check:
    """A rule one key's value must follow, worded once for the key's error line and for docs/params.md."""

    rule: str  # completes "KEY must be ...", and is docs/params.md's "allowed" cell: "positive", "in [0, 1)"
    holds: Callable[[Any], bool]
    # The error after the key, where "must be RULE, got VALUE" would word it badly.
    complaint: Callable[[Any], str] | None = None
    # Whether the rule's wording says null is allowed; whether it is, is the field's type's business.
    null: bool = False

    def error(self, value: Any) -> str | None:
        """What is wrong with ``value``, worded to follow the key; None when it follows the rule."""
        if self.holds(value):
            return None
        return self.complaint(value) if self.complaint else f"must be {self.rule}, got {value!r}"

    def noting(self, aside: str) -> "Check":
        """The same rule with an aside in its wording, e.g. where the values it refuses belong instead."""
        return dataclasses.replace(self, rule=f"{self.rule} ({aside})")


def param(help: str, *checks: Check) -> Any:
    """A params.yaml key's declaration: the field's help text (docs/params.md's meaning) and the checks it passes."""
    return dataclasses.field(metadata={"help": help, "checks": checks})


def checks_of(field: dataclasses.Field) -> tuple[Check, ...]:
    return field.metadata.get("checks", ())


def check_param(instance: object, name: str, key: str) -> None:
    """Run the checks declared on field ``name`` of ``instance``: a ParamError naming ``key`` at the first it fails."""
    value = getattr(instance, name)
    if value is None:  # the type admitted null (the loader checked it), and no check applies to it
        return
    field = next(field for field in dataclasses.fields(instance) if field.name == name)
    for check in checks_of(field):
        error = check.error(value)
        if error is not None:
            raise ParamError(f"params.yaml: {key} {error}")


positive = Check("positive", lambda value: value > 0)


def at_least(bound: float) -> Check:
    return Check(f">= {bound}", lambda value: value >= bound)


def in_range(low: float, high: float, bounds: str = "[)") -> Check:
    """``low <= value < high``, each end closed ("[", "]") or open ("(", ")") as in ``bounds``."""
    closed_low, closed_high = bounds[0] == "[", bounds[1] == "]"

    def holds(value: float) -> bool:
        above = value >= low if closed_low else value > low
        below = value <= high if closed_high else value < high
        return above and below

    return Check(f"in {bounds[0]}{low}, {high}{bounds[1]}", holds)


def one_of(*choices: object) -> Check:
    """One of ``choices``; a None among them words null as allowed ("null or one of chatml")."""
    named = [str(choice) for choice in choices if choice is not None]
    rule = f"{named[0]} or {named[1]}" if len(named) == 2 else f"one of {', '.join(named)}"
    null = None in choices
    return Check(f"null or {rule}" if null else rule, lambda value: value in choices, null=null)


def or_null(check: Check) -> Check:
    """``check``, worded to say that null is allowed too (for a field whose type admits None)."""
    return dataclasses.replace(check, rule=f"{check.rule} or null", null=True)


def naming(what: str) -> Check:
    """A string that is not blank: it must name ``what``."""
    return Check("a non-empty string", lambda value: bool(value.strip()), lambda _: f"must name {what}")


def each(check: Check) -> Check:
    """Every entry of a list passes ``check``; the error quotes the first that does not."""

    def complaint(values: list) -> str:
        wrong = next(value for value in values if not check.holds(value))
        return f"entries {check.error(wrong)}"

    return Check(f"entries each {check.rule}", lambda values: all(map(check.holds, values)), complaint)


def distinct(what: str) -> Check:
    """A list without repeats; ``what`` names an entry in the error ("lists a model twice")."""
    return Check("without repeats", lambda values: len(set(values)) == len(values), lambda _: f"lists {what} twice")
