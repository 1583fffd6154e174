"""User-partitioned image datasets."""

from fedemb.data.population import Population
from fedemb.data.splits import DataSplits, load_splits

__all__ = ["DataSplits", "Population", "load_splits"]
