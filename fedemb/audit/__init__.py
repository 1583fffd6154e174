"""Empirical privacy audit: canary users in many short runs, scored, turned into an ε lower bound.
The runs themselves wire the strategy and an in-process Grid: simulations.canary_runs."""
