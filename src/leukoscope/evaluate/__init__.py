"""Evaluation of predictions: what the report shows, as plain functions (nothing plots here).

* :mod:`leukoscope.evaluate.metrics`: per-fold per-class metrics, Table 1, confusion,
  macro-F1 / balanced accuracy with bootstrap intervals;
* :mod:`leukoscope.evaluate.binary`: the blast and atypical questions as ROC curves over folds;
* :mod:`leukoscope.evaluate.calibration`: expected calibration error, reliability bins;
* :mod:`leukoscope.evaluate.saliency`: saliency maps from the fold models;
* :mod:`leukoscope.evaluate.agreement`: the human examiners against the gold labels.

Import the submodule you need; this package imports nothing heavy by itself.
"""
