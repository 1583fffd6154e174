"""`fedemb config`: check a settings file without running anything, and write the configuration reference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedemb.cli.common import console, friendly_errors

config_app = typer.Typer(help="Check settings files and write their reference (docs/configuration.md).",
                         no_args_is_help=True)


@config_app.command("check")
@friendly_errors
def check(file: Annotated[Path, typer.Argument(help="A run config, task spec or experiment spec (TOML).")],
          kind: Annotated[str, typer.Option(help="run, task or experiment; auto: from the file's tables.")] = "auto",
          ) -> None:
    """Validate a settings file against its model: one line naming the first bad key, or 'ok'."""
    from fedemb.config import Config, read_toml
    from fedemb.errors import ConfigError
    from fedemb.experiments import ExperimentSpec
    from fedemb.synth.task_spec import TaskSpec
    from fedemb.typed_config import parse

    raw = read_toml(file, "settings file")
    models = {"run": Config, "task": TaskSpec, "experiment": ExperimentSpec}
    if kind == "auto":
        kind = "experiment" if "group" in raw else "task" if "levels" in raw or "classes" in raw else "run"
    if kind not in models:
        raise ConfigError(f"--kind must be one of auto, {', '.join(models)}; got {kind!r}")
    parse(models[kind], raw, str(file))
    console.print(f"ok: {file} is a valid {kind} {'config' if kind == 'run' else 'spec'}", highlight=False, soft_wrap=True)


@config_app.command("docs")
@friendly_errors
def docs(out: Annotated[Optional[Path], typer.Option(help="Write here (docs/configuration.md) instead of stdout.")] = None,
         ) -> None:
    """The configuration reference, generated from the settings models."""
    from fedemb.config_docs import render

    text = render()
    if out is None:
        print(text, end="")
    else:
        out.write_text(text)
        console.print(f"wrote {out}", highlight=False, soft_wrap=True)
