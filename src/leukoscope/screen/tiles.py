"""Reading smears of any size: a field read whole, a scan read tile by tile.

:func:`open_smear` gives a :class:`Smear` whatever the file: a JPEG/PNG field is
decoded into memory (through :func:`leukoscope.imaging.images.load_rgb`); a TIFF is read
through tifffile's zarr store (``tifffile.imread(path, aszarr=True)`` + ``zarr.open``),
so only the tiles being analysed are ever decoded and memory stays bounded by the
tile size, not the scan size. Its physical scale comes from the file's metadata when
it has it: OME-XML ``PhysicalSizeX`` (:func:`ome_um_per_px`), else the TIFF
``XResolution``/``YResolution``/``ResolutionUnit`` tags (:func:`tiff_um_per_px`), else PNG/JPEG dpi;
defaults written by image tools (72 dpi and the like, or no absolute unit) are not a scale.
:attr:`Smear.um_code` says which (``"ome"``, ``"tiff_tag"``, ``"file_dpi"``, ``"given"`` or None).

:func:`tile_grid` cuts a ``H x W`` scan into *core* regions that cover it exactly
once, each read with an overlap of at least the largest cell diameter, so that a
cell on a core edge is seen whole; the engine keeps a detection only when its centre
lies in the tile's core, and a cell is therefore neither lost nor counted twice.

>>> [t.core for t in tile_grid(100, 150, tile=64, overlap=8)][:2]
[(0, 0, 64, 64), (0, 64, 64, 128)]
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import zarr
from PIL import Image

from leukoscope.imaging.images import (MAX_FIELD_PIXELS, ImageError, file_to_uint8, load_rgb, stated_sample_range,
                                       to_rgb)

#: Files larger than this (pixels) are never decoded whole, even when they could be.
WHOLE_READ_PIXELS = 64_000_000


@dataclass(frozen=True)
class Tile:
    """One tile: ``core`` (y0, x0, y1, x1) is what it owns; ``read`` the larger region it reads."""

    index: int
    core: tuple[int, int, int, int]
    read: tuple[int, int, int, int]

    def owns(self, cx: float, cy: float) -> bool:
        """Does the core hold the point (x, y)? Half-open, so each point has exactly one owner."""
        y0, x0, y1, x1 = self.core
        return y0 <= cy < y1 and x0 <= cx < x1


def tile_grid(height: int, width: int, tile: int, overlap: int, align: int = 1) -> list[Tile]:
    """Tiles of ``tile`` px (cores) covering ``height x width``, each read with ``overlap`` px around.

    Read-region origins are multiples of ``align`` (the detector's block factor), so
    every tile sees the same working-scale pixel grid.
    """
    if tile < 1:
        raise ValueError(f"tile size must be at least 1 px, got {tile}")
    align = max(1, int(align))
    tile = max(align, (int(tile) // align) * align)
    overlap = int(math.ceil(max(0, overlap) / align)) * align
    out = []
    for y0 in range(0, height, tile):
        for x0 in range(0, width, tile):
            y1, x1 = min(height, y0 + tile), min(width, x0 + tile)
            read = (max(0, y0 - overlap), max(0, x0 - overlap), min(height, y1 + overlap), min(width, x1 + overlap))
            out.append(Tile(len(out), (y0, x0, y1, x1), read))
    return out


class Smear:
    """A smear image: its size, its µm/px (if the file says), and region reads.

    ``read(y0, x0, y1, x1)`` returns ``(y1-y0, x1-x0, 3)`` uint8 RGB.
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int], um_per_px: float | None,
                 um_source: str, reader, closer=None, tiled: bool = False, um_code: str | None = None):
        self.path = str(path)
        self.um_code = um_code if um_per_px else None
        self.shape = (int(shape[0]), int(shape[1]))
        self.um_per_px = um_per_px
        self.um_source = um_source
        self._reader = reader
        self._closer = closer
        self.tiled = tiled

    @property
    def height(self) -> int:
        return self.shape[0]

    @property
    def width(self) -> int:
        return self.shape[1]

    def read(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        return self._reader(int(y0), int(x0), int(y1), int(x1))

    def sample(self, max_side: int = 2048) -> np.ndarray:
        """A central region of at most ``max_side`` px: for calibration and scale estimation."""
        h, w = self.shape
        sh, sw = min(h, max_side), min(w, max_side)
        y0, x0 = (h - sh) // 2, (w - sw) // 2
        return self.read(y0, x0, y0 + sh, x0 + sw)

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"Smear({self.path!r}, {self.width}x{self.height}, um_per_px={self.um_per_px} ({self.um_source}))"


def smear_from_array(img: np.ndarray, um_per_px: float | None = None, name: str = "<array>") -> Smear:
    """Wrap an in-memory RGB array as a :class:`Smear`."""
    img = to_rgb(img, path=name)
    return Smear(name, img.shape[:2], um_per_px, "given" if um_per_px else "unknown",
                 lambda y0, x0, y1, x1: img[y0:y1, x0:x1], um_code="given")


def tiff_um_per_px(path: str | os.PathLike) -> float | None:
    """µm/px from a TIFF's XResolution/ResolutionUnit (inch or centimetre), else None."""
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            tags = page.tags
            if "XResolution" not in tags:
                return None
            num, den = tags["XResolution"].value
            unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2
            unit = int(unit)
            px_per_unit = num / den if den else 0.0
            if "YResolution" in tags:  # non-square pixels: no single scale to give
                ynum, yden = tags["YResolution"].value
                py = ynum / yden if yden else 0.0
                if py > 0 and px_per_unit > 0 and abs(py / px_per_unit - 1) > 0.01:
                    return None
    except Exception:
        return None
    if px_per_unit <= 0 or not math.isfinite(px_per_unit):
        return None
    if unit == 3:    # centimetre
        um = 1e4 / px_per_unit
    elif unit == 2:  # inch
        um = 25400.0 / px_per_unit
    else:            # no absolute unit
        return None
    # 72/96/300 dpi are screen or print defaults written by image tools, not a microscope scale
    if unit == 2 and px_per_unit in (1.0, 72.0, 96.0, 150.0, 300.0, 600.0):
        return None
    return um


#: OME length units -> µm.
_OME_UNITS = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "\u00b5m": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def ome_um_per_px(path: str | os.PathLike) -> float | None:
    """µm/px from an OME-TIFF's ``Pixels PhysicalSizeX`` (and ``PhysicalSizeXUnit``, default µm), else None."""
    try:
        with tifffile.TiffFile(path) as tif:
            xml = tif.ome_metadata
    except Exception:
        return None
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] == "Pixels" and el.get("PhysicalSizeX"):
            try:
                v = float(el.get("PhysicalSizeX")) * _OME_UNITS[el.get("PhysicalSizeXUnit", "µm")]
            except (ValueError, KeyError):
                return None
            return v if v > 0 and math.isfinite(v) else None
    return None


def _pil_um_per_px(path: Path) -> float | None:
    try:
        with Image.open(path) as im:
            dpi = im.info.get("dpi")
    except Exception:
        return None
    if not dpi:
        return None
    d = float(dpi[0])
    if d <= 0 or not math.isfinite(d) or round(d) in (1, 72, 96, 150, 300, 600):
        return None
    return 25400.0 / d


def open_smear(path: str | os.PathLike, max_whole_pixels: int | None = None) -> Smear:
    """Open a smear image for region reads; raises :class:`ImageError` naming the file and the problem.

    TIFFs are opened through zarr (tile-wise decoding, bounded memory); other formats
    are decoded whole (up to :data:`leukoscope.imaging.images.MAX_FIELD_PIXELS`).
    """
    path = Path(path)
    if max_whole_pixels is None:
        max_whole_pixels = WHOLE_READ_PIXELS
    # missing, empty and directory paths go straight to load_rgb, which names the problem
    if path.suffix.lower() in (".tif", ".tiff") and path.is_file() and path.stat().st_size > 0:
        try:
            return _open_tiff(path, max_whole_pixels)
        except ImageError:
            raise
        except Exception as exc:  # let the general loader try and explain
            try:
                img = load_rgb(path, max_pixels=MAX_FIELD_PIXELS)
            except ImageError as exc2:
                raise ImageError(path, f"{exc2.reason} (tifffile: {type(exc).__name__}: {exc})") from exc
            return Smear(path, img.shape[:2], None, "unknown", lambda y0, x0, y1, x1: img[y0:y1, x0:x1])
    img = load_rgb(path, max_pixels=MAX_FIELD_PIXELS)
    um = _pil_um_per_px(path)
    return Smear(path, img.shape[:2], um, "file metadata (dpi)" if um else "unknown",
                 lambda y0, x0, y1, x1: img[y0:y1, x0:x1], um_code="file_dpi")


def _open_tiff(path: Path, max_whole_pixels: int) -> Smear:
    with tifffile.TiffFile(path) as tif:
        if not tif.pages:
            raise ImageError(path, "TIFF has no image pages")
        series = tif.series[0]
        shape, axes = tuple(series.shape), series.axes
        lo, hi = stated_sample_range(tif.pages[0])  # 12-bit data in 16-bit samples: scaled by 4095, not 65535
    um, code, src = ome_um_per_px(path), "ome", "file metadata (OME PhysicalSizeX)"
    if um is None:
        um, code, src = tiff_um_per_px(path), "tiff_tag", "file metadata (TIFF resolution)"
    src = src if um else "unknown"
    yx = _yx_layout(path, shape, axes)
    h, w = yx["h"], yx["w"]
    if h * w <= max_whole_pixels:
        img = load_rgb(path, max_pixels=max(MAX_FIELD_PIXELS, h * w))
        return Smear(path, img.shape[:2], um, src, lambda y0, x0, y1, x1: img[y0:y1, x0:x1], um_code=code)
    store = tifffile.imread(path, aszarr=True, level=0) if _has_levels(path) else tifffile.imread(path, aszarr=True)
    arr = zarr.open(store, mode="r")
    if hasattr(arr, "keys") and not hasattr(arr, "shape"):  # a group (pyramid): full resolution is "0"
        arr = arr["0"]

    def reader(y0, x0, y1, x1):
        if yx["planar"]:
            region = np.moveaxis(np.asarray(arr[:, y0:y1, x0:x1]), 0, 2)
        elif yx["gray"]:
            region = np.asarray(arr[y0:y1, x0:x1])
        else:
            region = np.asarray(arr[y0:y1, x0:x1, :])
        if region.dtype != np.uint8:  # the file's stated sample range, as the single-cell loader uses it
            region = file_to_uint8(region, path, lo, hi)
        return to_rgb(region, path=path)

    return Smear(path, (h, w), um, src, reader, closer=store.close, tiled=True, um_code=code)


def _has_levels(path: Path) -> bool:
    with tifffile.TiffFile(path) as tif:
        return len(tif.series[0].levels) > 1


def _yx_layout(path: Path, shape: tuple, axes: str) -> dict:
    if axes.endswith("YXS") and len(shape) == 3:
        return {"h": shape[0], "w": shape[1], "planar": False, "gray": False}
    if axes == "SYX" and len(shape) == 3:
        return {"h": shape[1], "w": shape[2], "planar": True, "gray": False}
    if axes == "YX":
        return {"h": shape[0], "w": shape[1], "planar": False, "gray": True}
    raise ImageError(path, f"unsupported TIFF layout: axes {axes!r}, shape {shape} "
                     "(expected a 2-D RGB or grayscale image; multi-page stacks are not smears)")
