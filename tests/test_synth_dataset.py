"""`fedemb synth dataset`: one command from a run to a synthetic dataset that torchvision and NumPy load
as it is, with a datasheet whose ε is the run's ledger after the dataset's own releases; the
end-to-end budget is kept; bad input releases nothing. Also the two inversion levers it uses: the
start from the released mean pixel, and the embedding term toward targets sampled from a DP mixture."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedemb.privacy.ledger import PrivacyLedger
from fedemb.synth.activation_stats import INPUT, ActivationStatistics
from fedemb.synth.invert_run import pixel_start
from fedemb.synth.inversion import InversionSettings, invert
from tests.helpers import cli, sets
from tests.test_synth_release import independently_composed_epsilon

FAST = ["invert.seed=0", "invert.steps=3", "invert.images_per_class=3", "invert.batch_per_class=2",
        "invert.train_epochs=1"]


def test_the_dataset_loads_in_torchvision_and_numpy_and_its_datasheet_states_the_ledgers_epsilon(trained_run):
    from torchvision.datasets import ImageFolder

    before = PrivacyLedger.load(trained_run / "privacy.json")
    out = trained_run / "dataset"
    code, output = cli("synth", "dataset", trained_run, "--epsilon", "1.5", *sets(FAST), "--out", out)
    assert code == 0, output
    ledger = PrivacyLedger.load(trained_run / "privacy.json")
    stage = [e for e in ledger.entries if e.stage == "synthesis/dataset 1"]
    assert [e.release for e in stage] == ["activation count", "activation means", "activation squares",
                                          "prototype sums"]
    assert ledger.epsilon_of(stage) == pytest.approx(1.5, rel=0.01)
    assert ledger.epsilon == pytest.approx(independently_composed_epsilon(ledger))
    sheet = json.loads((out / "datasheet.json").read_text())
    assert sheet["privacy"]["end_to_end_epsilon"] == pytest.approx(ledger.epsilon)
    assert sheet["privacy"]["ledger_epsilon_before"] == pytest.approx(before.epsilon)
    assert sheet["privacy"]["noise_predictable_from_seed"] is True  # invert.seed = 0: said so
    assert f"{ledger.epsilon:.3g}" in (out / "datasheet.md").read_text()
    data = ImageFolder(str(out / "images"))
    assert len(data) == 30 and data.classes == [str(c) for c in range(10)]
    with np.load(out / "synthetic.npz") as f:
        images, labels, soft = f["images"], f["labels"], f["soft_labels"]
    assert images.dtype == np.uint8 and images.shape == (30, 8, 8, 1)
    assert (np.bincount(labels) == 3).all() and soft.shape == (30, 10)
    assert np.allclose(soft.sum(1), 1, atol=1e-5)
    first = np.asarray(data[0][0].convert("L"))
    assert (first == images[labels == 0][0][..., 0]).all()  # the PNG is the array
    assert 0 <= sheet["evaluation"]["distilled_accuracy"] <= 1


def test_a_total_epsilon_is_kept_end_to_end(trained_run):
    before = PrivacyLedger.load(trained_run / "privacy.json").epsilon
    total = before + 1.0
    code, output = cli("synth", "dataset", trained_run, "--total-epsilon", str(total), *sets(FAST),
                       "--no-evaluate", "--out", trained_run / "within")
    assert code == 0, output
    after = PrivacyLedger.load(trained_run / "privacy.json").epsilon
    assert before < after <= total and after == pytest.approx(total, rel=0.01)


@pytest.mark.parametrize("args,needle", [
    (["--epsilon", "1", "--total-epsilon", "9"], "not both"),
    (["--total-epsilon", "0.01"], "no budget is left"),
    (["--epsilon", "-1"], "must be finite and > 0"),
    (["--set", "invert.init=\"pixels\"", "--set", "invert.layers=\"conv\""], "needs the pixel statistics"),
])
def test_bad_dataset_requests_are_one_line_errors_and_release_nothing(trained_run, args, needle):
    before = len(PrivacyLedger.load(trained_run / "privacy.json").entries)
    code, output = cli("synth", "dataset", trained_run, *args, *sets(FAST), "--out", trained_run / "refused")
    assert code == 2 and needle in output and len(output.strip().splitlines()) == 1, output
    assert len(PrivacyLedger.load(trained_run / "privacy.json").entries) == before
    assert not (trained_run / "refused" / "images").exists()


def test_a_dataset_never_overwrites_another(trained_run):
    out = trained_run / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    before = len(PrivacyLedger.load(trained_run / "privacy.json").entries)
    code, output = cli("synth", "dataset", trained_run, *sets(FAST), "--out", out)
    assert code == 2 and "not empty" in output
    assert len(PrivacyLedger.load(trained_run / "privacy.json").entries) == before


def test_embedding_guided_inversion_uses_a_dp_mixture_and_records_it_in_the_stage(trained_run):
    out = trained_run / "guided"
    code, output = cli("synth", "invert", trained_run, *sets(FAST + ["invert.anchors=\"mixture\"", "invert.ablation=false",
                                                                     "synth.mixture=\"fixed\"", "synth.clusters=2",
                                                                     "invert.epsilon=2"]),
                       "--out", out)
    assert code == 0, output
    ledger = PrivacyLedger.load(trained_run / "privacy.json")
    stage = [e for e in ledger.entries if e.stage == json.loads((out / "invert_results.json").read_text())
             ["released"]["stage"]]
    releases = [e.release for e in stage]
    assert releases[:3] == ["activation count", "activation means", "activation squares"]
    assert "final sums" in releases and "prototype sums" not in releases
    assert ledger.epsilon_of(stage) == pytest.approx(2.0, rel=0.01)
    with np.load(out / "mixture.npz") as f:
        assert f["means"].shape[:2] == (10, 2)


def test_the_pixel_start_has_the_released_mean_pixel():
    stats = ActivationStatistics([INPUT, "conv"], [np.array([-0.7, 0.2]), np.zeros(3)], [np.ones(2), np.ones(3)],
                                 "dp")
    start = pixel_start(stats, 400, (2, 6, 6), np.random.default_rng(0))
    assert start.shape == (400, 2, 6, 6) and start.min() >= 0 and start.max() <= 1
    assert start.mean(axis=(0, 2, 3)) == pytest.approx([0.15, 0.6], abs=0.01)  # (m + 1) / 2


def test_the_embedding_term_pulls_each_image_toward_its_own_target():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 6))
    targets = F.normalize(torch.randn(12, 6), dim=1).numpy()
    labels = np.zeros(12, dtype=np.int64)
    settings = InversionSettings(steps=120, lr=0.05, weight_class=0.0, weight_statistics=0.0, weight_embedding=1.0,
                                 jitter=0)
    start, _ = invert(net, labels, (1, 8, 8), InversionSettings(steps=0), 0)
    images, _ = invert(net, labels, (1, 8, 8), settings, 0, targets=targets)

    def cosines(images01):
        with torch.no_grad():
            e = F.normalize(net(torch.as_tensor(images01) * 2 - 1), dim=1).numpy()
        return (e * targets).sum(1)

    assert cosines(images).mean() > cosines(start).mean() + 0.3
    assert (cosines(images) > cosines(images[::-1].copy())).mean() >= 0.75  # its own target, not any target


def test_the_training_augmentation_rotates_and_scales_and_pads_with_background():
    from fedemb.synth.image_classifier import affine

    x = -torch.ones(64, 1, 16, 16)
    x[:, :, 4:12, 7:9] = 1.0  # a vertical bar on the background
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(affine(x, 0.0, gen), x)
    moved = affine(x, 1.0, gen)
    assert moved.shape == x.shape and moved.min() >= -1 and moved.max() <= 1
    assert (moved[:, :, 0, :] == -1).all() and (moved[:, :, :, 0] == -1).all()  # the border stays background
    assert not torch.allclose(moved, x)
    columns = ((moved + 1) / 2).sum(dim=(1, 2))  # per image, ink per column: a rotated bar spreads
    assert (columns > 0.05).sum(1).float().mean() > 2.5
    ink = ((moved + 1) / 2).sum(dim=(1, 2, 3))
    assert ((ink / 16.0) > 0.6).all() and ((ink / 16.0) < 1.5).all()  # about the bar's 16 pixels of ink
