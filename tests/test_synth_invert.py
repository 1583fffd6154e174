"""`fedemb synth invert`: the activation statistics are bounded per user and noised at the calibrated
scale, the release is recorded in the run's ledger at the stage's ε, inversion moves images toward the
released statistics, BatchNorm buffers are used only as they are, and bad input is a one-line error."""

import json

import numpy as np
import pytest
import torch
from opacus.accountants.utils import get_noise_multiplier
from torch import nn

from fedemb.data.population import Population
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.privacy.release import LedgerStage, NoiseSource
from fedemb.synth.activation_stats import (ActivationStatistics, batchnorm_statistics, bounded_sums,
                                          per_example_moments, recorded_outputs, reference_scales,
                                          release_activation_statistics, statistics_sensitivities, watched_layers)
from fedemb.synth.inversion import InversionSettings, StatisticsTarget, invert
from tests.helpers import cli, sets
from tests.test_synth_release import (assert_published_accuracies_are_releases_or_private,
                                      independently_composed_epsilon)

FAST = ["invert.seed=0", "invert.steps=4", "invert.images_per_class=2", "invert.train_epochs=1"]


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.Flatten(),
                         nn.Linear(6 * 8 * 8, 5))


def population(rng, users=40, per_user=3):
    n = users * per_user
    images = rng.integers(0, 17, (n, 1, 8, 8)).astype(np.uint8)
    return Population(images, rng.integers(0, 3, n), np.repeat(np.arange(users), per_user), 1 / 16, 3)


@pytest.mark.parametrize("layers", ["conv", "input,conv", "input"])
def test_removing_any_user_moves_the_bounded_sums_by_at_most_the_sensitivities(layers):
    """A user with many extreme examples is the worst case: the bound must hold for it too, with the
    input pixels watched as well (their clip, 0.5 x the RMS of noise in [-1, 1], binds on saturated
    pixels)."""
    rng = np.random.default_rng(0)
    pop = population(rng)
    loud = Population(np.full((30, 1, 8, 8), 16, np.uint8), np.zeros(30, np.int64), np.full(30, 999), 1 / 16, 3)
    pop = Population(np.concatenate([pop.images, loud.images]), np.concatenate([pop.labels, loud.labels]),
                     np.concatenate([pop.users, loud.users]), 1 / 16, 3)
    net = small_net()
    layers = watched_layers(net, layers)
    clips = 0.5 * reference_scales(net, layers, pop.image_shape)
    m, s, channels = per_example_moments(net, layers, pop)
    per_channel = np.repeat(clips, channels)
    bound = 2.0
    full = bounded_sums(m, s, pop.users, per_channel, bound)
    sens = statistics_sensitivities(bound, clips, channels)
    worst = {k: 0.0 for k in full}
    for u in np.unique(pop.users):
        keep = pop.users != u
        without = bounded_sums(m[keep], s[keep], pop.users[keep], per_channel, bound)
        for k in full:
            worst[k] = max(worst[k], float(np.linalg.norm(full[k] - without[k])))
    for k in full:
        assert worst[k] <= sens[k] * (1 + 1e-9), k
    assert worst["count"] == pytest.approx(bound)  # the loud user reaches the count bound exactly
    assert worst["squares"] > 0.5 * sens["squares"]  # and comes close on the squares: the bound is not loose


def test_each_statistic_gets_its_share_of_the_noise_and_the_shares_compose_to_the_target():
    rng = np.random.default_rng(1)
    pop = population(rng)
    net = small_net()
    ledger = PrivacyLedger(None, 1e-5)
    z = get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=1.0, steps=1, accountant="rdp",
                             epsilon_tolerance=0.005)
    stats = release_activation_statistics(net, "conv", pop, 3.0, 1.0, z, {"count": 1, "means": 2, "squares": 2},
                                          LedgerStage(ledger, "synthesis/invert 1", NoiseSource(2)))
    zs = {e.release.split()[-1]: e.noise_multiplier for e in ledger.entries}
    assert ledger.epsilon == pytest.approx(2.0, rel=0.01)
    assert set(zs) == {"count", "means", "squares"}
    assert sum(1 / v**2 for v in zs.values()) == pytest.approx(1 / z**2)
    assert zs["count"] == pytest.approx(z / np.sqrt(0.2))
    assert stats.layers == ["0", "2"] and [len(m) for m in stats.means] == [4, 6]
    assert all((v >= 1e-4).all() for v in stats.variances)


def test_the_release_noise_has_the_recorded_scale():
    """Repeating the release: the spread of the noisy statistics is z_i times the recorded sensitivity."""
    rng = np.random.default_rng(3)
    pop = population(rng, users=10, per_user=1)
    net = small_net()
    draws = []
    for i in range(200):
        ledger = PrivacyLedger(None, 1e-5)
        stats = release_activation_statistics(net, "conv", pop, 3.0, 1.0, 1.0, {"count": 1e4, "means": 1,
                                                                                 "squares": 1},
                                              LedgerStage(ledger, "synthesis/invert 1", NoiseSource(100 + i)))
        draws.append(np.concatenate(stats.means))
    # the count takes nearly all of the budget share, so its noise is negligible next to the means'
    means, = [e for e in ledger.entries if e.release == "activation means"]
    z_means, sens_means = means.noise_multiplier, means.sensitivity
    spread = np.std(np.stack(draws), axis=0).mean()
    count = 10.0
    assert spread == pytest.approx(z_means * sens_means / count, rel=0.15)


def test_inversion_moves_images_toward_the_statistics():
    rng = np.random.default_rng(4)
    pop = population(rng)
    net = small_net()
    stats = release_activation_statistics(net, "conv", pop, 10.0, 100.0, 0.0, {"count": 1, "means": 1, "squares": 1},
                                          LedgerStage(PrivacyLedger(None, 1e-5), "no noise", NoiseSource(0)))
    target = StatisticsTarget(net, stats)

    def distance(images01):
        with torch.no_grad(), recorded_outputs(target.layers) as seen:
            net(torch.as_tensor(images01) * 2 - 1)
            return float(target.loss(seen))

    labels = np.zeros(32, dtype=np.int64)
    settings = InversionSettings(steps=150, lr=0.05, weight_class=0.0, jitter=0)
    start, _ = invert(net, labels, (1, 8, 8), InversionSettings(steps=0), 0)
    images, summary = invert(net, labels, (1, 8, 8), settings, 0, stats=stats)
    assert images.shape == (32, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    assert distance(images) < 0.3 * distance(start)
    assert summary["best"]["step"] > 0


def test_batchnorm_statistics_are_its_buffers_and_describe_its_inputs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten())
    net.train()
    net(torch.randn(64, 1, 8, 8) * 3 + 1)
    stats = batchnorm_statistics(net)
    assert stats.layers == ["1"] and stats.use_inputs and stats.source == "batchnorm"
    assert np.allclose(stats.means[0], net[1].running_mean.numpy())
    with pytest.raises(Exception, match="no BatchNorm"):
        batchnorm_statistics(small_net())


def test_statistics_naming_a_layer_the_model_lacks_are_refused():
    stats = ActivationStatistics(["nope"], [np.zeros(1)], [np.ones(1)], "dp")
    with pytest.raises(ValueError, match="'nope'"):
        StatisticsTarget(small_net(), stats)


def test_invert_on_a_run_adds_one_stage_at_its_epsilon_and_publishes_only_its_post_processing(trained_run):
    trained = PrivacyLedger.load(trained_run / "privacy.json").epsilon
    out = trained_run / "inv"
    code, output = cli("synth", "invert", trained_run, *sets(FAST + ["invert.epsilon=1.5"]), "--out", out)
    assert code == 0, output
    results = json.loads((out / "invert_results.json").read_text())
    ledger = PrivacyLedger.load(trained_run / "privacy.json")
    assert_published_accuracies_are_releases_or_private(out, "invert_results.json", output, ledger)
    assert ledger.epsilon == pytest.approx(independently_composed_epsilon(ledger))
    assert results["ledger_epsilon_total"] == pytest.approx(ledger.epsilon)
    nonprivate = json.loads((out / "private" / "invert_private.json").read_text())
    assert 0 <= nonprivate["real_images_same_count_nonprivate"] <= 1
    stage = [e for e in ledger.entries if e.stage == "synthesis/invert 1"]
    assert [e.release for e in stage] == ["activation count", "activation means", "activation squares",
                                          "prototype sums"]
    assert ledger.epsilon_of(stage) == pytest.approx(1.5, rel=0.01) and ledger.epsilon_of(stage) <= 1.5 * 1.001
    assert results["ledger_epsilon_before"] == pytest.approx(trained)
    assert ledger.epsilon > trained
    for name in ("invert_results.json", "statistics.npz", "prototypes.npy", "inverted.npz", "inverted.png",
                 "no_statistics.npz", "no_statistics.png"):
        assert (out / name).is_file(), name
    from tests.test_published_outputs import tensorboard_texts
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out / "tensorboard" / "synthesis-invert"))  # a run of its own, named by its kind
    board.Reload()
    assert board.Tags()["images"] == ["synthesis-invert/inverted_one_class_per_row",
                                      "synthesis-invert/no_statistics_one_class_per_row"]
    assert f"| δ | {results['delta']} |" in tensorboard_texts(out / "tensorboard" / "synthesis-invert")["synthesis-invert/summary"]
    for name in ("inverted", "no_statistics"):
        for key in ("from_scratch_accuracy", "distilled_accuracy"):
            assert 0 <= results["evaluation"][name][key] <= 1
    with np.load(out / "inverted.npz") as f:
        assert f["images"].shape == (10 * 2, 1, 8, 8) and (np.bincount(f["labels"]) == 2).all()


@pytest.mark.parametrize("items,needle", [
    (["invert.statistics=\"bn\""], "invert.statistics must be one of dp, batchnorm"),
    (["invert.layers=\"backbone.nope\""], "invert.layers: no module named 'backbone.nope'"),
    (["invert.statistics=\"batchnorm\""], "has no BatchNorm running statistics"),
    (["invert.epsilon=0"], "invert.epsilon must be > 0"),
])
def test_bad_invert_settings_are_one_line_errors_and_release_nothing(trained_run, items, needle):
    before = PrivacyLedger.load(trained_run / "privacy.json").entries
    code, output = cli("synth", "invert", trained_run, *sets(FAST + items), "--out", trained_run / "bad")
    assert code == 2 and needle in output and len(output.strip().splitlines()) == 1, output
    assert len(PrivacyLedger.load(trained_run / "privacy.json").entries) == len(before)


def test_inversion_matches_batchnorm_buffers_on_the_layers_input():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 4))
    net.train()
    with torch.no_grad():
        for _ in range(50):
            net(torch.rand(64, 1, 8, 8) * 0.4 - 0.9)  # dark images: BatchNorm's inputs have a distinct mean
    net.eval()
    stats = batchnorm_statistics(net)
    target = StatisticsTarget(net, stats)

    def distance(images01):
        with torch.no_grad(), recorded_outputs(target.layers, inputs=True) as seen:
            net(torch.as_tensor(images01) * 2 - 1)
            return float(target.loss(seen))

    labels = np.zeros(16, dtype=np.int64)
    start, _ = invert(net, labels, (1, 8, 8), InversionSettings(steps=0), 0)
    images, _ = invert(net, labels, (1, 8, 8), InversionSettings(steps=150, lr=0.05, weight_class=0.0, jitter=0),
                       0, stats=stats)
    assert distance(images) < 0.3 * distance(start)
