#!/usr/bin/env bash
# Fetch Fashion-MNIST's four IDX files (gzipped) from Debian's package `dataset-fashion-mnist` into DEST
# (default data/fashion-mnist). Uses /usr/share/datasets/fashion-mnist when the package is installed,
# else downloads the .deb with apt-get (no root needed) and unpacks it. Fashion-MNIST has no user ids:
# simulations/configs/fashion.toml splits it into synthetic users.
set -euo pipefail
dest="${1:-data/fashion-mnist}"
files="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
mkdir -p "$dest"
if [ -s "$dest/train-images-idx3-ubyte.gz" ] && [ -s "$dest/t10k-labels-idx1-ubyte.gz" ]; then
  echo "Fashion-MNIST already in $dest"; exit 0
fi
source_dir=/usr/share/datasets/fashion-mnist
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [ ! -s "$source_dir/train-images-idx3-ubyte.gz" ]; then
  command -v apt-get >/dev/null || { echo "error: apt-get is needed to fetch dataset-fashion-mnist" >&2; exit 2; }
  (cd "$work" && apt-get download dataset-fashion-mnist >/dev/null)
  dpkg -x "$work"/dataset-fashion-mnist_*.deb "$work/root"
  source_dir="$work/root/usr/share/datasets/fashion-mnist"
fi
for f in $files; do
  [ -s "$source_dir/$f" ] || { echo "error: $f missing from dataset-fashion-mnist" >&2; exit 2; }
  cp "$source_dir/$f" "$dest/$f"
done
[ "$(gzip -dc "$dest/train-images-idx3-ubyte.gz" | wc -c)" = 47040016 ] || { echo "error: unexpected size of train images" >&2; exit 2; }
echo "Fashion-MNIST in $dest"
