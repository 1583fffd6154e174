"""Differentially private synthetic data from the private encoder.

`gmm`: a DP Gaussian mixture per class in embedding space (DP-Lloyd, then DP weights, means and
covariances), sampled into synthetic embeddings that a small classifier trains on.
"""
