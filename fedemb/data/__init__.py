"""User-partitioned image datasets. The package imports nothing itself, so that a device's lean
install can read its data file (fedemb.data.npz_format) without torch."""
