"""One image loader for every reader, the trainer, the predictor and the screener.

Rules (from the data's known traps):

* RGBA (LMU TIFFs) loses its alpha channel; it is **never** composited onto black,
  because the LMU files keep valid RGB under alpha = 0.
* Grayscale, palette, CMYK and 16-bit images become 8-bit RGB; samples are scaled by the range
  the file states (a TIFF's BitsPerSample / SMaxSampleValue: 12-bit data in 16-bit samples),
  else by the data type's, with a warning when the image uses under 1/8 of it; floating-point
  images must hold [0, 1] (or state their range) and are refused otherwise.
* Every failure raises :class:`ImageError`, which names the file and the reason:
  missing, not an image, truncated or corrupt, absurd size (decompression bomb),
  or an unsupported layout.

Large whole-slide scans are *not* read here; :mod:`leukoscope.screen.tiles` reads
them tile by tile.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

#: File suffixes the readers consider images.
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")

#: Default upper bound on pixels for a *single-cell* image (a 400x400 LMU crop has 0.16 MP).
MAX_CELL_PIXELS = 64_000_000
#: Default upper bound for a smear field read whole (larger scans are read tiled).
MAX_FIELD_PIXELS = 400_000_000


class ImageError(ValueError):
    """An image that cannot be used; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        # 16-bit images often use only 12 bits; scale by the type's range to stay faithful.
        return (arr.astype(np.float64) / info.max * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    arr = arr.astype(np.float64)
    hi = 1.0 if arr.max(initial=0.0) <= 1.0 else 255.0
    return (arr / hi * 255.0 + 0.5).clip(0, 255).astype(np.uint8)


def _tag_value(page, *names):
    """The first of the TIFF tags ``names`` present on ``page`` as a float (the largest, for one
    value per sample), else None."""
    for name in names:
        tag = page.tags.get(name)
        if tag is None:
            continue
        v = np.asarray(tag.value, dtype=float).ravel()
        if v.size and np.isfinite(v).all():
            return float(v.max()) if name.endswith("MaxSampleValue") else float(v.min())
    return None


def stated_sample_range(page) -> tuple[float | None, float | None]:
    """``(low, high)`` sample values a TIFF page states: ``SMinSampleValue``/``SMaxSampleValue``,
    else ``MaxSampleValue``, else ``BitsPerSample`` below the data type's (12-bit data in 16-bit
    samples: 4095); None where the file states nothing beyond its data type."""
    hi = _tag_value(page, "SMaxSampleValue", "MaxSampleValue")
    lo = _tag_value(page, "SMinSampleValue", "MinSampleValue")
    dtype = np.dtype(page.dtype) if page.dtype is not None else None
    if hi is None and dtype is not None and np.issubdtype(dtype, np.integer):
        bits = int(page.bitspersample or 0)
        if 0 < bits < dtype.itemsize * 8:
            hi = float(2 ** bits - 1)
    return lo, hi


def file_to_uint8(arr: np.ndarray, path: str | os.PathLike, lo: float | None = None,
                  hi: float | None = None) -> np.ndarray:
    """A decoded file's samples as uint8, from the range the file states (``lo``, ``hi``: e.g.
    :func:`stated_sample_range`) or else its data type's.

    Integers wider than 8 bits without a stated range are scaled by the type's range; when they use
    less than 1/8 of it (12-bit data in 16-bit samples, say) a ``RuntimeWarning`` names the file.
    Floats without a stated range must lie in [0, 1] (scaled to 0-255); others raise
    :class:`ImageError` (as do non-finite floats), since their scale cannot be guessed.
    """
    if arr.dtype == np.uint8 or arr.dtype == np.bool_:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageError(path, "floating-point image holds NaN or infinite values")
        if hi is None:
            amin, amax = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
            if amin < 0.0 or amax > 1.0:
                raise ImageError(
                    path, f"floating-point image ({arr.dtype}) with values {amin:g} to {amax:g}, outside [0, 1], and "
                          "no stated sample range (SMinSampleValue/SMaxSampleValue): its brightness scale is unknown; "
                          "save it as 8- or 16-bit integers or as floats in [0, 1]")
            lo, hi = 0.0, 1.0
    elif np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        if hi is None:
            hi = float(info.max)
            amax = int(arr.max(initial=0))
            if info.bits > 8 and 0 < amax < info.max / 8:
                warnings.warn(
                    f"{path}: {info.bits}-bit image uses only values up to {amax} ({amax / info.max:.1%} of its range) "
                    f"and states no bit depth (BitsPerSample/MaxSampleValue): it is read as {info.bits}-bit and will "
                    "look dark; if it holds 10-, 12- or 14-bit data, state that in the file", RuntimeWarning,
                    stacklevel=3)
    else:
        raise ImageError(path, f"unsupported sample type {arr.dtype}")
    lo = 0.0 if lo is None or lo >= hi else lo
    scaled = arr.astype(np.float32)  # float32: half float64's memory, exact enough for 8-bit output
    scaled -= np.float32(lo)
    scaled *= np.float32(255.0 / (hi - lo))
    scaled += np.float32(0.5)
    return scaled.clip(0, 255).astype(np.uint8)


def to_rgb(arr: np.ndarray, *, path: str | os.PathLike = "<array>") -> np.ndarray:
    """Bring an array to ``(H, W, 3)`` uint8: drop alpha, expand gray, scale 16-bit/float."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] in (1, 2):  # gray (+ alpha)
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[:, :, :3]  # alpha dropped, never composited
    elif arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] > 4:  # planar CHW
        arr = np.moveaxis(arr[:3], 0, 2)
    else:
        raise ImageError(path, f"unsupported image layout with shape {arr.shape}")
    return np.ascontiguousarray(_to_uint8(arr))


def _load_tiff(path: Path, max_pixels: int) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        if not tif.pages:
            raise ImageError(path, "TIFF has no image pages")
        page = tif.pages[0]
        shape = page.shape
        h, w = (shape[0], shape[1]) if page.planarconfig != 2 else (shape[-2], shape[-1])
        if h * w > max_pixels:
            raise ImageError(
                path,
                f"absurd image size {w}x{h} ({h * w / 1e6:.0f} MP > limit {max_pixels / 1e6:.0f} MP); "
                "a whole scan must be read tiled (leukoscope screen does this)",
            )
        if page.size > 4 * max_pixels:  # many samples per pixel, or a volume: bounded like the pixels
            raise ImageError(path, f"unsupported TIFF layout: {page.size} samples in shape {shape} (an RGB(A) "
                                   f"image of at most {max_pixels / 1e6:.0f} MP expected)")
        arr = page.asarray()
        if page.planarconfig == 2 and arr.ndim == 3:
            arr = np.moveaxis(arr, 0, 2)
        lo, hi = stated_sample_range(page)
    return file_to_uint8(arr, path, lo, hi)


def load_rgb(path: str | os.PathLike, *, max_pixels: int = MAX_CELL_PIXELS) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB.

    >>> img = load_rgb("BAS/BAS_0001.tiff")  # doctest: +SKIP
    >>> img.shape, img.dtype                   # doctest: +SKIP
    ((400, 400, 3), dtype('uint8'))

    Raises :class:`ImageError` naming the file and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "file not found")
    if path.is_dir():
        raise ImageError(path, "is a directory, not an image")
    if path.stat().st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            try:
                arr = _load_tiff(path, max_pixels)
            except ImageError:
                raise
            except Exception as exc:  # tifffile could not parse it: let PIL try, then report
                try:
                    arr = _load_pil(path, max_pixels)
                except ImageError as exc2:
                    raise ImageError(path, f"{exc2.reason} (tifffile: {exc})") from exc
        else:
            arr = _load_pil(path, max_pixels)
    except ImageError:
        raise
    except MemoryError as exc:
        raise ImageError(path, "image too large to decode in memory") from exc
    except Exception as exc:  # any other decoder failure: name the file
        raise ImageError(path, f"cannot decode image ({type(exc).__name__}: {exc})") from exc
    if arr.size == 0:
        raise ImageError(path, "image has no pixels")
    return to_rgb(arr, path=path)


def _allow_pillow_pixels(max_pixels: int) -> None:
    """Raise Pillow's own decompression-bomb limit (89 MP warns, 179 MP fails by default) to ``max_pixels``
    where it is lower: our check of the header's size against ``max_pixels`` (before any pixel is decoded)
    is the guard, and Pillow's lower default refused legitimate 89-400 MP fields. Never lowered."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = int(max_pixels)


def _load_pil(path: Path, max_pixels: int) -> np.ndarray:
    _allow_pillow_pixels(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(
                        path,
                        f"absurd image size {w}x{h} ({w * h / 1e6:.0f} MP > limit "
                        f"{max_pixels / 1e6:.0f} MP): possible decompression bomb",
                    )
                if w == 0 or h == 0:
                    raise ImageError(path, "image has zero width or height")
                im.load()
                if im.mode in ("RGBA", "LA", "RGBa", "La"):
                    arr = np.asarray(im)  # alpha dropped by to_rgb, not composited
                elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    arr = np.asarray(im)
                    if arr.dtype != np.uint16 and arr.max(initial=0) <= 65535:
                        arr = arr.astype(np.uint16)
                    arr = file_to_uint8(arr, path)
                elif im.mode == "F":
                    arr = file_to_uint8(np.asarray(im), path)
                elif im.mode in ("RGB", "L"):
                    arr = np.asarray(im)
                else:  # P, PA, CMYK, YCbCr, 1, ...: let Pillow convert
                    if im.mode == "P" and "transparency" in im.info:
                        arr = np.asarray(im.convert("RGBA"))
                    else:
                        arr = np.asarray(im.convert("RGB"))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(path, f"absurd image size: possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(path, "not an image (no decoder recognises the file)") from exc
    except OSError as exc:
        msg = str(exc)
        if "truncated" in msg.lower() or "premature" in msg.lower():
            raise ImageError(path, f"truncated or corrupt image ({msg})") from exc
        raise ImageError(path, f"corrupt image ({msg})") from exc
    return arr


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` from the header alone, without decoding pixels."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:
        raise ImageError(path, f"cannot read image header ({type(exc).__name__}: {exc})") from exc


def stored_mode(path: str | os.PathLike) -> tuple[str, bool]:
    """``(mode, has alpha = 0 pixels)`` of an image file as stored: Pillow's mode (``RGB``, ``RGBA``,
    ``I;16``...), or for a TIFF Pillow cannot open (float32, 12-bit) ``tiff:<dtype>x<samples>``.
    Raises :class:`ImageError` when neither can read the header."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
            transparent = False
            if mode in ("RGBA", "LA"):
                transparent = bool((np.asarray(im.getchannel("A")) == 0).any())
            return mode, transparent
    except Exception as exc:  # Pillow cannot read every TIFF the loader reads: ask tifffile
        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                return f"tiff:{np.dtype(page.dtype).name}x{page.samplesperpixel}", False
        except Exception:
            raise ImageError(path, f"cannot read image header ({type(exc).__name__}: {exc})") from exc
