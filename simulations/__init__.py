"""Flower ServerApp and ClientApp of fedemb, and run configs (configs/*.toml)."""
