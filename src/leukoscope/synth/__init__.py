"""Synthetic blood-cell images: single cells of the 15 classes and whole smear fields.

The real dataset is 11 GB behind a manual download, so LeukoScope draws its own
stand-in, good enough to run the whole pipeline end to end and used by the tests for
fixtures. Cells are drawn from each class's morphological cues (size, nuclear shape
and chromatin, cytoplasm colour, granules) in May-Grünwald-Giemsa-like colours, on a
background of red cells and platelets, with varied stain, light and focus; the same
seed always gives the same pixels.

* :func:`make_cell`, :func:`write_cells`: single-cell crops and an LMU-layout dataset
  with a simulated ``annotations.dat``.
* :func:`make_smear`, :func:`write_smear`: smear fields of any size with the
  leukocytes' boxes and classes as ground truth.

**Synthetic images say that code works, not how well a model sees real cells.**
"""

from leukoscope.synth.cells import LABS, SPECS, Lab, make_cell, simulate_examiners, write_cells
from leukoscope.synth.smear import make_smear, write_smear

__all__ = ["LABS", "Lab", "SPECS", "make_cell", "make_smear", "simulate_examiners", "write_cells", "write_smear"]
