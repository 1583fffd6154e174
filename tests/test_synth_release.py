"""One way to release: every DP release of synthesis is written to the ledger before its noise is drawn,
a ledger that cannot be written stops the release before any noise exists, and no two releases (two
sweep points at the same ε included) share noise, which would reveal the exact statistics as the
difference of two noisy values. Also the checks the synth command tests apply to what they publish."""

import json
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from torch import nn

from fedemb.config import SynthConfig
from fedemb.data.population import Population
from fedemb.privacy.ledger import PrivacyLedger
from fedemb.privacy.release import LedgerStage, NoiseSource, gaussian_entry, release
from fedemb.synth.activation_stats import release_activation_statistics
from fedemb.synth.adaptive_gmm import fit_adaptive_gmm
from fedemb.synth.baselines import dp_prototypes, dpsgd_linear_probe
from fedemb.synth.contribution import cell_statistics, user_weights
from fedemb.synth.embedded import Embedded, to_sphere
from fedemb.synth.gmm import fit_dp_gmm
from fedemb.synth.pipeline import release_point


# ---------------------------------------------------------------- checks on published outputs (used by the
# synth gmm and synth invert command tests)

def published_accuracies(results: dict) -> list[tuple[str, float, list[str]]]:
    """Every number published under a key naming an accuracy, with the ledger stages in its scope: the
    `stage` of the dict that holds it and of every dict above it."""
    found = []

    def walk(where, node, stages):
        if isinstance(node, dict):
            stages = stages + [node["stage"]] if isinstance(node.get("stage"), str) else stages
            for key, value in node.items():
                if "accuracy" in key and isinstance(value, (int, float)):
                    found.append((f"{where}.{key}", float(value), stages))
                else:
                    walk(f"{where}.{key}", value, stages)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(f"{where}[{i}]", value, stages)

    walk("", results, [])
    return found


def assert_published_accuracies_are_releases_or_private(out: Path, results_file: str, console: str,
                                                        ledger: PrivacyLedger) -> None:
    """Every accuracy in the public results names ledger stages that exist; the non-DP figures are in
    out/private/ (labelled server-private) and nowhere in the public results or the console."""
    text = (out / results_file).read_text()
    accuracies = published_accuracies(json.loads(text))
    assert accuracies
    stages = {e.stage for e in ledger.entries}
    for where, value, scope in accuracies:
        assert scope and set(scope) <= stages, f"{where} = {value} is backed by no ledger stage ({scope})"
    for words in ("nonprivate", "non_private", "non-private"):
        assert words not in text and words not in console.lower()
    private = sorted((out / "private").glob("*.json"))
    assert private, "the non-private figures must be written somewhere: private/"
    for file in private:
        data = json.loads(file.read_text())
        assert data["server_private"] is True and "never publish" in data["what"]


def independently_composed_epsilon(ledger: PrivacyLedger) -> float:
    """The ledger's entries composed by a fresh Opacus RDP accountant (every entry a sampled Gaussian)."""
    accountant = RDPAccountant()
    accountant.history = [(e.accounting["z"], e.accounting["q"], e.accounting["steps"]) for e in ledger.entries]
    return accountant.get_epsilon(ledger.delta)


# ---------------------------------------------------------------- the release API

class CountingNoise(NoiseSource):
    """A noise source that counts the releases it gave noise to."""

    def __init__(self):
        super().__init__(0)
        self.drawn = []

    def for_entry(self, entry):
        self.drawn.append(entry.key)
        return super().for_entry(entry)


def unwritable_ledger(tmp_path) -> PrivacyLedger:
    return PrivacyLedger(tmp_path / "no such folder" / "privacy.json", 1e-5)


def users_embeddings(rng, users=60, per_user=3, classes=3, dim=6) -> Embedded:
    n = users * per_user
    return Embedded(to_sphere(rng.standard_normal((n, dim))), np.arange(n) % classes,
                    np.repeat(np.arange(users), per_user))


def test_the_entry_is_on_disk_before_the_noise_is_drawn(tmp_path):
    ledger = PrivacyLedger(tmp_path / "privacy.json", 1e-5)
    entry = gaussian_entry("synthesis/x 1", "sums", 2.0, 1.0, "Gaussian noise on sums", "user")
    on_disk_when_drawn = []

    def draw(noise):
        on_disk_when_drawn.append([e["release"] for e in json.loads((tmp_path / "privacy.json").read_text())["entries"]])
        return noise.normal((3,))

    assert release(ledger, entry, NoiseSource(), draw).shape == (3,)
    assert on_disk_when_drawn == [["sums"]]


def test_a_ledger_that_cannot_be_written_stops_the_release_before_any_noise(tmp_path):
    noise = CountingNoise()
    stage = LedgerStage(unwritable_ledger(tmp_path), "synthesis/x 1", noise)
    drawn = []
    with pytest.raises(OSError):
        stage.gaussian("sums", np.zeros(3), 1.0, 1.0, "Gaussian noise on sums")
    with pytest.raises(OSError):
        stage.run(gaussian_entry(stage.name, "probe", 1.0, 1.0, "DP-SGD", "user"), drawn.append)
    assert noise.drawn == [] and drawn == []


@pytest.mark.parametrize("helper", ["gmm", "adaptive gmm", "prototypes", "probe", "activation statistics",
                                    "pixel statistics"])
def test_no_synthesis_release_draws_noise_when_its_entry_cannot_be_written(tmp_path, helper):
    rng = np.random.default_rng(0)
    emb = users_embeddings(rng)
    noise = CountingNoise()
    stage = LedgerStage(unwritable_ledger(tmp_path), "synthesis/x 1", noise)
    with pytest.raises(OSError):
        if helper == "gmm":
            fit_dp_gmm(emb, 3, SynthConfig(clusters=2), 1.0, stage, rng)
        elif helper == "adaptive gmm":
            fit_adaptive_gmm(emb, 3, SynthConfig(clusters=2), 1.0, stage, rng)
        elif helper == "prototypes":
            dp_prototypes(emb, 3, 1.0, 1.0, stage)
        elif helper == "probe":
            dpsgd_linear_probe(emb, 3, 1.0, SynthConfig(probe_epochs=1, probe_batch_users=8), stage)
        else:
            images = rng.integers(0, 17, (12, 1, 8, 8)).astype(np.uint8)
            pop = Population(images, np.arange(12) % 3, np.arange(12) // 3, 1 / 16, 3)
            net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
            release_activation_statistics(net, "conv" if helper == "activation statistics" else "input", pop, 3.0,
                                          1.0, 1.0, {"count": 1, "means": 1, "squares": 1}, stage)
    assert noise.drawn == []


def test_a_release_is_recorded_once_and_its_noise_never_drawn_again(tmp_path):
    stage = LedgerStage(PrivacyLedger(tmp_path / "privacy.json", 1e-5), "synthesis/x 1", NoiseSource(0))
    stage.gaussian("sums", np.zeros(3), 1.0, 1.0, "Gaussian noise on sums")
    with pytest.raises(RuntimeError, match="recorded once"):
        stage.gaussian("sums", np.ones(3), 1.0, 1.0, "Gaussian noise on sums")


def test_the_dpsgd_probe_is_recorded_as_opacus_accounts_it():
    """The probe's entry (z, q, steps) is what Opacus's accountant ran, and it composes to the target ε."""
    ledger = PrivacyLedger(None, 1e-5)
    emb = users_embeddings(np.random.default_rng(1), users=80)
    cfg = SynthConfig(probe_epochs=2, probe_batch_users=8)
    _, opacus_epsilon = dpsgd_linear_probe(emb, 3, 2.0, cfg, LedgerStage(ledger, "synthesis/x 1", NoiseSource(0)))
    entry, = ledger.entries
    assert entry.accounting == {"kind": "sampled_gaussian", "z": entry.noise_multiplier, "q": 1 / 10, "steps": 20}
    assert ledger.epsilon == pytest.approx(opacus_epsilon, rel=1e-6)
    assert ledger.epsilon == pytest.approx(2.0, rel=0.01)


# ---------------------------------------------------------------- noise of sweep points

def sweep_points(epsilons):
    """Points of one sweep (`synth gmm --epsilons`), through the function `synth gmm` releases them with:
    the first in the main stage, the others in their own; same seed, same data."""
    rng = np.random.default_rng(2)
    private = users_embeddings(rng, users=400, per_user=2, classes=40, dim=4)
    test = users_embeddings(rng, users=40, classes=40, dim=4)
    cfg = SynthConfig(mixture="fixed", clusters=1, seed=0, mlp_epochs=1, samples_per_class=2)
    ledger = PrivacyLedger(None, 1e-5)
    main = LedgerStage.new(ledger, "synthesis/gmm", NoiseSource(0))
    stages = [main] + [main.sub(f"sweep {i}") for i in range(1, len(epsilons))]
    fits = [release_point(private, test, 40, cfg, eps, stage, 0, None, baselines=False)[1]
            for eps, stage in zip(epsilons, stages)]
    exact = cell_statistics(private.x, private.labels, user_weights(private.users, private.labels, 40, 1.0), 40).counts
    counts = [e for e in ledger.entries if e.release == "final counts"]
    return [(f.gmm.counts[:, 0] - exact) / (e.noise_multiplier * e.sensitivity) for f, e in zip(fits, counts)], ledger


def test_two_sweep_points_at_the_same_epsilon_draw_different_noise():
    (a, b), ledger = sweep_points([1.0, 1.0])
    assert len(ledger.entries) == 2 * 3  # counts, sums, second moments: each point recorded on its own
    assert not np.allclose(a, b)


def test_sweep_points_at_different_epsilons_do_not_share_standardised_noise():
    """The leak the sweep had: noisy_i = exact + std_i · g with one g for every ε, so that
    (noisy_1 std_2 − noisy_2 std_1) / (std_2 − std_1) is the exact statistic. Each point draws its own g."""
    (a, b), _ = sweep_points([1.0, 4.0])
    assert abs(a.std() - 1) < 0.35 and abs(b.std() - 1) < 0.35  # the recorded noise scale, 40 cells
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.6  # independent draws; one shared g gives exactly 1


def test_seeded_noise_is_reproducible_and_unseeded_noise_is_not():
    entry = gaussian_entry("synthesis/x 1", "sums", 1.0, 1.0, "Gaussian noise on sums", "user")
    assert np.array_equal(NoiseSource(7).for_entry(entry).normal((4,)), NoiseSource(7).for_entry(entry).normal((4,)))
    assert not np.array_equal(NoiseSource().for_entry(entry).normal((4,)), NoiseSource().for_entry(entry).normal((4,)))
