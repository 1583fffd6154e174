"""Embeddings for synthesis from a trained fedemb model: the config's private training users, its
held-out users as the test set, and its public users (for centring or initialisation) when declared."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedemb.data.population import Population
from fedemb.errors import ConfigError
from fedemb.synth.embedded import Embedded, to_sphere


@dataclass
class SynthesisData:
    private: Embedded
    test: Embedded
    public: Embedded | None
    num_classes: int
    centre: np.ndarray | None = None  # subtracted from every embedding before normalising


def load_encoder(cfg, checkpoint: Path):
    """The released backbone + embedding from `checkpoint`, and the config's data splits."""
    from fedemb.data.store import load_splits
    from fedemb.models.embedding_net import build_embedding_net, load_checkpoint

    splits = load_splits(cfg.data)
    cfg.model.init_checkpoint = ""
    net = build_embedding_net(cfg.model, splits.train.image_shape, dp_enabled=False)
    load_checkpoint(net, checkpoint)
    net.eval()
    return net, splits


def embed_for_synthesis(cfg, checkpoint: Path, loaded=None) -> SynthesisData:
    """`loaded`: the (net, splits) of `load_encoder`, when the caller holds them already."""
    from fedemb.evaluation.embed import embed

    if cfg.data.held_out_classes:
        raise ConfigError("synthesis trains a classifier on the training classes: data.held_out_classes must be "
                          "empty (use --set data.held_out_classes=[])")
    net, splits = loaded or load_encoder(cfg, checkpoint)
    raw = {name: embed(net, pop) for name, pop in (("private", splits.train), ("test", splits.eval),
                                                     ("public", splits.public)) if pop is not None and len(pop)}
    centre = public_centre(cfg, raw.get("public"))

    def embedded(name: str, pop: Population) -> Embedded:
        return Embedded(to_sphere(raw[name], centre), np.asarray(pop.labels), np.asarray(pop.users))

    public = embedded("public", splits.public) if "public" in raw else None
    return SynthesisData(embedded("private", splits.train), embedded("test", splits.eval), public,
                         splits.train.num_classes, centre)


def public_centre(cfg, public_embeddings: np.ndarray | None) -> np.ndarray | None:
    """The public users' mean embedding under synth.centre = 'public', else None."""
    if cfg.synth.centre != "public":
        return None
    if public_embeddings is None:
        raise ConfigError("synth.centre = 'public' needs public users (data.public_users > 0)")
    return public_embeddings.mean(0)


def embedding_centre(cfg, net, splits) -> np.ndarray | None:
    """`public_centre`, embedding the public users only when it is needed."""
    from fedemb.evaluation.embed import embed

    wanted = cfg.synth.centre == "public" and splits.public is not None and len(splits.public)
    return public_centre(cfg, embed(net, splits.public) if wanted else None)
