"""docs/configuration.md, generated from the settings models: every file kind fedemb reads, every key with
its default, allowed values and meaning. `fedemb config docs` writes it; a test checks it is current."""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from fedemb.typed_config import bounds_text

HEADER = """# Configuration reference

<!-- Generated from the settings models (fedemb/config.py, fedemb/synth/task_spec.py, fedemb/experiments.py)
by `fedemb config docs --out docs/configuration.md`; edit the models, not this file. -->

fedemb reads three kinds of TOML files; each is checked against its model before anything runs. A key the
model does not know, a value of the wrong type, or a value out of range is a one-line error naming the key
(`privacy.clip_norm must be > 0, got -1.0`); `fedemb config check FILE` checks a file on its own.

- **Run config** (`--config`, e.g. simulations/configs/quickstart.toml): every key is optional. Override
  any key on the command line with `--set section.key=value` (the value is read as TOML: strings need
  quotes, e.g. `--set 'model.name="resnet18"'`).
- **Task spec** (customized synthesis, `fedemb-device task` and `fedemb synth custom --task`), with its
  `[synthesis]` settings.
- **Experiment spec** (`fedemb experiments run`, scripts/experiments/*.toml).

What to change when training diverges: [divergence.md](divergence.md).
"""


def render() -> str:
    from fedemb.config import Config
    from fedemb.experiments import ExperimentSpec
    from fedemb.synth.task_spec import TaskSpec

    parts = [HEADER, "# Run config\n", _doc(Config) + "\n"]
    parts += _sections(Config, "")
    parts += ["# Task spec\n", _doc(TaskSpec) + "\n", _table(TaskSpec)]
    parts += _sections(TaskSpec, "")
    parts += ["# Experiment spec\n", _doc(ExperimentSpec) + "\n", _table(ExperimentSpec)]
    parts += _sections(ExperimentSpec, "")
    return "\n".join(parts).rstrip() + "\n"


def _sections(model: type[BaseModel], prefix: str) -> list[str]:
    """A heading and table per sub-table of ``model`` ([section], [section.sub], [[list]]), depth first."""
    out = []
    for name, field in model.model_fields.items():
        inner, many = _sub_model(field.annotation)
        if inner is None:
            continue
        key = f"{prefix}{name}"
        level = "##" if not prefix else "###"
        title = f"[[{key}]]" if many else f"[{key}]"
        out += [f"{level} {title}\n", _doc(inner) + "\n"]
        if any(_sub_model(f.annotation)[0] is None for f in inner.model_fields.values()):
            out.append(_table(inner))
        out += _sections(inner, f"{key}.")
    return out


def _table(model: type[BaseModel]) -> str:
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if _sub_model(field.annotation)[0] is not None:
            continue
        meaning = " ".join((field.description or "").split())
        rows.append(f"| {name} | {_default(field)} | {_allowed(field)} | {_cell(meaning)} |")
    return "\n".join(rows) + "\n"


def _doc(model: type[BaseModel]) -> str:
    return " ".join((model.__doc__ or "").split())


def _sub_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the settings model a field holds, whether it is a list of them), or (None, False)."""
    many = typing.get_origin(annotation) is list
    if many:
        annotation = typing.get_args(annotation)[0]
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, many
    return None, False


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is None:
        return "none"
    return f"`{json.dumps(value, ensure_ascii=False)}`" if not isinstance(value, bool) else f"`{str(value).lower()}`"


def _allowed(field) -> str:
    annotation = field.annotation
    if typing.get_origin(annotation) is Literal:
        return ", ".join(f"`{json.dumps(c)}`" for c in typing.get_args(annotation))
    words = {int: "integer", float: "number", bool: "true, false", str: "string"}
    text = words.get(annotation, _type_name(annotation))
    if any(type(m).__name__ in ("Gt", "Ge", "Lt", "Le") for m in field.metadata):
        text += f" {bounds_text(field)}"
    return _cell(text)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if origin is dict:
        return "table"
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args and origin is not typing.Annotated:
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    return {int: "integer", float: "number", bool: "true, false", str: "string"}.get(annotation, "value")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")
