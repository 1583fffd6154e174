"""Every stream id of the keyed draws, in one place.

A keyed draw is the PRF of (key, counters..., stream) or (key, stream, counters...)
(fedemb.privacy.keyed_random): two draws under the same key are independent only if their streams
differ, so every id below is used by one draw site only, whatever key it is used with. Add a stream
here, with a new id; never define a STREAM_ constant anywhere else (tests/test_streams.py checks both).

Changing an id changes every seeded output that draws from it: keep them.
"""

from __future__ import annotations

# federated training: keyed by the run's server secret (fedemb.privacy.keyed_random.run_secret)
STREAM_SAMPLING = 1  # secret, (round, user): limited participation's order among the eligible users
STREAM_COHORT_SIZE = 12  # secret, (round): the Poisson cohort size, Binomial(N, q) by inverse CDF
STREAM_COHORT = 13  # secret, (round, draw): the uniform index draws that pick the cohort (Poisson and fixed-size)
STREAM_GROUPING = 2  # secret, (round, user): which virtual-client slot a sampled user joins
STREAM_TRAINING_KEY = 21  # secret: the training key the nodes' draws below are keyed by (a PRF output)
# on the nodes: keyed by the training key (the task's "training_key")
STREAM_FAULTS = 3  # training key, (round, slot): whether an injected fault hits the virtual client
STREAM_NODE_FAULTS = 6  # training key, (round, the node's first slot): whether an injected fault hits the node
STREAM_TRAINING = 4  # training key, (round, slot): the virtual client's local-training seed
STREAM_HEAD_ANCHORS = 5  # training key: the fixed class anchors of the local head
# keyed by run.seed (seeded runs only)
STREAM_RUN_SECRET = 40  # run.seed: the server secret of a seeded run (predictable by design)
STREAM_MODEL_INIT = 22  # run.seed: torch's seed for the initial model (data-independent)
# DP noise
STREAM_NOISE = 11  # the noise's seed or secret: the ChaCha20 key of a GaussianNoise stream
STREAM_RELEASES = 50  # a synthesis seed: the NoiseSource secret; an entry's key: EntryNoise.seed(sub-stream)
# synthesis post-processing: keyed by the synthesis seed (synth.seed / invert.seed, or OS randomness)
STREAM_GMM_MLP = 23  # synth seed: the MLP's training seed (on the synthetic and on the private embeddings)
STREAM_GMM_START = 24  # synth seed: the mixture's data-independent starting points
STREAM_GMM_SAMPLES = 25  # synth seed: the synthetic embeddings drawn from the mixture; sub-key 1: the projector's
STREAM_INVERT = 33  # invert seed: the inversion's initial images and augmentations
STREAM_INVERT_TRAIN = 34  # invert seed: the seed of the classifiers trained on the images
STREAM_INVERT_REAL = 35  # invert seed: which real private images the non-private reference trains on
# the privacy audit: keyed by the audit's seed (and run.seed for its noise)
STREAM_AUDIT = 31  # audit seed: the canary direction; sub-streams in fedemb.audit.canary (sampling, noise, inclusion)
# procedural populations (fedemb.data.procedural): keyed by data.procedural.seed, a public data-generation key;
# a user's draws are made together, (user, index, stream) for the five per-user streams
STREAM_PROC_WRITER = 60  # population seed, (user, 0): the real writer the user derives from
STREAM_PROC_EXAMPLES = 61  # population seed, (user, 0): how many examples the user has
STREAM_PROC_MIX = 62  # population seed, (user, class): the Gamma draw of the user's label mix
STREAM_PROC_TRANSFORM = 63  # population seed, (user, parameter): rotation, scale, shear, shift, stroke width
STREAM_PROC_ELASTIC = 64  # population seed, (user, knot): the elastic displacement field's knots
STREAM_PROC_LABEL = 65  # population seed, (user, example): the example's class
STREAM_PROC_PICK = 66  # population seed, (user, example): which of the writer's images of that class

STREAMS: dict[str, int] = {name: value for name, value in globals().items() if name.startswith("STREAM_")}

_taken: dict[int, str] = {}
for _name, _id in STREAMS.items():
    if _id in _taken:
        raise RuntimeError(f"stream id {_id} is both {_taken[_id]} and {_name}: give {_name} an unused id")
    _taken[_id] = _name
del _taken, _name, _id
