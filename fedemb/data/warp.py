"""Per-image geometric and stroke transformations of a batch, in plain numpy arithmetic.

Every output value is computed element by element with IEEE additions, multiplications, floor and
max/min, in a fixed order, from parameters quantised to multiples of 2^-20: no BLAS, no transcendental
function on the images' path and no fused or vectorised-kernel differences, so an image comes out
bit-identical whatever batch it is computed in, on every process and machine that runs this numpy.
That is what lets a node regenerate a procedural user's data (fedemb.data.procedural) instead of
receiving it.

Coordinates are in pixels, (row, column), with the image centre at ((H - 1) / 2, (W - 1) / 2). An
output pixel p samples the source at M (p - centre) + centre + shift + field(p), bilinearly, with zero
outside the image (the background of white-on-black digits).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

QUANTUM = float(2 ** -20)
KNOTS = 4  # the elastic field: a KNOTS x KNOTS grid of displacements, bilinearly interpolated


def quantised(x: np.ndarray) -> np.ndarray:
    """x rounded to a multiple of 2^-20 (float64): parameters computed with libm's sin/cos differ by an
    ulp at most across platforms, and this rounding makes them equal (but on a 2^-20 boundary)."""
    return np.round(np.asarray(x, dtype=np.float64) / QUANTUM) * QUANTUM


def affine_matrices(rotation: np.ndarray, scale: np.ndarray, shear: np.ndarray) -> np.ndarray:
    """(n, 2, 2) maps from output offsets (row, column) to source offsets: rotation and shear in radians,
    scale the relative size (the source is read 1/scale as far out, so the drawing grows by `scale`)."""
    c, s, t = np.cos(rotation), np.sin(rotation), np.tan(shear)
    inv = 1.0 / scale
    m = np.empty((len(rotation), 2, 2))
    # rotate after shearing along the columns: [[c, -s], [s, c]] @ [[1, 0], [t, 1]], scaled
    m[:, 0, 0], m[:, 0, 1] = (c - s * t) * inv, -s * inv
    m[:, 1, 0], m[:, 1, 1] = (s + c * t) * inv, c * inv
    return quantised(m)


@lru_cache(maxsize=8)
def _knot_weights(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each pixel along one axis: its two neighbouring knots and the weight of the second."""
    pos = np.arange(size, dtype=np.float64) * (KNOTS - 1) / max(size - 1, 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), KNOTS - 2)
    return lo, lo + 1, quantised(pos - lo).astype(np.float32)


def elastic_field(knots: np.ndarray, height: int, width: int) -> np.ndarray:
    """(n, KNOTS, KNOTS) knot displacements → (n, height, width), bilinear between the knots."""
    r0, r1, wr = _knot_weights(height)
    c0, c1, wc = _knot_weights(width)
    k = knots.astype(np.float32)
    wr, wc = wr[None, :, None], wc[None, None, :]
    top = k[:, r0][:, :, c0] * (1 - wc) + k[:, r0][:, :, c1] * wc
    bottom = k[:, r1][:, :, c0] * (1 - wc) + k[:, r1][:, :, c1] * wc
    return top * (1 - wr) + bottom * wr


def source_coordinates(matrices: np.ndarray, shifts: np.ndarray, fields: np.ndarray | None,
                       height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, H, W) source rows and columns (float32) each output pixel reads, per transformation."""
    cy, cx = (height - 1) / 2, (width - 1) / 2
    dy = (np.arange(height, dtype=np.float32) - np.float32(cy))[None, :, None]
    dx = (np.arange(width, dtype=np.float32) - np.float32(cx))[None, None, :]
    m = matrices.astype(np.float32)
    sh = shifts.astype(np.float32)
    rows = (m[:, 0, 0, None, None] * dy + m[:, 0, 1, None, None] * dx) + (np.float32(cy) + sh[:, 0, None, None])
    cols = (m[:, 1, 0, None, None] * dy + m[:, 1, 1, None, None] * dx) + (np.float32(cx) + sh[:, 1, None, None])
    if fields is not None:
        rows = rows + fields[:, 0]
        cols = cols + fields[:, 1]
    return rows, cols


def bilinear(images: np.ndarray, rows: np.ndarray, cols: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """images (n, C, H, W) float32, image i sampled at the (t, H, W) source coordinates of transformation
    owner[i], bilinearly; zero outside the image. The neighbours and weights are worked out once per
    transformation, then every image only gathers and blends."""
    n, channels, height, width = images.shape
    stride = width + 3  # one ring of zeros before the image, two after: every neighbour is inside the array
    padded = np.zeros((n, channels, height + 3, stride), dtype=np.float32)
    padded[:, :, 1:height + 1, 1:width + 1] = images
    r = np.clip(rows, -1.0, float(height)).astype(np.float32)  # beyond the ring: zeros as well
    c = np.clip(cols, -1.0, float(width)).astype(np.float32)
    r0, c0 = np.floor(r), np.floor(c)
    wr, wc = (r - r0)[:, None], (c - c0)[:, None]  # (t, 1, H, W)
    corner = ((r0.astype(np.int64) + 1) * stride + (c0.astype(np.int64) + 1))[:, None]
    plane = (height + 3) * stride
    index = corner[owner] + (np.arange(n * channels, dtype=np.int64) * plane).reshape(n, channels, 1, 1)
    flat = padded.reshape(-1)
    wr, wc = wr[owner], wc[owner]
    v00, v01 = flat.take(index), flat.take(index + 1)
    v10, v11 = flat.take(index + stride), flat.take(index + stride + 1)
    top = v00 + wc * (v01 - v00)
    bottom = v10 + wc * (v11 - v10)
    return top + wr * (bottom - top)


def stroke_width(images: np.ndarray, amount: np.ndarray) -> np.ndarray:
    """Thicker (amount > 0: towards the 3x3 grey dilation) or thinner (< 0: towards the erosion) strokes,
    |amount| <= 1 the fraction of the way; images (n, C, H, W) float32, zero outside the image. The 3x3
    square is separable: a 3-tall then a 3-wide maximum (minimum) gives the same values."""
    grow = np.maximum(amount, 0).astype(np.float32)[:, None, None, None]
    shrink = np.maximum(-amount, 0).astype(np.float32)[:, None, None, None]
    dilated = _extreme(_extreme(images, np.maximum, 2), np.maximum, 3)
    eroded = _extreme(_extreme(images, np.minimum, 2), np.minimum, 3)
    return images + grow * (dilated - images) + shrink * (eroded - images)


def _extreme(x: np.ndarray, op, axis: int) -> np.ndarray:
    """op (np.maximum / np.minimum) of each pixel and its two neighbours along `axis`, zero beyond the edge."""
    n = x.shape[axis]

    def part(start, stop):
        index = [slice(None)] * x.ndim
        index[axis] = slice(start, stop)
        return tuple(index)

    out = x.copy()
    op(out[part(1, n)], x[part(0, n - 1)], out=out[part(1, n)])
    op(out[part(0, n - 1)], x[part(1, n)], out=out[part(0, n - 1)])
    for edge in (part(0, 1), part(n - 1, n)):  # the zero outside the image is a neighbour too
        op(out[edge], np.float32(0), out=out[edge])
    return out
