"""Image files read with Pillow, whatever their format, mode and size, as (C, H, W) uint8 arrays.

An image is turned upright as its EXIF says, transparent pixels are laid on white (as on a page), 16-bit
greyscale is scaled to 8 bits, and it is converted to grayscale ("L", 1 channel) or "RGB" (3) and
resized (stretched) to a given (height, width). A file Pillow cannot read is a DataError that names it.

NumPy and Pillow only: a device's lean install (fedemb-device data) and the server's image-folder
loader (fedemb.data.image_folder) share it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fedemb.errors import DataError

MODES = {1: "L", 3: "RGB"}
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
GREY_MODES = ("1", "L", "LA", "La", "F", *SIXTEEN_BIT_MODES)
PALETTE_MODES = ("P", "PA")
ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
ORIENTATION = 0x0112
READ_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError)


@dataclass(frozen=True)
class Header:
    """What a file's header says, without decoding its pixels (palette images aside)."""
    height: int  # upright, when its EXIF orientation is in the header
    width: int
    colour: bool


def parse_size(text: str, name: str = "size") -> tuple[int, int]:
    """"28x28" → (28, 28): height x width."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise DataError(f"{name} must be HEIGHTxWIDTH in pixels, like 28x28, got {text!r}")
    return int(match[1]), int(match[2])


def hxw(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}x{shape[1]}"


def visible_files(folder: Path) -> list[Path]:
    """Files under `folder`, sorted, hidden ones (.DS_Store, .thumbnails/...) left out."""
    return [f for f in sorted(folder.rglob("*"))
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts)]


def read_header(file: Path) -> Header:
    try:
        with Image.open(file) as image:
            width, height = image.size
            if "exif" in image.info and image.getexif().get(ORIENTATION) in ROTATED:
                width, height = height, width
            return Header(height, width, _is_colour(image))
    except READ_ERRORS as exc:
        raise DataError(f"{file}: {_reason(exc)}") from None


def centre_crop_box(height: int, width: int, target: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the largest centred box with the target's aspect ratio."""
    th, tw = target
    if height * tw > width * th:  # taller than the target: crop rows
        h = max(1, round(width * th / tw))
        return (height - h) // 2, 0, h, width
    w = max(1, round(height * tw / th))
    return 0, (width - w) // 2, height, w


def read_image(file: Path, size: tuple[int, int] | None, channels: int, crop: bool = False) -> np.ndarray:
    """(channels, H, W) uint8; resized to `size` (height, width) unless it is None, after cropping its
    centre to size's aspect ratio when `crop`."""
    try:
        with Image.open(file) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    except READ_ERRORS as exc:
        raise DataError(f"{file}: {_reason(exc)}") from None
    image = _as_mode(image, MODES[channels], file)
    if size is not None and crop:
        top, left, h, w = centre_crop_box(image.height, image.width, size)
        image = image.crop((left, top, left + w, top + h))
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _reason(exc: Exception) -> str:
    return "not an image Pillow can read" if isinstance(exc, UnidentifiedImageError) else str(exc)


def _is_colour(image: Image.Image) -> bool:
    """A palette image is colour when any entry of its palette is."""
    if image.mode in PALETTE_MODES:
        palette = image.getpalette() or []
        return any(r != g or g != b for r, g, b in zip(palette[0::3], palette[1::3], palette[2::3]))
    return image.mode not in GREY_MODES


def _as_mode(image: Image.Image, mode: str, file: Path) -> Image.Image:
    if image.mode in SIXTEEN_BIT_MODES:  # Pillow's own conversion clips 16-bit values at 255
        eight_bit = (np.asarray(image, dtype=np.float64) * (255 / 65535)).round().clip(0, 255).astype(np.uint8)
        image = Image.fromarray(eight_bit, "L")
    elif image.mode == "F":
        raise DataError(f"{file}: floating-point images (mode F) are not supported: save it with 8 or 16 bits")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
    return image.convert(mode)
