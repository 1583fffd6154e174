"""Empirical privacy audit: canary users in many short runs, scored, turned into an ε lower bound."""
