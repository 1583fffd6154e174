"""Flower ServerApp and ClientApp of fedemb, what wires a run (the driver, the Ray and in-process
engines, the audit's runs), and run configs (configs/*.toml). Uses the library and the strategy."""
