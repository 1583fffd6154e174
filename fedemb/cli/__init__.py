"""The `fedemb` command line: the top layer, which may import anything (fedemb.cli.app registers every
command; one module per group), and the Python API that simulate, privacy, synth and report are thin
users of (fedemb.cli.api, for launcher scripts: docs/api.md). Both import what they need inside their
functions, so that `fedemb --help` starts without torch, Ray or Flower."""

from fedemb.cli.app import app, main

__all__ = ["app", "main"]
