"""The scales of the smears of one screen, pooled per scan, folder or source.

Fields taken through one microscope share one optical scale, but a single 640x480 field
holds only a dozen or two measurable red cells, and its own estimate can be far off
(BCCD ``BloodImage_00000``: 0.0315 µm/px from a leukocyte's cytoplasm taken for red
cells, against ~0.075). :func:`screen_scales` therefore asks the scale policy
(:meth:`leukoscope.imaging.scale_policy.ScalePolicy.resolve_fields`) for all the fields of a
screen at once: ``--um-per-px`` or the file's own metadata (OME ``PhysicalSizeX``, TIFF
resolution tags, dpi) first; else the red cells of all the fields of one group, pooled,
with a warning for a field whose own estimate is beyond the tolerance.

A group is the smear's folder (:func:`default_group`) unless the caller names one (``--source``).
Only the metadata of each file is read here, and a field's pixels only when they are
measured: memory stays that of one field (or of a scan's central sample).

>>> default_group("/data/bccd/BloodImage_00000.jpg")
'/data/bccd'
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from leukoscope.imaging.scale_policy import FIELD_SCALE_TOLERANCE, FieldInput, FieldScale, ScalePolicy
from leukoscope.screen.tiles import open_smear, smear_from_array

#: Group of in-memory arrays (they have no folder).
ARRAY_GROUP = "<arrays>"


def default_group(source) -> str:
    """The pool of a smear: its folder (resolved), or :data:`ARRAY_GROUP` for an array."""
    if isinstance(source, np.ndarray):
        return ARRAY_GROUP
    return str(Path(source).resolve().parent)


def _file_input(path, label: str, group: str) -> FieldInput:
    try:
        smear = open_smear(path)
    except Exception:  # the screen of this file reports why it cannot be read
        def fail():
            raise ValueError(f"{path}: cannot be read")
        return FieldInput(label, group, sample=fail)
    with smear:
        um, src, code = smear.um_per_px, smear.um_source, smear.um_code

    def sample() -> np.ndarray:
        with open_smear(path) as s:
            return s.sample()

    return FieldInput(label, group, um, src if um else None, code, sample)


def screen_scales(sources: Sequence, labels: Sequence[str], policy: ScalePolicy,
                  groups: Sequence[str] | None = None, tolerance: float = FIELD_SCALE_TOLERANCE,
                  log: Callable[[str], None] | None = None) -> tuple[list[FieldScale], dict]:
    """Per-smear :class:`~leukoscope.imaging.scale_policy.FieldScale` and the pools (``{group: ...}``)
    for smears given as paths or RGB arrays; ``groups``: one name per smear (default :func:`default_group`)."""
    inputs = []
    for i, (src, label) in enumerate(zip(sources, labels)):
        group = groups[i] if groups is not None else default_group(src)
        if policy.given is not None:  # the files are not even opened here
            inputs.append(FieldInput(label, group))
        elif isinstance(src, np.ndarray):
            inputs.append(FieldInput(label, group, sample=lambda a=src, n=label: smear_from_array(a, None, n).sample()))
        else:
            inputs.append(_file_input(src, label, group))
    return policy.resolve_fields(inputs, tolerance=tolerance, log=log)
