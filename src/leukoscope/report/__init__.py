"""The evaluation report: figures (:mod:`~leukoscope.report.figures`), the HTML page
(:mod:`~leukoscope.report.html`, template ``templates/report.html``) and
:func:`make_report`, which writes every report file of a cross-validation run.

>>> from leukoscope.report import make_report            # doctest: +SKIP
>>> m = make_report("runs/pbc_cv_fast")                   # doctest: +SKIP
>>> m["overall"]["macro_f1"]["value"]                     # doctest: +SKIP
"""

from leukoscope.report.build import make_report

__all__ = ["make_report"]
