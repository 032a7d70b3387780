"""Smear screening: from smear images to a reviewed differential count and blast percentage.

* :mod:`~leukoscope.screen.detect`: leukocytes by stain colour, morphology and watershed;
  µm/px from red cells; box matching against ground truth.
* :mod:`~leukoscope.screen.tiles`: smears of any size, large TIFF scans tile by tile.
* :mod:`~leukoscope.screen.crops`: crops at the model's physical field of view.
* :mod:`~leukoscope.screen.count`: differential counts and blast percentage with CIs.
* :mod:`~leukoscope.screen.engine`: :class:`ScreenEngine`, the whole screen, checkpointed.
* :mod:`~leukoscope.screen.batch`: :func:`screen_batch`, many scans: a folder each, a run index, resumable.
* :mod:`~leukoscope.screen.review`: the self-contained ``review.html``.
"""

from leukoscope.screen.batch import screen_batch
from leukoscope.screen.count import count_summary, wilson_interval
from leukoscope.screen.detect import DetectParams, detect_leukocytes, detect_leukocytes_fast, match_boxes
from leukoscope.screen.engine import DEFAULT_REFER_BELOW, ImageResult, ScreenEngine, ScreenResult
from leukoscope.screen.tiles import open_smear, tile_grid

__all__ = ["DEFAULT_REFER_BELOW", "DetectParams", "ImageResult", "ScreenEngine", "ScreenResult", "count_summary",
           "detect_leukocytes", "detect_leukocytes_fast", "match_boxes", "open_smear", "screen_batch", "tile_grid",
           "wilson_interval"]
