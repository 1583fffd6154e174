"""Flower strategies of fedemb."""

from strategies.dp_fedemb import DPFedEmb

__all__ = ["DPFedEmb"]
