"""Backbones (timm) with an embedding layer on top."""

from fedemb.models.embedding_net import EmbeddingNet, build_embedding_net, shared_state

__all__ = ["EmbeddingNet", "build_embedding_net", "shared_state"]
