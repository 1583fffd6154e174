"""The base of every settings file fedemb reads (run configs, synthesis settings, experiment and task
specs): pydantic models that refuse unknown keys and coerce nothing, and their validation errors as one
line naming the key, e.g. ``privacy.clip_norm must be > 0, got -1.0``.

A validator that checks one field raises ``ValueError("must be ...")`` without the key; the key is put in
front here. A validator that checks several fields of a model names them itself.
"""

from __future__ import annotations

import typing
from typing import Any, Literal, TypeVar

import annotated_types
from pydantic import BaseModel, ConfigDict, ValidationError

from fedemb.errors import ConfigError

Model = TypeVar("Model", bound=BaseModel)

TYPE_WORDS = {
    "int_type": "an integer", "int_parsing": "an integer", "float_type": "a number", "bool_type": "true or false",
    "string_type": "a string", "list_type": "a list", "dict_type": "a table", "model_type": "a table",
    "int_from_float": "an integer",
}


class Settings(BaseModel):
    """A table of a settings file: unknown keys and wrong types are errors, never coerced or ignored."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


def parse(model: type[Model], raw: Any, where: str = "") -> Model:
    """``raw`` (a TOML table) as ``model``, or a one-line ConfigError; ``where`` prefixes the message (a file)."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        message = describe(exc, model)
        raise ConfigError(f"{where}: {message}" if where else message) from None


def parse_json(model: type[Model], text: str, where: str) -> Model:
    """``text`` (JSON) as ``model``; JSON arrays fill tuple fields."""
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {describe(exc, model)}") from None


def describe(exc: ValidationError, model: type[BaseModel]) -> str:
    error = exc.errors(include_url=False)[0]
    loc = [str(part) for part in error["loc"]]
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
    kind, value = error["type"], error.get("input")
    owner, field = _field_at(model, error["loc"])
    if kind == "extra_forbidden":
        known = ", ".join(sorted(owner.model_fields)) if owner else ""
        section = ".".join(loc[:-1]) or "top level"
        return f"unknown key {key!r} (known in {section}: {known})"
    if kind == "missing":
        return f"{key} is required"
    if kind in ("value_error", "assertion_error"):
        text = str(error["ctx"]["error"]) if "ctx" in error else error["msg"]
        names_itself = field is None or _is_model(field.annotation)
        return text if names_itself or not key else f"{key} {text}"
    if kind == "literal_error":
        choices = ", ".join('""' if c == "" else str(c) for c in _choices(field))
        return f"{key} must be one of {choices}; got {value!r}"
    if kind in TYPE_WORDS:
        return f"{key or 'the file'} must be {TYPE_WORDS[kind]}, got {value!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        shown = float(value) if field is not None and field.annotation is float and isinstance(value, int) else value
        return f"{key} must be {bounds_text(field)}, got {shown!r}"
    if kind == "too_short":
        least = error["ctx"]["min_length"]
        return f"{key or 'the file'} must not be empty" if least == 1 else f"{key} needs at least {least} entries"
    if kind == "string_too_short":
        return f"{key} must be a non-empty string"
    return f"{key}: {error['msg']}"


def bounds_text(field) -> str:
    """A field's range as users read it: ``> 0``, ``>= 1`` or ``in (0, 1]``."""
    low = high = None
    for item in field.metadata if field is not None else ():
        if isinstance(item, (annotated_types.Gt, annotated_types.Ge)):
            low = ("(", item.gt) if isinstance(item, annotated_types.Gt) else ("[", item.ge)
        if isinstance(item, (annotated_types.Lt, annotated_types.Le)):
            high = (")", item.lt) if isinstance(item, annotated_types.Lt) else ("]", item.le)
    if low and high:
        return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f"{'>' if low[0] == '(' else '>='} {low[1]}"
    if high:
        return f"{'<' if high[0] == ')' else '<='} {high[1]}"
    return "in range"


def _choices(field) -> tuple:
    annotation = field.annotation if field is not None else None
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _field_at(model: type[BaseModel], loc: tuple) -> tuple[type[BaseModel] | None, Any]:
    """The model that holds the last key of ``loc`` and that key's FieldInfo (None where it has none)."""
    owner: type[BaseModel] | None = model
    field = None
    for part in loc:
        if owner is None or not isinstance(part, str) or part not in owner.model_fields:
            if isinstance(part, int):
                continue
            return owner, None
        field = owner.model_fields[part]
        annotation = field.annotation
        if typing.get_origin(annotation) is list:
            annotation = typing.get_args(annotation)[0]
        if _is_model(annotation):
            owner = annotation
        elif part != loc[-1]:
            owner = None
    return owner, field
