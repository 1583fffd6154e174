"""Images of any source brought to `data.image_size` (stretched) and `data.channels`, once per machine.

The converted array is computed chunk by chunk from the (possibly memory-mapped) source, written to
`<cache>/<name>-images-<key>.npy` and memory-mapped from then on, so a large dataset is never loaded
whole and is converted once. The key holds the files the images come from (path, size, mtime) and the
settings. Channels convert as image folders do: 1 → 3 repeats the gray, RGBA is laid on white, 3 → 1 is
ITU-R 601 luma (Pillow's "L"). Resizing is bilinear with antialiasing: every output pixel is a weighted
mean of input pixels, so values stay in their range; uint8 stays uint8 (rounded), float becomes float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedemb.data.cache import cache_root, cached_array, file_stats, key_of
from fedemb.data.image_files import centre_crop_box, parse_size
from fedemb.data.npz_format import chunks, stored_dtype

CONFORM_VERSION = 1
LUMA = (0.299, 0.587, 0.114)


def target_shape(image_shape: tuple[int, int, int], cfg) -> tuple[int, int, int]:
    """(C, H, W) that `cfg.channels` and `cfg.image_size` ask for (unset: as the images are)."""
    channels, height, width = image_shape
    if cfg.image_size:
        height, width = parse_size(cfg.image_size, "data.image_size")
    return (cfg.channels or channels, height, width)


def conformed(images: np.ndarray, pixel_scale: float, cfg, files: list[Path], part: str) -> np.ndarray:
    """`images` (n, C, H, W) in the shape the config asks, memory-mapped from the cache when converted;
    `files` are the files the images come from, `part` tells the splits of one dataset apart."""
    shape = target_shape(tuple(images.shape[1:]), cfg)
    if shape == tuple(images.shape[1:]):
        return images
    crop = cfg.resize == "crop"
    key = key_of({"version": CONFORM_VERSION, "part": part, "shape": shape, "crop": crop, "files": file_stats(files),
                  "source_shape": list(images.shape), "dtype": str(images.dtype)})
    return cached_array(cache_root(cfg) / f"{cfg.name}-images-{key}.npy",
                        lambda out: _convert(images, shape, 1.0 / pixel_scale, out, crop))


def _convert(images: np.ndarray, shape: tuple[int, int, int], white: float, out: Path, crop: bool = False) -> None:
    dtype = stored_dtype(images.dtype)
    result = np.lib.format.open_memmap(out, mode="w+", dtype=dtype, shape=(len(images), *shape))
    for start, chunk in chunks(images):
        converted = convert_chunk(chunk, shape, white, crop)
        result[start:start + len(chunk)] = _as_dtype(converted, dtype, white)
    result.flush()
    del result


def convert_chunk(chunk: np.ndarray, shape: tuple[int, int, int], white: float, crop: bool = False):
    """(rows, C, H, W) → a float32 tensor (rows, *shape), values in [0, white]; with `crop`, the centre
    at the target's aspect ratio is what gets resized."""
    import torch

    channels, height, width = shape
    if crop:
        top, left, h, w = centre_crop_box(chunk.shape[2], chunk.shape[3], (height, width))
        chunk = chunk[:, :, top:top + h, left:left + w]
    x = torch.from_numpy(np.array(chunk, dtype=np.float32))
    if channels < x.shape[1]:  # fewer channels first: less to resize
        x = to_channels(x, channels, white)
    if (height, width) != tuple(x.shape[2:]):
        x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                                            antialias=True)
    return to_channels(x, channels, white)


def to_channels(x, channels: int, white: float):
    """(rows, C, H, W) with C in 1, 3, 4 → `channels` (1 or 3; 4 only when C is 4) as image folders
    convert them."""
    if x.shape[1] == 4 and channels != 4:  # laid on white, as transparent pixels of image files are
        rgb, alpha = x[:, :3], x[:, 3:] / white
        x = rgb * alpha + white * (1 - alpha)
    if x.shape[1] == channels:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1)
    weights = x.new_tensor(LUMA).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _as_dtype(x, dtype: type, white: float) -> np.ndarray:
    x = x.clamp(0, white)
    if dtype == np.uint8:
        x = x.round()
    return x.numpy().astype(dtype)
