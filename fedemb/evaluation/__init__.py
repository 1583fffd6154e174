"""Embedding quality on held-out users: recall@1 and TAR at FAR, exact over all pairs."""
