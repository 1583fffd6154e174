"""The `fedemb` command line: the top layer, which may import anything (fedemb.cli.app registers every
command; one module per group). Commands import what they need inside their functions, so that
`fedemb --help` starts without torch, Ray or Flower."""

from fedemb.cli.app import app, main

__all__ = ["app", "main"]
