"""Sampling, grouping, clipping, noise and accounting for user-level DP."""
