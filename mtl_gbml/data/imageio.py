"""Image decoding and resizing shared by the RGB dataset builders (PIL, one image at a time)."""

from __future__ import annotations

import io

import numpy as np

from mtl_gbml.data.errors import DataError


def preprocess_rgb(img, size: int) -> np.ndarray:
    """A PIL image or uint8 array ([H, W], [H, W, 1|3|4]) as stored: RGB uint8 [size, size, 3].

    Images already ``size`` x ``size`` are kept bit-exact; others are resized with antialiasing
    (PIL LANCZOS).
    """
    from PIL import Image

    if not isinstance(img, Image.Image):
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {arr.dtype}")
        if arr.ndim == 3 and arr.shape[-1] == 3 and arr.shape[:2] == (size, size):
            return np.ascontiguousarray(arr)
        img = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.LANCZOS)
    return np.asarray(img, np.uint8)


def decode_rgb(data, size: int, where: str, fix: str) -> np.ndarray:
    """Decode encoded image bytes (PNG/JPEG; ``bytes`` or a 1-D uint8 array) to [size, size, 3]."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise DataError(
                f"{where}: expected encoded image bytes (bytes or a 1-D uint8 array), got an "
                f"array {data.dtype}{list(data.shape)}; {fix}"
            )
        data = data.tobytes()
    if not isinstance(data, (bytes, bytearray)):
        raise DataError(f"{where}: expected encoded image bytes, got {type(data).__name__}; {fix}")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{where}: unreadable image ({e}); {fix}") from e
    return preprocess_rgb(img, size)


def decode_file(path: str, size: int, fix: str) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"cannot read image {path} ({e}); {fix}") from e
    return decode_rgb(data, size, path, fix)
