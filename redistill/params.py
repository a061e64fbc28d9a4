"""Load a block of params.yaml into a typed dataclass; every wrong, missing or unknown key is a ParamError."""

import dataclasses
import types
import typing
from pathlib import Path
from typing import TypeVar

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
    """Build ``cls`` from ``params[section]``, checking keys and types, then run its ``validate()``."""
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
        values[field.name] = _check(hints[field.name], block[field.name], key)
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        validate()
    return instance


def _check(hint: object, value: object, key: str) -> object:
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
                return _check(option, value, key)
            except ParamError as error:
                errors.append(error)
        raise (
            errors[0]
            if len(errors) == 1
            else ParamError(f"params.yaml: {key} must be {_describe(hint)}, got {value!r}")
        )
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list) or not value:
            raise ParamError(f"params.yaml: {key} must be a non-empty list, got {value!r}")
        return [_check(item, element, f"{key}[{index}]") for index, element in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ParamError(f"params.yaml: {key} must be a mapping, got {value!r}")
        return _build(hint, key, value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (hint in (int, float) and isinstance(value, bool)) or not isinstance(value, hint):
        raise ParamError(f"params.yaml: {key} must be {_describe(hint)}, got {value!r}")
    return value


def _describe(hint: object) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def require(condition: bool, key: str, message: str) -> None:
    """Raise a ParamError naming ``key`` unless ``condition`` holds."""
    if not condition:
        raise ParamError(f"params.yaml: {key} {message}")
